"""fedge without LiteRT, as on 32-bit Raspberry Pi OS (armv7l), where it has no wheel.

The device-side tests run this venv's python in a child process where ``ai_edge_litert``,
``tflite_runtime`` and ``tensorflow`` cannot be imported (a ``sitecustomize.py`` on
PYTHONPATH puts a finder that refuses them first on ``sys.meta_path``). The child loads
and trains the committed model on the numpy runtime, reads its op codes and metadata with
the pure-Python reader, runs an agent for a round and runs the CLI. The parent, where LiteRT
is installed, checks the reader against LiteRT's own schema bindings.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedge.models.metadata import add_metadata, op_codes, read_metadata
from fedge.models.runtime import load_runtime
from fedge.models.tflite_schema import BUILTIN_OPERATORS, ModelFileError, ModelReader, builtin_name
from helpers import DIGITS_MODEL, REPO
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit
ARTIFACTS = sorted((REPO / "models" / "artifacts").glob("*.tflite"))
BLOCKED = ("ai_edge_litert", "tflite_runtime", "tensorflow")

BLOCKER = f"""\
import sys
from importlib.abc import MetaPathFinder

BLOCKED = {BLOCKED!r}


class NotOnThisDevice(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NotOnThisDevice())
"""

# Every child script starts by proving that the blocker works.
PRELUDE = f"""\
import importlib, json, sys
for name in {BLOCKED!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    sys.exit(f"{{name}} imported: the blocker does not work")
"""


@pytest.fixture(scope="module")
def no_litert_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a child process in which LiteRT, tflite-runtime and TF are absent."""
    folder = tmp_path_factory.mktemp("no_litert")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    path = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_child(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def run_script(env: dict[str, str], cwd: Path, script: str, *args: str) -> dict[str, Any]:
    """Run PRELUDE + ``script`` in the child; its last stdout line is a JSON result."""
    proc = run_child(env, cwd, "-c", PRELUDE + textwrap.dedent(script), *args)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def fedge(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_child(env, cwd, "-m", "fedge.cli", *args)


# --- the child: a device without LiteRT --------------------------------------------------


def test_blocker_refuses_litert_and_tensorflow(
    no_litert_env: dict[str, str], tmp_path: Path
) -> None:
    out = run_script(
        no_litert_env,
        tmp_path,
        """
        problems = []
        for name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter",
                     "tensorflow.lite.python.schema_py_generated"):
            try:
                importlib.import_module(name)
            except ImportError as exc:
                problems.append(str(exc))
        import fedge.models.metadata, fedge.models.runtime  # neither needs them
        print(json.dumps({"problems": problems}))
        """,
    )
    assert len(out["problems"]) == 3 and all("blocked" in p for p in out["problems"])


def test_numpy_runtime_loads_and_trains(no_litert_env: dict[str, str], tmp_path: Path) -> None:
    out = run_script(
        no_litert_env,
        tmp_path,
        """
        import numpy as np
        from fedge.models.runtime import available_backends, load_runtime

        rt = load_runtime(sys.argv[1])
        rng = np.random.default_rng(0)
        x = rng.random((32, 64), dtype=np.float32)
        y = rng.integers(0, 10, 32).astype(np.int32)
        losses = [rt.train_step(x, y, lr=0.1) for _ in range(15)]
        print(json.dumps({"backend": rt.backend, "available": available_backends(),
                          "losses": losses}))
        """,
        str(DIGITS_MODEL),
    )
    assert out["backend"] == "numpy"
    assert out["available"] == ["numpy"]
    losses = out["losses"]
    assert losses[-1] < 0.8 * losses[0], losses  # one batch again and again: it fits it
    # The same reference maths as the numpy runtime here, where LiteRT is installed.
    ref = load_runtime(DIGITS_MODEL, prefer=("numpy",))
    rng = np.random.default_rng(0)
    x = rng.random((32, 64), dtype=np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    assert losses[:3] == pytest.approx([ref.train_step(x, y, lr=0.1) for _ in range(3)], abs=1e-6)


def _litert_view(path: Path) -> dict[str, Any]:
    """Op codes and metadata as LiteRT's own generated schema bindings read them."""
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    data = path.read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    ops = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        custom = oc.CustomCode()
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        ops.append([names[code], custom.decode() if custom else None])
    metadata = {}
    for i in range(model.MetadataLength()):
        buf = model.Buffers(model.Metadata(i).Buffer())
        raw = buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
        metadata[model.Metadata(i).Name().decode()] = raw.hex()
    return {"ops": ops, "metadata": metadata}


def test_reader_without_litert_agrees_with_litert(
    no_litert_env: dict[str, str], tmp_path: Path
) -> None:
    out = run_script(
        no_litert_env,
        tmp_path,
        """
        from pathlib import Path
        from fedge.models.metadata import op_codes, read_metadata
        from fedge.models.tflite_schema import ModelReader

        seen = {}
        for path in sys.argv[1:]:
            data = Path(path).read_bytes()
            names = [name for name, _ in ModelReader(data).metadata()]
            seen[path] = {
                "ops": [[o.builtin, o.custom_code] for o in op_codes(data)],
                "metadata": {n: read_metadata(data, n).hex() for n in names},
                "missing": read_metadata(data, "no_such_key"),
            }
        print(json.dumps(seen))
        """,
        *map(str, ARTIFACTS),
    )
    assert set(out) == set(map(str, ARTIFACTS))
    for path in ARTIFACTS:
        expected = _litert_view(path)
        assert out[str(path)]["ops"] == expected["ops"], path.name
        assert out[str(path)]["metadata"] == expected["metadata"], path.name
        assert "fedge_spec" in out[str(path)]["metadata"]
        assert out[str(path)]["missing"] is None


def test_add_metadata_without_litert_says_what_it_needs(
    no_litert_env: dict[str, str], tmp_path: Path
) -> None:
    out = run_script(
        no_litert_env,
        tmp_path,
        """
        from pathlib import Path
        from fedge.models.metadata import add_metadata

        try:
            add_metadata(Path(sys.argv[1]).read_bytes(), "k", b"v")
        except ImportError as exc:
            print(json.dumps({"error": str(exc)}))
        """,
        str(DIGITS_MODEL),
    )
    assert "ai-edge-litert or TensorFlow" in out["error"]


@pytest.mark.link
def test_agent_trains_a_round_on_the_numpy_runtime(
    no_litert_env: dict[str, str], tmp_path: Path
) -> None:
    out = run_script(
        no_litert_env,
        tmp_path,
        """
        import numpy as np
        from fedge.agent.daemon import Agent
        from fedge.agent.dataset import Dataset
        from fedge.models.runtime import load_runtime
        from fedge.protocol import (GlobalModelHeader, MemoryBroker, MemoryLink,
                                    RoundAnnouncement, Topics, TrainingConfig, UpdateHeader,
                                    decode, encode)

        model, fleet, device = sys.argv[1], "pi32", "pi-32"
        topics = Topics(fleet)
        broker = MemoryBroker()
        server = MemoryLink(broker, "server")
        server.connect()
        server.subscribe(topics.updates)
        rng = np.random.default_rng(0)
        data = Dataset(rng.random((40, 64), dtype=np.float32),
                       rng.integers(0, 10, 40).astype(np.int32))
        runtime = load_runtime(model)
        agent = Agent(device_id=device, fleet=fleet,
                      link=MemoryLink(broker, device, will=Agent.will(device, fleet)),
                      runtime=runtime, data=data, rng=np.random.default_rng(0))
        agent.start()
        weights = load_runtime(model).get_weights()
        server.publish(topics.global_model, encode(
            GlobalModelHeader(fleet=fleet, model_version=0, round_id=0), weights), retain=True)
        server.publish(topics.round, encode(RoundAnnouncement(
            fleet=fleet, round_id=1, model_version=0, deadline=2e9, selected=(device,),
            config=TrainingConfig(epochs=2, batch_size=8, lr=0.1, codec="float32",
                                  gate={"threshold": 0.0}))), retain=True)
        while agent.step(0):
            pass
        updates = []
        while (msg := server.get(0)) is not None:
            d = decode(msg.payload)
            if isinstance(d.msg, UpdateHeader):
                moved = max(float(np.abs(t).max()) for t in d.tensors.values())
                updates.append([d.msg.device_id, d.msg.round_id, d.msg.num_samples, moved])
        print(json.dumps({"backend": runtime.backend, "updates": updates}))
        """,
        str(DIGITS_MODEL),
    )
    assert out["backend"] == "numpy"
    [[device, round_id, samples, moved]] = out["updates"]
    assert (device, round_id, samples) == ("pi-32", 1, 30)  # 10 held out to evaluate
    assert moved > 1e-3


def test_cli_help_and_inspect(no_litert_env: dict[str, str], tmp_path: Path) -> None:
    helped = fedge(no_litert_env, tmp_path, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: fedge") and helped.stderr == ""
    shown = fedge(no_litert_env, tmp_path, "models", "inspect", str(DIGITS_MODEL))
    assert shown.returncode == 0, shown.stderr
    assert "runtime numpy" in shown.stdout
    ops = sorted({o.custom_code or o.builtin for o in op_codes(DIGITS_MODEL.read_bytes())})
    assert "  ops: " + ", ".join(ops) in shown.stdout.splitlines()
    assert "FULLY_CONNECTED" in ops


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["agent", "--config", "missing.toml"], "no such config file"),
        (["models", "inspect", "notes.txt"], "not a TFLite model"),
        (["models", "inspect", "truncated.tflite"], "damaged TFLite model"),
        (["models", "inspect", "missing.tflite"], "no such model file"),
        (
            ["models", "build", str(REPO / "models/specs/digits_mlp.json"), "-o", "x.tflite"],
            "TensorFlow",
        ),
    ],
    ids=["missing-config", "not-a-model", "truncated-model", "missing-model", "build-without-tf"],
)
def test_cli_error_is_one_line(
    no_litert_env: dict[str, str], tmp_path: Path, args: list[str], says: str
) -> None:
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "truncated.tflite").write_bytes(DIGITS_MODEL.read_bytes()[:4000])
    proc = fedge(no_litert_env, tmp_path, *args)
    assert proc.returncode not in (0, 1), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedge: error:"), proc.stderr
    assert says in lines[0]


# --- the reader here, beside LiteRT ------------------------------------------------------


def test_builtin_names_match_litert() -> None:
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for code, name in enumerate(BUILTIN_OPERATORS):
        assert names.get(code) == name, code
    assert builtin_name(9) == "FULLY_CONNECTED"
    assert builtin_name(100_000) == "100000" and builtin_name(-1) == "-1"


def test_reader_follows_custom_and_deprecated_codes() -> None:
    """A Flex op is flagged as custom; a file with only the deprecated code reads the same."""
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    import flatbuffers

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(DIGITS_MODEL.read_bytes(), 0))
    first, second = model.operatorCodes[0], model.operatorCodes[1]
    first.builtinCode = first.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    first.customCode = "FlexReluGrad"
    second.builtinCode, second.deprecatedBuiltinCode = 0, schema.BuiltinOperator.FULLY_CONNECTED
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    ops = op_codes(bytes(builder.Output()))
    assert [op.custom_code for op in ops if op.is_custom] == ["FlexReluGrad"]
    assert ops[0].builtin == "CUSTOM" and ops[1].builtin == "FULLY_CONNECTED"


