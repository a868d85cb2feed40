"""Tensor codec: ``{"dtype": "<f4", "shape": [..], "data": <bytes>}`` in msgpack.

Little-endian numeric and bool dtypes only; object, string and void dtypes are
rejected, and every size is bounded before any memory is allocated.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from protocol.errors import InvalidInput

DTYPES = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)
MAX_NDIM = 8


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype (``float32`` → ``<f4``)."""
    dt = np.dtype(dtype)
    name = dt.str if dt.itemsize == 1 else dt.newbyteorder("<").str
    if name not in DTYPES:
        raise InvalidInput(f"unsupported dtype {np.dtype(dtype)} (wire {name!r})")
    return name


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """A numpy array as the wire map; big-endian input is converted, not rejected."""
    array = np.asarray(array)
    name = dtype_name(array.dtype)
    data = np.ascontiguousarray(array, dtype=np.dtype(name)).tobytes()
    return {"dtype": name, "shape": list(array.shape), "data": data}


def decode_tensor(obj: Any, *, max_bytes: int) -> np.ndarray:
    """The wire map as a read-only numpy array; anything malformed raises ``InvalidInput``."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise InvalidInput("tensor must be a map with exactly dtype, shape, data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidInput(f"unsupported tensor dtype {dtype!r}; allowed: {sorted(DTYPES)}")
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise InvalidInput(f"tensor shape must be a list of at most {MAX_NDIM} ints")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"tensor shape {shape!r} must hold non-negative ints")
    if not isinstance(data, bytes):
        raise InvalidInput("tensor data must be msgpack bin")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if expected > max_bytes:
        raise InvalidInput(f"tensor of {expected} bytes exceeds the {max_bytes}-byte limit")
    if len(data) != expected:
        raise InvalidInput(f"tensor data is {len(data)} bytes; shape {shape} {dtype} needs {expected}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def _no_ext(code: int, data: bytes) -> Any:
    raise InvalidInput(f"msgpack extension type {code} is not allowed")


def unpack(payload: bytes, *, max_bytes: int) -> Any:
    """Decode msgpack with every container and string bounded; ext types rejected."""
    if len(payload) > max_bytes:
        raise InvalidInput(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            timestamp=0,
            max_bin_len=max_bytes,
            max_str_len=1 << 16,
            max_array_len=1 << 12,
            max_map_len=256,
            max_ext_len=64,
        )
    except InvalidInput:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise InvalidInput(f"malformed msgpack: {e}") from e


def pack(obj: Any) -> bytes:
    """Encode msgpack (bin type for bytes, str for text)."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed
