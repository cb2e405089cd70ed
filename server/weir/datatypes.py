"""The V2 datatypes: their names, element sizes, numpy dtypes and typed-contents fields.

BF16 has no numpy dtype; Weir carries BF16 tensors as uint16 bit patterns and reinterprets them
as ``torch.bfloat16`` at the backend. BYTES tensors are numpy object arrays of ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataType:
    name: str  # the V2 name used on the wire, e.g. "FP32"
    config_name: str  # the config.pbtxt enum name, e.g. "TYPE_FP32"
    numpy_dtype: np.dtype  # little-endian; object for BYTES
    element_size: int  # bytes per element in raw form; 0 for BYTES (variable)
    contents_field: str | None  # InferTensorContents field; None = raw only (FP16, BF16)


def _little_endian(code: str) -> np.dtype:
    return np.dtype(code).newbyteorder("<")


_ALL = (
    DataType("BOOL", "TYPE_BOOL", np.dtype(np.bool_), 1, "bool_contents"),
    DataType("UINT8", "TYPE_UINT8", np.dtype(np.uint8), 1, "uint_contents"),
    DataType("UINT16", "TYPE_UINT16", _little_endian("u2"), 2, "uint_contents"),
    DataType("UINT32", "TYPE_UINT32", _little_endian("u4"), 4, "uint_contents"),
    DataType("UINT64", "TYPE_UINT64", _little_endian("u8"), 8, "uint64_contents"),
    DataType("INT8", "TYPE_INT8", np.dtype(np.int8), 1, "int_contents"),
    DataType("INT16", "TYPE_INT16", _little_endian("i2"), 2, "int_contents"),
    DataType("INT32", "TYPE_INT32", _little_endian("i4"), 4, "int_contents"),
    DataType("INT64", "TYPE_INT64", _little_endian("i8"), 8, "int64_contents"),
    DataType("FP16", "TYPE_FP16", _little_endian("f2"), 2, None),
    DataType("FP32", "TYPE_FP32", _little_endian("f4"), 4, "fp32_contents"),
    DataType("FP64", "TYPE_FP64", _little_endian("f8"), 8, "fp64_contents"),
    DataType("BF16", "TYPE_BF16", _little_endian("u2"), 2, None),
    DataType("BYTES", "TYPE_STRING", np.dtype(object), 0, "bytes_contents"),
)

BY_NAME: dict[str, DataType] = {datatype.name: datatype for datatype in _ALL}
BY_CONFIG_NAME: dict[str, DataType] = {datatype.config_name: datatype for datatype in _ALL}
NAMES = tuple(BY_NAME)

# Every backend Weir runs hands BYTES inputs to the model as text (TorchScript and torch.export
# models take List[str]; TensorRT takes no BYTES), so a BYTES element that is not UTF-8 is the
# client's error: the data plane refuses it while decoding, before the request can share a batch.
BYTES_INPUTS_ARE_TEXT = True