def test_add_metadata_round_trips_through_the_reader() -> None:
    pytest.importorskip("ai_edge_litert.schema_py_generated")
    data = add_metadata(DIGITS_MODEL.read_bytes(), "note", b"first")
    data = add_metadata(data, "note", b"second")
    assert read_metadata(data, "note") == b"second"
    assert [n for n, _ in ModelReader(data).metadata()].count("note") == 1
    assert read_metadata(data, "fedge_spec") == read_metadata(
        DIGITS_MODEL.read_bytes(), "fedge_spec"
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=8, max_value=60_000))
def test_reader_rejects_damage_with_model_file_error(junk: bytes, cut: int) -> None:
    """Arbitrary or truncated bytes give ModelFileError, never another exception."""
    real = DIGITS_MODEL.read_bytes()
    for data in (junk[:4] + b"TFL3" + junk[4:], real[:cut], real[:cut] + junk):
        try:
            model = ModelReader(data)
            model.operator_codes()
            for _, index in model.metadata():
                model.buffer(index)
        except ModelFileError:
            pass


# --- what pip installs where ---------------------------------------------------------------


def _requirements_on(machine: str, platform: str, source: str) -> set[str]:
    """Distribution names fedge requires on that platform (no extras), as the installed
    metadata says ("installed") or as pyproject.toml says ("pyproject": an editable install's
    metadata is only as new as the last install)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if source == "installed":
        lines = importlib.metadata.requires("fedge") or []
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        lines = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    env = {"platform_machine": machine, "sys_platform": platform, "extra": ""}
    names: set[str] = set()
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            names.add(canonicalize_name(req.name))
    return names


@pytest.mark.parametrize(
    ("machine", "platform", "litert"),
    [
        ("armv7l", "linux", False),  # 32-bit Raspberry Pi OS on a Pi 2 and later
        ("armv6l", "linux", False),  # 32-bit Raspberry Pi OS on a Pi 1 or Zero
        ("armv8l", "linux", False),  # 32-bit userland on a 64-bit kernel, under `linux32`
        ("aarch64", "linux", True),  # 64-bit Raspberry Pi OS
        ("x86_64", "linux", True),
        ("arm64", "darwin", True),
    ],
)
@pytest.mark.parametrize("source", ["installed", "pyproject"])
def test_litert_is_required_only_where_it_has_wheels(
    machine: str, platform: str, litert: bool, source: str
) -> None:
    names = _requirements_on(machine, platform, source)
    assert ("ai-edge-litert" in names) is litert
    assert {"numpy", "flatbuffers", "pydantic", "paho-mqtt", "cryptography"} <= names
