"""Homomorphic encryption of updates: CKKS (TenSEAL) key material, ciphertext payloads, and the
blind sum the aggregator computes without any secret key.

Optional: TenSEAL is imported inside the functions here (``fedge[he]``), never when
``fedge.protocol`` is imported, so nothing else of fedge needs it unless HE is configured.
Without it every entry point raises ``HeUnavailable`` with one line saying what to install.

Who holds what::

    secret key file  (kind "S")  CKKS parameters, public key, secret key: every DEVICE
    public key file  (kind "P")  CKKS parameters, public key: the AGGREGATOR (it can encrypt,
                                 add and multiply by a plain number; it cannot decrypt)

Round under HE (FedAvg only, by construction)::

    device      u_i = Enc(n_i * delta_i)                       encrypt_update  kind "update"
    aggregator  S = sum_i u_i,  W = sum_i n_i                  HeSum           kind "sum"
    aggregator  E_t = E_{t-1} + S * (server_lr / W)            apply_sum       kind "model"
    device      w_t = Dec(E_t)                                 decrypt_model

``E_0 = encrypt_model(w_0)``: the initial model is the shipped artifact, public anyway. The
aggregator keeps the global model only as ``E_t`` and never sees an update, a sum or a model in
the clear; the broker neither. Model ciphertexts sit one level below fresh ones (the product
by lr/W is rescaled once) and TenSEAL sets their scale back to exactly 2^scale_bits, so adding
every round's S * (lr/W) to E keeps E at that level for ever: one plaintext product per round.

The aggregator cannot clip, bound norms, take a median or trimmed mean, apply a server
optimiser with state (FedAdam, FedAvgM) or evaluate the model: it sees only ciphertexts.
FedAvg's server learning rate is the one thing it can apply (a plain factor). ``refuse_strategy``
says so.

Parameters (``HeParams``): poly modulus degree N = 8192 (N/2 = 4096 slots per ciphertext),
coefficient modulus primes of (60, 40, 60) bits (the last is SEAL's special prime), scale 2^40.
160 bits of modulus at N = 8192 is within the 218 bits that the Homomorphic Encryption
Standard (Albrecht et al. 2018, Table 1; SEAL's CoeffModulus::MaxBitCount) allows for 128-bit
classical security with a ternary secret. ``HeParams`` refuses parameters above that table.

Precision (``tests/protocol/test_he.py`` holds both to 1e-5 absolute, the stated bound): a
decrypted mean delta (sum / W) differs from float64 arithmetic by about 1e-9 (fresh encryption
noise at scale 2^40); a decrypted model by about 1e-7 relative to the initial model plus 1e-7
relative to each round's step, because TenSEAL sets the scale of a product (Enc(w_0) * 1,
S * lr/W) back to exactly 2^40 after dividing by a prime that is only near 2^40. Both are a
few float32 ulps, far below the int8 codec's error. Values must stay below
``HeParams.value_bound`` (2^18 for the defaults) in magnitude: beyond it CKKS wraps silently,
so encryption refuses such values (an update's check is on weight * delta).

Payload (version 1), all integers big-endian::

    offset  size  field
    0       3     magic b"FHE"
    3       1     version, 1
    4       1     kind: 1 update, 2 sum, 3 model
    5       16    key id: the first 16 bytes of SHA-256 of the public key file's TenSEAL bytes
    21      8     weight, float64: an update's n_i, a sum's W; 0 for a model
    29      4     count, uint32: 1 for an update, the updates in a sum; 0 for a model
    33      4     values, uint32: plain values carried (the model's parameter count)
    37      2     ciphertexts C, uint16: ceil(values / slots)
    39      ...   C times: length uint32, then that many bytes of a serialised CKKSVector

``read_payload`` checks every field against the caller's expectations (kind, key id, values)
and bounds every length before TenSEAL sees a byte; ciphertexts are then checked for level,
scale, size and slot count, since CKKS adds a ciphertext of another level or scale without
complaint and returns garbage.

Errors (they extend the tree in ``errors.py``)::

    ProtocolError
    ├── EncodeError (ValueError)   encrypt_*: not finite, over value_bound, wrong layout
    └── HeError (ValueError)       ``reason`` from HE_REASONS; str() is one line
        └── HeUnavailable          TenSEAL is not installed (no wheel for this platform)
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The one uint8 tensor that carries an update or model payload in the envelope: defined
# there, so that telling an encrypted global model from a plain one needs no HE module.
from .envelope import HE_TENSOR, is_encrypted
from .errors import EncodeError, ProtocolError

# 128-bit classical security, ternary secret: the largest total coefficient modulus in bits
# for each poly modulus degree (Homomorphic Encryption Standard, 2018, Table 1).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
INSTALL_HINT = (
    "homomorphic encryption needs TenSEAL: pip install 'fedge[he]' (wheels for CPython"
    " 3.11-3.13 on 64-bit Linux x86_64/aarch64, macOS arm64 and Windows x86_64; none for"
    " Python 3.10 or 32-bit Raspberry Pi OS)"
)

MAGIC = b"FHE"
VERSION = 1
KIND_UPDATE, KIND_SUM, KIND_MODEL = 1, 2, 3
KIND_NAMES = {KIND_UPDATE: "update", KIND_SUM: "sum", KIND_MODEL: "model"}
_HEAD = struct.Struct(">3sBB16sdIIH")
_LEN = struct.Struct(">I")
KEY_ID_BYTES = 16

KEY_MAGIC = b"FHEK"
KEY_VERSION = 1
KEY_SECRET, KEY_PUBLIC = b"S", b"P"
_KEY_HEAD = struct.Struct(">4sBc16sI")
MAX_KEY_FILE = 64 * 1024 * 1024
MAX_PARAMS_JSON = 4096
MAX_VALUES = 16_000_000  # as the envelope's max_elements

HE_REASONS = frozenset(
    {
        "unavailable",  # TenSEAL is not installed
        "bad_key_file",  # a key file that is missing, unreadable, corrupt or of the wrong kind
        "no_secret_key",  # decryption with a context that holds no secret key
        "too_short",  # shorter than its fixed header
        "bad_magic",  # does not start with b"FHE"
        "bad_version",  # a payload version we do not speak
        "wrong_kind",  # an update where a sum or model is expected, or the reverse
        "wrong_key",  # encrypted under another fleet's key (key id differs)
        "bad_weight",  # weight not finite, or not > 0 for an update or sum
        "bad_count",  # count 0 for an update or sum, not 1 for an update
        "wrong_size",  # values differ from the model's parameter count
        "bad_ciphertexts",  # ciphertext count is not ceil(values / slots)
        "too_large",  # a ciphertext longer than the parameters allow
        "truncated",  # fewer bytes than the lengths declare
        "trailing_bytes",  # bytes after the last ciphertext
        "bad_ciphertext",  # TenSEAL cannot load it, or wrong level, scale, size or slot count
    }
)
STRATEGY_REFUSAL = (
    "homomorphic encryption supports FedAvg only: the aggregator sums ciphertexts it cannot"
    " read, so it cannot clip, take medians or trimmed means, run a server optimiser or"
    " evaluate the model"
)


class HeError(ProtocolError, ValueError):
    """HE key material or a payload that cannot be used. ``reason`` is one of HE_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in HE_REASONS:
            raise ValueError(f"unknown HE reason {reason!r}")
        self.reason = reason
        super().__init__(f"{reason}: {message}" if reason != "unavailable" else message)


