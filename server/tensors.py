"""KServe v2 tensors <-> numpy: datatypes, raw contents, BYTES framing.

The stock `tritonclient.grpc` client sends every input as `raw_input_contents[i]` (little-endian,
row-major) and reads `raw_output_contents`; BYTES elements are framed as a 4-byte little-endian
length followed by the bytes. The typed `contents` fields are accepted too.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from glm_image_onnx.server.errors import invalid, no_shared_memory
from glm_image_onnx.server.limits import ComponentLimits

if TYPE_CHECKING:
    from tritonclient.grpc import service_pb2

# The KServe datatypes this server carries, as numpy dtypes (tritonclient's table; little-endian on
# the wire); BYTES is an object array of `bytes`. BF16 is described (Triton repositories) but not
# carried: numpy has no bfloat16 of its own.
NUMPY = {name: np.dtype(triton_to_np_dtype(name)).newbyteorder("<") for name in (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES")}
# KServe datatype -> Triton model config DataType name
CONFIG_TYPE = {k: f"TYPE_{k}" for k in NUMPY if k != "BYTES"} | {"BYTES": "TYPE_STRING", "BF16": "TYPE_BF16"}

# The typed field of InferTensorContents that carries each datatype.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def datatype_of(dtype: str | np.dtype) -> str:
    """The KServe datatype of a numpy dtype or an ONNX / manifest element type name ("float32",
    "bfloat16", "string")."""
    try:
        name = np.dtype(object if dtype == "string" else dtype)  # ml_dtypes (tritonclient's) names bfloat16
    except TypeError:
        name = None
    datatype = np_to_triton_dtype(name) if name is not None else None
    if datatype is None:
        raise ValueError(f"no KServe datatype for {dtype!r}")
    return datatype


def decode_bytes(buffer: bytes, count: int, name: str) -> np.ndarray:
    """BYTES raw contents -> object array of `count` bytes items; malformed framing is the client's error."""
    items, offset, size = [], 0, len(buffer)
    while offset < size:
        if offset + 4 > size:
            raise invalid(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > size:
            raise invalid(f"input '{name}': BYTES element of {length} bytes overruns the {size}-byte contents")
        if len(items) == count:  # stop at once: never more items than the shape declares
            raise invalid(f"input '{name}': shape holds {count} BYTES elements but the contents have more")
        items.append(bytes(buffer[offset: offset + length]))
        offset += length
    if len(items) != count:
        raise invalid(f"input '{name}': shape holds {count} BYTES elements but the contents have {len(items)}")
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def encode_bytes(items: Iterable[bytes]) -> bytes:
    parts = []
    for item in items:
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


MAX_DIMS = 16  # dimensions of one input tensor
MAX_INPUTS = 64  # input tensors of one request
DEFAULT_MAX_ELEMENTS = ComponentLimits().max_tensor_elements  # elements of one input tensor, server-wide


def element_count(shape: Sequence[int], name: str, max_elements: int = DEFAULT_MAX_ELEMENTS) -> int:
    """Elements of a declared shape, in Python integers (no int64 overflow), bounded before any decoding."""
    if len(shape) > MAX_DIMS:
        raise invalid(f"input '{name}': {len(shape)} dimensions, more than the limit of {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
    count = span = 1
    for d in shape:
        count *= int(d)
        span *= max(int(d), 1)  # a zero dimension empties the tensor, but numpy still refuses the others'
    if count > max_elements:
        raise invalid(f"input '{name}': shape {list(shape)} holds {count} elements, more than this server's "
                      f"limit of {max_elements} per tensor")
    if span > max_elements:
        raise invalid(f"input '{name}': shape {list(shape)} is empty but its other dimensions span {span} "
                      f"elements, more than this server's limit of {max_elements} per tensor")
    return count


def read_inputs(request: service_pb2.ModelInferRequest,
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """Every input of a ModelInferRequest as a numpy array of its declared shape and datatype.

    Sizes are checked against the declared shape before anything is allocated: a shape over
    `max_elements`, raw contents of the wrong length, or a BYTES length prefix that overruns the
    contents are refused (INVALID_ARGUMENT); nothing is allocated beyond what the message holds.
    """
    raw = request.raw_input_contents
    if len(request.inputs) > MAX_INPUTS:
        raise invalid(f"the request has {len(request.inputs)} inputs, more than the limit of {MAX_INPUTS}")
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in out:
            raise invalid(f"input '{name}' is given twice")
        if "shared_memory_region" in tensor.parameters:
            raise no_shared_memory(f"input '{name}'")
        if raw:
            out[name] = from_raw(name, datatype, shape, raw[i], max_elements)
        else:
            field = _CONTENTS_FIELD.get(datatype)
            if datatype in NUMPY and field is None:
                raise invalid(f"input '{name}': {datatype} must be sent as raw_input_contents")
            values = list(getattr(tensor.contents, field)) if field else []
            out[name] = from_values(name, datatype, shape, values, max_elements)
    return out


def _check_datatype(name: str, datatype: str) -> np.dtype:
    if datatype not in NUMPY:
        raise invalid(f"input '{name}': unknown datatype {datatype!r}")
    return NUMPY[datatype]


def from_raw(name: str, datatype: str, shape: list[int], buffer: bytes,
             max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """One tensor from its raw little-endian contents (BYTES: length-framed), shape checked first.
    The gRPC `raw_input_contents` and the HTTP binary-tensor extension carry the same bytes."""
    dtype = _check_datatype(name, datatype)
    count = element_count(shape, name, max_elements)
    if datatype == "BYTES":
        return decode_bytes(buffer, count, name).reshape(shape)
    if len(buffer) != count * dtype.itemsize:
        raise invalid(f"input '{name}': {datatype} shape {shape} needs {count * dtype.itemsize} bytes, "
                      f"got {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def from_values(name: str, datatype: str, shape: list[int], values: list,
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """One tensor from a flat list of Python values (gRPC typed contents, KServe JSON `data`), each
    value's type checked against the datatype: numbers for numeric types (integers for integer types),
    bools for BOOL, str / bytes for BYTES."""
    dtype = _check_datatype(name, datatype)
    count = element_count(shape, name, max_elements)
    if len(values) != count:
        raise invalid(f"input '{name}': shape {shape} holds {count} elements, contents have {len(values)}")
    if datatype == "BYTES":
        if not all(isinstance(v, (bytes, str)) for v in values):
            raise invalid(f"input '{name}': BYTES elements must be strings")
        array = np.empty(count, dtype=object)
        array[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        return array.reshape(shape)
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in values)
    elif dtype.kind == "f":
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    else:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ok:
        kind = "true/false" if datatype == "BOOL" else "numbers" if dtype.kind == "f" else "integers"
        raise invalid(f"input '{name}': {datatype} elements must be {kind}")
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError):
        raise invalid(f"input '{name}': contents out of range for {datatype}") from None


def add_output(response: service_pb2.ModelInferResponse, name: str, array: np.ndarray,
               datatype: str | None = None) -> None:
    """Append one output tensor as raw contents."""
    array = np.asarray(array)
    datatype = datatype or datatype_of(array.dtype)
    tensor = response.outputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    if datatype == "BYTES":
        response.raw_output_contents.append(encode_bytes(array.reshape(-1)))
    else:
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=NUMPY[datatype]).tobytes())


def set_parameter(params, key: str, value) -> None:
    """Set a protobuf map<string, InferParameter> entry from a Python value."""
    p = params[key]
    if isinstance(value, (bool, np.bool_)):
        p.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        p.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def parameter_value(param):
    """The Python value of an InferParameter (None when unset)."""
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)
