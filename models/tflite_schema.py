"""Read the few parts of a ``.tflite`` flatbuffer that fedge needs, in pure Python.

Only the ``flatbuffers`` package is used, so a device without LiteRT or TensorFlow
(32-bit Raspberry Pi OS has no LiteRT wheel) can still inspect a model and load its
embedded spec. The field ids come from TFLite's ``schema.fbs``; a table's field ``i``
sits at vtable offset ``4 + 2 * i``::

    table Model        { version:uint = 0; operator_codes:[OperatorCode] = 1; subgraphs = 2;
                         description = 3; buffers:[Buffer] = 4; metadata_buffer = 5;
                         metadata:[Metadata] = 6; signature_defs = 7 }
    table OperatorCode { deprecated_builtin_code:byte = 0; custom_code:string = 1;
                         version:int = 2; builtin_code:BuiltinOperator (int) = 3 }
    table Buffer       { data:[ubyte] = 0; offset:ulong = 1; size:ulong = 2 }
    table Metadata     { name:string = 0; buffer:uint = 1 }

Errors::

    ValueError
    └── ModelFileError    not a TFLite flatbuffer, or a damaged one
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

from flatbuffers import number_types as N
from flatbuffers.table import Table

FILE_IDENTIFIER = b"TFL3"

# BuiltinOperator, indexed by its value (schema.fbs numbers them 0, 1, 2, ... without gaps).
BUILTIN_OPERATORS: tuple[str, ...] = tuple(
    """
    ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE
    EMBEDDING_LOOKUP FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D
    LOCAL_RESPONSE_NORMALIZATION LOGISTIC LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU RELU_N1_TO_1
    RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX SPACE_TO_DEPTH SVDF TANH CONCAT_EMBEDDINGS
    SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD UNIDIRECTIONAL_SEQUENCE_RNN GATHER
    BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB DIV SQUEEZE
    UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE BIDIRECTIONAL_SEQUENCE_RNN EXP TOPK_V2 SPLIT
    LOG_SOFTMAX DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM ARG_MAX MINIMUM LESS NEG
    PADV2 GREATER GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV SPARSE_TO_DENSE TILE
    EXPAND_DIMS EQUAL NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW ARG_MIN FAKE_QUANT REDUCE_PROD
    REDUCE_MAX PACK LOGICAL_OR ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK REDUCE_MIN FLOOR_DIV
    REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD RANGE RESIZE_NEAREST_NEIGHBOR LEAKY_RELU
    SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL REVERSE_V2 ADD_N GATHER_ND COS WHERE
    RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE MATRIX_SET_DIAG ROUND HARD_SWISH IF WHILE
    NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM
    BATCH_MATMUL PLACEHOLDER_FOR_GREATER_OP_CODES CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D
    IMAG REAL COMPLEX_ABS HASHTABLE HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL
    CONV_3D_TRANSPOSE VAR_HANDLE READ_VARIABLE ASSIGN_VARIABLE BROADCAST_ARGS
    RANDOM_STANDARD_NORMAL BUCKETIZE RANDOM_UNIFORM MULTINOMIAL GELU DYNAMIC_UPDATE_SLICE
    RELU_0_TO_1 UNSORTED_SEGMENT_PROD UNSORTED_SEGMENT_MAX UNSORTED_SEGMENT_SUM ATAN2
    UNSORTED_SEGMENT_MIN SIGN BITCAST BITWISE_XOR RIGHT_SHIFT STABLEHLO_LOGISTIC STABLEHLO_ADD
    STABLEHLO_DIVIDE STABLEHLO_MULTIPLY STABLEHLO_MAXIMUM STABLEHLO_RESHAPE STABLEHLO_CLAMP
    STABLEHLO_CONCATENATE STABLEHLO_BROADCAST_IN_DIM STABLEHLO_CONVOLUTION STABLEHLO_SLICE
    STABLEHLO_CUSTOM_CALL STABLEHLO_REDUCE STABLEHLO_ABS STABLEHLO_AND STABLEHLO_COSINE
    STABLEHLO_EXPONENTIAL STABLEHLO_FLOOR STABLEHLO_LOG STABLEHLO_MINIMUM STABLEHLO_NEGATE
    STABLEHLO_OR STABLEHLO_POWER STABLEHLO_REMAINDER STABLEHLO_RSQRT STABLEHLO_SELECT
    STABLEHLO_SUBTRACT STABLEHLO_TANH STABLEHLO_SCATTER STABLEHLO_COMPARE STABLEHLO_CONVERT
    STABLEHLO_DYNAMIC_SLICE STABLEHLO_DYNAMIC_UPDATE_SLICE STABLEHLO_PAD STABLEHLO_IOTA
    STABLEHLO_DOT_GENERAL STABLEHLO_REDUCE_WINDOW STABLEHLO_SORT STABLEHLO_WHILE
    STABLEHLO_GATHER STABLEHLO_TRANSPOSE DILATE STABLEHLO_RNG_BIT_GENERATOR REDUCE_WINDOW
    STABLEHLO_COMPOSITE STABLEHLO_SHIFT_LEFT STABLEHLO_CBRT STABLEHLO_CASE
    """.split()  # noqa: SIM905 - 210 names as a list literal would be 210 lines
)

_UOFFSET = N.UOffsetTFlags.bytewidth


class ModelFileError(ValueError):
    """The bytes are not a TFLite flatbuffer, or a damaged one."""


def builtin_name(code: int) -> str:
    """``"FULLY_CONNECTED"`` for 9; a code newer than this table prints as its number."""
    return BUILTIN_OPERATORS[code] if 0 <= code < len(BUILTIN_OPERATORS) else str(code)


@contextmanager
def _damaged() -> Iterator[None]:
    # flatbuffers reads with struct and checks offsets with TypeError; both mean bad bytes here.
    try:
        yield
    except (struct.error, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"damaged TFLite model ({exc})") from exc


def _field(table: Table, field_id: int) -> int:
    """Where field ``field_id`` sits in ``table`` (0: absent, the schema default applies)."""
    return int(table.Offset(4 + 2 * field_id))


def _tables(table: Table, field_id: int) -> list[Table]:
    """The tables of a ``[Table]`` field, in order."""
    off = _field(table, field_id)
    if not off:
        return []
    start, count = table.Vector(off), table.VectorLen(off)
    if start + count * _UOFFSET > len(table.Bytes):
        raise ModelFileError(f"damaged TFLite model (a vector of {count} runs past the end)")
    return [Table(table.Bytes, table.Indirect(start + i * _UOFFSET)) for i in range(count)]


def _string(table: Table, field_id: int) -> str | None:
    off = _field(table, field_id)
    return table.String(table.Pos + off).decode() if off else None


def _scalar(table: Table, field_id: int, flags: type, default: int = 0) -> int:
    off = _field(table, field_id)
    return int(table.Get(flags, table.Pos + off)) if off else default


class ModelReader:
    """A read-only view of one model's operator codes, metadata entries and buffers."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
            raise ModelFileError("not a TFLite model (missing TFL3 identifier)")
        self._data = bytes(data)
        with _damaged():
            root = Table(self._data, int.from_bytes(self._data[:4], "little"))
            self._op_codes = _tables(root, 1)
            self._buffers = _tables(root, 4)
            self._metadata = _tables(root, 6)

    def operator_codes(self) -> list[tuple[int, str | None]]:
        """(builtin code, custom code) of every operator code, in the model's order.

        Builtin codes above 127 live only in ``builtin_code``; older files set only
        ``deprecated_builtin_code``. The larger of the two is the operator.
        """
        codes = []
        with _damaged():
            for oc in self._op_codes:
                deprecated = _scalar(oc, 0, N.Int8Flags)
                builtin = _scalar(oc, 3, N.Int32Flags)
                codes.append((max(builtin, deprecated), _string(oc, 1)))
        return codes

    def metadata(self) -> list[tuple[str | None, int]]:
        """(name, buffer index) of every metadata entry, in the model's order."""
        with _damaged():
            return [(_string(m, 0), _scalar(m, 1, N.Uint32Flags)) for m in self._metadata]

    def buffer(self, index: int) -> bytes:
        """The bytes of buffer ``index`` (inline, or after the flatbuffer in files over 2 GB)."""
        if not 0 <= index < len(self._buffers):
            raise ModelFileError(
                f"damaged TFLite model (buffer {index} of {len(self._buffers)} buffers)"
            )
        buf = self._buffers[index]
        with _damaged():
            offset = _scalar(buf, 1, N.Uint64Flags)
            if offset > 1:  # 0 and 1 mean "inline" in schema.fbs
                size = _scalar(buf, 2, N.Uint64Flags)
                if offset + size > len(self._data):
                    raise ModelFileError("damaged TFLite model (a buffer runs past the end)")
                return self._data[offset : offset + size]
            off = _field(buf, 0)
            if not off:
                return b""
            start, count = buf.Vector(off), buf.VectorLen(off)
            if start + count > len(self._data):
                raise ModelFileError("damaged TFLite model (a buffer runs past the end)")
            return self._data[start : start + count]
