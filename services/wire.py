"""What travels on the wire besides plain messages: tensors and structured error details.

Tensors: ``torch.Tensor`` <-> ``ola.common.v1.Tensor`` (dtype + shape + raw little-endian bytes). A receiver must not
trust the sender: ``tensor_from_proto`` checks the dtype, the shape and the byte count and raises ``ValueError``
naming the field (servers map it to INVALID_ARGUMENT).

Errors: a failed call's status carries an ``ola.common.v1.ErrorDetail`` in the trailing metadata key
``ola-error-detail-bin``; ``error_metadata`` builds it, ``read_error_detail`` reads it back on the client.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import numpy as np
import torch

from services.gen.ola.common.v1 import errors_pb2, tensor_pb2

Tensor = tensor_pb2.Tensor
DType = tensor_pb2.DType

# torch dtype <-> wire dtype, with the little-endian numpy dtype used for the bytes (bf16 travels as its raw 16 bits).
_TORCH_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_WIRE_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in _TORCH_TO_WIRE.items()}
_NUMPY_LE: dict[torch.dtype, str] = {
    torch.float32: "<f4",
    torch.bfloat16: "<u2",
    torch.float16: "<f2",
    torch.float64: "<f8",
    torch.int64: "<i8",
    torch.int32: "<i4",
    torch.int16: "<i2",
    torch.int8: "i1",
    torch.uint8: "u1",
    torch.bool: "?",
}


def wire_dtype(dtype: torch.dtype) -> int:
    """The ``DType`` enum value of a torch dtype; ``ValueError`` for one the wire does not carry."""
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; supported: {sorted(map(str, _TORCH_TO_WIRE))}") from None


def torch_dtype(dtype: int, field: str = "tensor") -> torch.dtype:
    """The torch dtype of a ``DType`` enum value; ``ValueError`` naming ``field`` if unset or unknown."""
    if dtype not in _WIRE_TO_TORCH:
        name = DType.Name(dtype) if dtype in DType.values() else str(dtype)
        raise ValueError(f"{field}.dtype is {name}; expected one of {sorted(DType.Name(v) for v in _WIRE_TO_TORCH)}")
    return _WIRE_TO_TORCH[dtype]


def tensor_to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Serialize a tensor of any shape (copied to CPU, contiguous, little-endian; bf16 kept bit-exact)."""
    dtype = wire_dtype(t.dtype)
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16: ship its 16 bits
    array = raw.numpy()
    if t.dtype == torch.bfloat16:
        array = array.view(np.uint16)
    array = array.astype(np.dtype(_NUMPY_LE[t.dtype]), copy=False)  # byte-swaps only on a big-endian host
    return tensor_pb2.Tensor(dtype=dtype, shape=list(t.shape), data=array.tobytes())


def tensor_from_proto(p: tensor_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """Deserialize a tensor, checking dtype, shape and byte count; ``field`` names it in errors.

    Returns a new, writable CPU tensor of the wire dtype and shape.
    """
    dtype = torch_dtype(p.dtype, field)
    shape = list(p.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{field}.shape {shape} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if len(p.data) != numel * itemsize:
        raise ValueError(
            f"{field}.data has {len(p.data)} bytes but dtype {DType.Name(p.dtype)} and shape {shape} "
            f"need {numel * itemsize}"
        )
    array = np.frombuffer(p.data, dtype=np.dtype(_NUMPY_LE[dtype]), count=numel)
    if sys.byteorder != "little":
        array = array.astype(array.dtype.newbyteorder("="))
    out = torch.from_numpy(array.copy()).reshape(shape)  # copy: protobuf bytes are immutable
    if dtype == torch.bfloat16:
        out = out.view(torch.int16).view(torch.bfloat16)
    return out


# ----------------------------------------------------------------------------------------------------- error details
ERROR_DETAIL_KEY = "ola-error-detail-bin"  # trailing metadata key of a serialized ola.common.v1.ErrorDetail


def error_detail(
    reason: int, message: str, field: str = "", value: float = 0.0, limit: float = 0.0, unit: str = ""
) -> errors_pb2.ErrorDetail:
    """An ``ErrorDetail`` (``reason`` is an ``ErrorReason`` value such as ``errors_pb2.ERROR_REASON_INVALID_FIELD``)."""
    return errors_pb2.ErrorDetail(reason=reason, field=field, value=value, limit=limit, unit=unit, message=message)


def error_metadata(detail: errors_pb2.ErrorDetail) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying ``detail`` (pass to ``context.set_trailing_metadata`` before aborting)."""
    return ((ERROR_DETAIL_KEY, detail.SerializeToString()),)


def read_error_detail(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> errors_pb2.ErrorDetail | None:
    """The ``ErrorDetail`` in a failed call's trailing metadata (``rpc_error.trailing_metadata()``), if any."""
    for key, value in trailing_metadata or ():
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            return errors_pb2.ErrorDetail.FromString(value)
    return None