class HeUnavailable(HeError):
    """TenSEAL cannot be imported; ``str()`` says what to install, in one line."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("unavailable", INSTALL_HINT + (f" ({detail})" if detail else ""))


def tenseal() -> Any:
    """The ``tenseal`` module, or HeUnavailable (one line, no traceback needed).

    TenSEAL and TensorFlow each carry their own protobuf library: loaded after TensorFlow,
    TenSEAL's serialisation fails ("failed to save proto") or crashes the process; loaded
    first, both work. Devices and the aggregator never import TensorFlow; a process that
    needs both (a simulation that builds its model) calls this first.
    """
    if "tenseal" not in sys.modules and "tensorflow" in sys.modules:
        raise HeError(
            "unavailable",
            "TenSEAL must be loaded before TensorFlow in one process (their protobuf libraries"
            " clash): call fedge.protocol.he.tenseal() before building a model",
        )
    try:
        import tenseal as ts
    except ImportError as exc:  # also a wheel whose native library does not load
        raise HeUnavailable(str(exc).splitlines()[0] if str(exc) else "") from exc
    return ts


def available() -> bool:
    try:
        tenseal()
    except HeUnavailable:
        return False
    return True


def refuse_strategy(strategy: str, robust: str = "mean", norm_bound: float = 0.0) -> None:
    """Raise a one-line ValueError unless the ``[strategy]`` settings are plain FedAvg (any
    ``server_lr``): no server optimiser, no robust combiner, no norm bound."""
    extra = [f"robust = {robust!r}"] if robust != "mean" else []
    extra += [f"norm_bound = {norm_bound!r}"] if norm_bound else []
    if strategy != "fedavg" or extra:
        name = " with ".join([strategy, ", ".join(extra)] if extra else [strategy])
        raise ValueError(f"{STRATEGY_REFUSAL}; strategy {name} is not possible")


# -- parameters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeParams:
    """CKKS parameters. The defaults give 128-bit security, 4096 slots, one plaintext product."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        n, bits, scale = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits
        if n not in MAX_COEFF_BITS_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)}")
        if not isinstance(bits, tuple) or not all(type(b) is int and 20 <= b <= 60 for b in bits):
            raise ValueError("coeff_mod_bit_sizes must be a tuple of ints in [20, 60]")
        if len(bits) < 3:
            raise ValueError("coeff_mod_bit_sizes needs 3 primes or more (one rescale)")
        if sum(bits) > MAX_COEFF_BITS_128[n]:
            raise ValueError(
                f"{sum(bits)} bits of coefficient modulus at N = {n} is below 128-bit security"
                f" (at most {MAX_COEFF_BITS_128[n]} bits)"
            )
        if any(b != scale for b in bits[1:-1]):
            raise ValueError("the middle primes must have scale_bits bits (they rescale)")
        if bits[0] < scale + 10:
            raise ValueError("the first prime needs at least scale_bits + 10 bits (value range)")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def value_bound(self) -> float:
        """Largest |value| accepted for encryption: half of what the last level can hold."""
        return float(2 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 2))

    def ciphertext_bound(self, level: int) -> int:
        """Most bytes a serialised CKKSVector of one ciphertext at ``level`` primes can take."""
        raw = 2 * self.poly_modulus_degree * level * 8
        return raw + raw // 100 + 1024

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
                "scale_bits": self.scale_bits,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> HeParams:
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict) or set(obj) != {
            "poly_modulus_degree",
            "coeff_mod_bit_sizes",
            "scale_bits",
        }:
            raise ValueError("parameters are not {poly_modulus_degree, coeff_mod_bit_sizes, ...}")
        if not isinstance(obj["coeff_mod_bit_sizes"], list):
            raise ValueError("coeff_mod_bit_sizes is not a list")
        return cls(
            poly_modulus_degree=obj["poly_modulus_degree"],
            coeff_mod_bit_sizes=tuple(obj["coeff_mod_bit_sizes"]),
            scale_bits=obj["scale_bits"],
        )


