"""Committed models honour the contract: builtin ops only, all five signatures."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedge.models.metadata import op_codes
from fedge.models.runtime import CONTRACT, load_runtime

pytestmark = pytest.mark.unit
ARTIFACTS = sorted((Path(__file__).resolve().parents[2] / "models" / "artifacts").glob("*.tflite"))


def test_there_are_artifacts() -> None:
    assert ARTIFACTS, "no committed .tflite artifacts found"


@pytest.mark.parametrize("path", ARTIFACTS, ids=lambda p: p.name)
def test_artifact_uses_builtin_ops_only(path: Path) -> None:
    custom = [op for op in op_codes(path.read_bytes()) if op.is_custom]
    assert not custom, f"{path.name} has custom/Flex ops: {custom}"


@pytest.mark.parametrize("path", ARTIFACTS, ids=lambda p: p.name)
def test_artifact_has_contract_signatures(path: Path) -> None:
    rt = load_runtime(path, prefer=("litert",))
    signatures = rt._interp.get_signature_list()  # type: ignore[attr-defined]
    assert set(CONTRACT) <= set(signatures)


def test_op_check_flags_flex_ops(digits_model: Path) -> None:
    """The check itself can fail: a model with a Flex op is reported."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema  # writing needs the object API

    data = digits_model.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    model.operatorCodes[0].builtinCode = schema.BuiltinOperator.CUSTOM
    model.operatorCodes[0].deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    model.operatorCodes[0].customCode = "FlexReluGrad"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    flagged = [op for op in op_codes(bytes(builder.Output())) if op.is_custom]
    assert [op.custom_code for op in flagged] == ["FlexReluGrad"]