# -- key material -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFiles:
    """The two files of a fleet's CKKS key material, as bytes. ``secret`` is for devices only."""

    secret: bytes
    public: bytes
    key_id: bytes


def generate_keys(params: HeParams | None = None) -> KeyFiles:
    """Fresh CKKS key material (public-key encryption); no relinearisation or Galois keys."""
    ts = tenseal()
    params = params or HeParams()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=1,
    )
    ctx.global_scale = 2.0**params.scale_bits
    keep = {"save_galois_keys": False, "save_relin_keys": False, "save_public_key": True}
    public = ctx.serialize(save_secret_key=False, **keep)
    secret = ctx.serialize(save_secret_key=True, **keep)
    key_id = hashlib.sha256(public).digest()[:KEY_ID_BYTES]
    return KeyFiles(
        secret=_key_file(KEY_SECRET, key_id, params, secret),
        public=_key_file(KEY_PUBLIC, key_id, params, public),
        key_id=key_id,
    )


def _key_file(kind: bytes, key_id: bytes, params: HeParams, body: bytes) -> bytes:
    meta = params.to_json()
    return _KEY_HEAD.pack(KEY_MAGIC, KEY_VERSION, kind, key_id, len(meta)) + meta + body


@dataclass
class HeKeys:
    """A loaded key file: a TenSEAL context and what the payload checks need."""

    context: Any
    params: HeParams
    key_id: bytes
    has_secret: bool
    # (scale, parms_id) of a fresh ciphertext and of a model-level one, measured at load
    levels: dict[int, tuple[float, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def fresh(self) -> int:
        return len(self.params.coeff_mod_bit_sizes) - 1

    @property
    def model(self) -> int:
        return self.fresh - 1


def key_file_kind(path: str | Path) -> str:
    """``"secret"`` or ``"public"``: what a key file holds, from its header alone (no TenSEAL,
    so a config can be checked where TenSEAL is missing). HeError("bad_key_file") naming the
    file if it is not a fedge CKKS key file."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_KEY_HEAD.size)
    except OSError as exc:
        raise HeError("bad_key_file", f"{source}: cannot read ({exc.strerror})") from exc
    if len(head) < _KEY_HEAD.size or head[:4] != KEY_MAGIC:
        raise HeError("bad_key_file", f"{source}: not a fedge CKKS key file (no FHEK header)")
    _, version, kind, _, _ = _KEY_HEAD.unpack_from(head)
    if version != KEY_VERSION or kind not in (KEY_SECRET, KEY_PUBLIC):
        raise HeError("bad_key_file", f"{source}: key file version {version}, kind {kind!r}")
    return "secret" if kind == KEY_SECRET else "public"


def load_keys(path: str | Path, *, secret: bool) -> HeKeys:
    """Load a key file; ``secret=True`` (devices) demands the secret key, ``False`` (the
    aggregator) demands a file WITHOUT one. Any problem is one HeError("bad_key_file") line
    naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise HeError("bad_key_file", f"{path}: cannot read: {exc.strerror or exc}") from exc
    return keys_from_bytes(data, secret=secret, source=str(path))


def keys_from_bytes(data: bytes, *, secret: bool, source: str = "key file") -> HeKeys:
    def bad(why: str) -> HeError:
        return HeError("bad_key_file", f"{source}: {why}")

    if len(data) > MAX_KEY_FILE:
        raise bad(f"over {MAX_KEY_FILE} bytes; not a fedge CKKS key file")
    if len(data) < _KEY_HEAD.size or data[:4] != KEY_MAGIC:
        raise bad("not a fedge CKKS key file (it does not start with FHEK)")
    _, version, kind, key_id, meta_len = _KEY_HEAD.unpack_from(data)
    if version != KEY_VERSION:
        raise bad(f"key file version {version}, this fedge reads {KEY_VERSION}")
    if kind not in (KEY_SECRET, KEY_PUBLIC):
        raise bad("unknown key kind")
    if kind == KEY_SECRET and not secret:
        raise bad("holds the SECRET key; the aggregator must get the public key file only")
    if kind == KEY_PUBLIC and secret:
        raise bad("is the public key file; a device needs the secret key file")
    if meta_len > MAX_PARAMS_JSON or _KEY_HEAD.size + meta_len > len(data):
        raise bad("truncated or corrupt parameters")
    start = _KEY_HEAD.size + meta_len
    try:
        params = HeParams.from_json(data[_KEY_HEAD.size : start])
    except (ValueError, TypeError) as exc:  # JSON and UnicodeDecodeError are ValueErrors
        raise bad(f"parameters: {str(exc).splitlines()[0]}") from exc
    ts = tenseal()
    try:
        # One worker thread: vector operations do not use TenSEAL's pool, and a simulated
        # fleet loads one context per device (the default is a thread per core each).
        ctx = ts.context_from(data[start:], n_threads=1)
    except Exception as exc:  # TenSEAL raises ValueError, RuntimeError or its own types
        raise bad(f"TenSEAL cannot load it (corrupt?): {str(exc).splitlines()[0][:120]}") from exc
    if bool(ctx.has_secret_key()) != (kind == KEY_SECRET) or not ctx.has_public_key():
        raise bad("the keys inside do not match the file's kind")
    if ctx.global_scale != 2.0**params.scale_bits:
        raise bad("the scale inside does not match the file's parameters")
    keys = HeKeys(context=ctx, params=params, key_id=key_id, has_secret=kind == KEY_SECRET)
    try:
        probe = ts.ckks_vector(ctx, [0.0])
        model = probe * 1.0
    except Exception as exc:  # see above
        raise bad(f"cannot encrypt with it: {str(exc).splitlines()[0][:120]}") from exc
    for level, vec in ((keys.fresh, probe), (keys.model, model)):
        ct = vec.ciphertext()[0]
        if ct.poly_modulus_degree() != params.poly_modulus_degree or (
            ct.coeff_modulus_size() != level
        ):
            raise bad("the parameters inside do not match the file's parameters")
        keys.levels[level] = (float(ct.scale), tuple(ct.parms_id()))
    return keys


# -- payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """A read payload: its header fields and the raw ciphertext bytes (not yet loaded)."""

    kind: int
    key_id: bytes
    weight: float
    count: int
    values: int
    ciphertexts: tuple[bytes, ...]


def n_ciphertexts(values: int, slots: int) -> int:
    return max(1, math.ceil(values / slots))


def write_payload(
    kind: int, key_id: bytes, weight: float, count: int, values: int, parts: Sequence[bytes]
) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, kind, key_id, weight, count, values, len(parts))
    return b"".join([head, *(_LEN.pack(len(p)) + p for p in parts)])


def read_payload(data: bytes, keys: HeKeys, *, kind: int, values: int) -> Payload:
    """Check a payload's header and lengths against what the caller expects; no TenSEAL yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HeError("too_short", f"a payload is bytes, not {type(data).__name__}")
    data = bytes(data)
    want = KIND_NAMES.get(kind, str(kind))
    if len(data) < _HEAD.size:
        raise HeError("too_short", f"{len(data)} bytes, the header alone is {_HEAD.size}")
    magic, version, got_kind, key_id, weight, count, n_values, n_parts = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise HeError("bad_magic", f"starts with {magic!r}, want {MAGIC!r}")
    if version != VERSION:
        raise HeError("bad_version", f"HE payload version {version}, want {VERSION}")
    if got_kind != kind:
        raise HeError("wrong_kind", f"a {KIND_NAMES.get(got_kind, got_kind)}, want a {want}")
    if key_id != keys.key_id:
        raise HeError("wrong_key", f"key id {key_id.hex()}, this fleet's is {keys.key_id.hex()}")
    if not math.isfinite(weight) or (kind != KIND_MODEL and weight <= 0):
        raise HeError("bad_weight", f"weight {weight!r}")
    if (kind == KIND_UPDATE and count != 1) or (kind == KIND_SUM and count < 1):
        raise HeError("bad_count", f"count {count} for a {want}")
    if n_values != values:
        raise HeError("wrong_size", f"{n_values} values, the model has {values}")
    if n_parts != n_ciphertexts(values, keys.params.slots):
        raise HeError("bad_ciphertexts", f"{n_parts} ciphertexts for {values} values")
    level = keys.model if kind == KIND_MODEL else keys.fresh
    bound = keys.params.ciphertext_bound(level)
    parts = []
    offset = _HEAD.size
    for j in range(n_parts):
        if offset + _LEN.size > len(data):
            raise HeError("truncated", f"ciphertext {j} has no length")
        (length,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        if length > bound:
            raise HeError("too_large", f"ciphertext {j} of {length} bytes, max {bound}")
        if offset + length > len(data):
            raise HeError("truncated", f"ciphertext {j} needs {length} bytes")
        parts.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise HeError("trailing_bytes", f"{len(data) - offset} bytes after the last ciphertext")
    return Payload(kind, key_id, float(weight), int(count), int(n_values), tuple(parts))


def _load_vectors(keys: HeKeys, payload: Payload) -> list[Any]:
    """TenSEAL vectors from a checked payload, each of the expected level, scale and size."""
    ts = tenseal()
    level = keys.model if payload.kind == KIND_MODEL else keys.fresh
    scale, parms_id = keys.levels[level]
    slots = keys.params.slots
    vectors = []
    for j, raw in enumerate(payload.ciphertexts):
        expected = min(slots, payload.values - j * slots)
        try:
            vec = ts.ckks_vector_from(keys.context, raw)
            cts = vec.ciphertext()
            ct = cts[0]
            ok = (
                len(cts) == 1
                and vec.size() == expected
                and ct.size() == 2
                and ct.is_ntt_form()
                and float(ct.scale) == scale
                and tuple(ct.parms_id()) == parms_id
            )
        except Exception as exc:  # TenSEAL's errors are ValueError, RuntimeError, TypeError...
            raise HeError("bad_ciphertext", f"ciphertext {j}: {_first_line(exc)}") from exc
        if not ok:
            raise HeError(
                "bad_ciphertext",
                f"ciphertext {j}: not a {KIND_NAMES[payload.kind]} ciphertext"
                " of this fleet's parameters (level, scale, size or slot count)",
            )
        vectors.append(vec)
    return vectors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _serialize(vectors: Sequence[Any]) -> list[bytes]:
    return [v.serialize() for v in vectors]


# -- device side ------------------------------------------------------------------------------


def flatten(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensors in mapping order, flattened in C order, as one float64 vector."""
    if not tensors:
        raise EncodeError("nothing to encrypt: no tensors")
    flats = []
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise EncodeError(f"tensor {name!r}: dtype {array.dtype} is not a float type")
        flats.append(array.astype(np.float64).ravel())
    flat = np.concatenate(flats)
    if flat.size > MAX_VALUES:
        raise EncodeError(f"{flat.size} values, max {MAX_VALUES}")
    if not np.isfinite(flat).all():
        raise EncodeError("values are not all finite")
    return flat


def _encrypt(keys: HeKeys, flat: np.ndarray) -> list[Any]:
    ts = tenseal()
    bound = keys.params.value_bound
    peak = float(np.max(np.abs(flat))) if flat.size else 0.0
    if peak > bound:
        raise EncodeError(f"a value of magnitude {peak:.3g} is over the CKKS bound {bound:g}")
    slots = keys.params.slots
    return [
        ts.ckks_vector(keys.context, flat[j : j + slots])
        for j in range(0, max(1, flat.size), slots)
    ]


def encrypt_update(keys: HeKeys, delta: Mapping[str, np.ndarray], weight: float) -> bytes:
    """Encrypt ``weight * delta`` (weight: the device's sample count, > 0) as an update."""
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise EncodeError(f"weight must be a finite number > 0, got {weight!r}")
    flat = flatten(delta) * float(weight)
    parts = _serialize(_encrypt(keys, flat))
    return write_payload(KIND_UPDATE, keys.key_id, float(weight), 1, flat.size, parts)


def decrypt(
    keys: HeKeys, data: bytes, shapes: Mapping[str, Sequence[int]], *, kind: int
) -> dict[str, np.ndarray]:
    """Decrypt a payload into float32 tensors of ``shapes`` (mapping order, C order): a model
    as its weights, a sum as the weighted MEAN (sum / W), an update as weight * delta."""
    if not keys.has_secret:
        raise HeError("no_secret_key", "this key file holds no secret key: only devices decrypt")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    payload = read_payload(data, keys, kind=kind, values=sum(sizes.values()))
    flat = np.concatenate(
        [np.asarray(v.decrypt(), np.float64) for v in _load_vectors(keys, payload)]
    )
    if kind == KIND_SUM:
        flat = flat / payload.weight
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes.items():
        out[name] = flat[offset : offset + sizes[name]].astype(np.float32).reshape(tuple(shape))
        offset += sizes[name]
    return out


def decrypt_model(
    keys: HeKeys, data: bytes, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """The global model's weights from an encrypted model (the retained global under HE)."""
    return decrypt(keys, data, shapes, kind=KIND_MODEL)


def decrypt_mean(
    keys: HeKeys, data: bytes, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """The round's weighted mean delta, sum / W, from an encrypted sum."""
    return decrypt(keys, data, shapes, kind=KIND_SUM)


# -- aggregator side --------------------------------------------------------------------------


def encrypt_model(keys: HeKeys, weights: Mapping[str, np.ndarray]) -> bytes:
    """E_0: the initial (public) model encrypted under the public key, at the model level."""
    flat = flatten(weights)
    vectors = [v * 1.0 for v in _encrypt(keys, flat)]  # one rescale: the model level
    return write_payload(KIND_MODEL, keys.key_id, 0.0, 0, flat.size, _serialize(vectors))


@dataclass(eq=False)
class CheckedUpdate:
    """An update ``HeSum.check`` passed: its weight and its loaded ciphertexts."""

    weight: float
    vectors: list[Any]
    used: bool = False


class HeSum:
    """The running sum of one round's encrypted updates, folded in as they arrive (memory: one
    model's worth of ciphertexts, not one per device). Needs no secret key.

    ``add`` checks the whole payload before it touches the sum, so a rejected update leaves
    the sum as it was.
    """

    def __init__(self, keys: HeKeys, values: int) -> None:
        if not 1 <= values <= MAX_VALUES:
            raise ValueError(f"values must be in [1, {MAX_VALUES}], got {values}")
        self.keys = keys
        self.values = values
        self.count = 0
        self.weight = 0.0
        self._vectors: list[Any] | None = None

    def add(self, data: bytes, *, weight: float | None = None) -> float:
        """Fold one update in; return its weight. ``weight``, when given (the sample count the
        update's header declares), must equal the payload's: HE cannot re-weight or clip."""
        checked = self.check(data, weight=weight)
        self.add_checked(checked)
        return checked.weight

    def check(self, data: bytes, *, weight: float | None = None) -> CheckedUpdate:
        """Everything ``add`` checks, without touching the sum: the update, ready to fold in
        with ``add_checked`` (once it is kept, say)."""
        payload = read_payload(data, self.keys, kind=KIND_UPDATE, values=self.values)
        if weight is not None and payload.weight != float(weight):
            raise HeError(
                "bad_weight", f"payload weight {payload.weight!r}, header says {weight!r}"
            )
        return CheckedUpdate(payload.weight, _load_vectors(self.keys, payload))

    def add_checked(self, checked: CheckedUpdate) -> None:
        """Fold in an update ``check`` passed (each one once)."""
        if checked.used:
            raise ValueError("this update is already in a sum")
        checked.used = True
        self._fold(checked.vectors)
        self.count += 1
        self.weight += checked.weight

    def add_sum(self, data: bytes) -> None:
        """Fold in another sum of the same round (a shard worker's partial sum, a "sum"
        payload): its updates, weight and count join this one's."""
        payload = read_payload(data, self.keys, kind=KIND_SUM, values=self.values)
        self._fold(_load_vectors(self.keys, payload))
        self.count += payload.count
        self.weight += payload.weight

    def _fold(self, vectors: list[Any]) -> None:
        if self._vectors is None:
            self._vectors = vectors
        else:
            for acc, vec in zip(self._vectors, vectors, strict=True):
                acc.add_(vec)

    def add_zero(self, weight: float) -> None:
        """Count a device that trained but did not upload (a skip notice with its sample
        count) as a zero delta: its weight joins W, nothing joins the sum."""
        if not (math.isfinite(weight) and weight > 0):
            raise HeError("bad_weight", f"weight {weight!r}")
        self.weight += float(weight)

    def to_bytes(self) -> bytes:
        """The encrypted sum with its total weight W and count: a "sum" payload."""
        if self._vectors is None:
            raise ValueError("no update was added to this sum (a round of skips only)")
        return write_payload(
            KIND_SUM,
            self.keys.key_id,
            self.weight,
            self.count,
            self.values,
            _serialize(self._vectors),
        )


def apply_sum(
    keys: HeKeys, model: bytes, total: bytes, values: int, server_lr: float = 1.0
) -> bytes:
    """E_t = E_{t-1} + server_lr * S / W: the next encrypted global model, from the previous
    one and a round's encrypted sum, both of ``values`` values (the model's parameter count).
    One plaintext product and one rescale per ciphertext; no secret key."""
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be a finite number > 0, got {server_lr!r}")
    previous = _load_vectors(keys, read_payload(model, keys, kind=KIND_MODEL, values=values))
    sums = read_payload(total, keys, kind=KIND_SUM, values=values)
    step = _load_vectors(keys, sums)
    factor = server_lr / sums.weight
    for acc, vec in zip(previous, step, strict=True):
        acc.add_(vec * factor)
    return write_payload(KIND_MODEL, keys.key_id, 0.0, 0, values, _serialize(previous))


# -- over MQTT: one uint8 tensor in the envelope ----------------------------------------------


def as_tensors(payload: bytes) -> dict[str, np.ndarray]:
    """A payload (update or model) as the envelope's tensors: one uint8 tensor, HE_TENSOR."""
    return {HE_TENSOR: np.frombuffer(payload, np.uint8)}


def from_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The payload of ``as_tensors``; HeError("wrong_kind") for anything else."""
    if not is_encrypted(tensors):
        names = ", ".join(sorted(tensors)[:4]) or "none"
        raise HeError("wrong_kind", f"want one uint8 tensor {HE_TENSOR!r}, got {names}")
    array = np.asarray(tensors[HE_TENSOR])
    if array.ndim != 1:
        raise HeError("wrong_kind", f"tensor {HE_TENSOR!r} of shape {array.shape}, want 1-D")
    return array.tobytes()


def upload_estimate(values: int, params: HeParams | None = None) -> int:
    """At most the bytes of an encrypted update of ``values`` values (before the envelope):
    a ciphertext costs the same whatever it holds, about 235 kB at the default parameters."""
    params = params or HeParams()
    fresh = len(params.coeff_mod_bit_sizes) - 1
    per = _LEN.size + params.ciphertext_bound(fresh)
    return _HEAD.size + n_ciphertexts(max(1, values), params.slots) * per
