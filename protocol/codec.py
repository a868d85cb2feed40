"""Tensor codec: ``{"dtype": "<f4", "shape": [..], "data": <bytes>}`` in msgpack.

Little-endian numeric and bool dtypes only; object, string and void dtypes are
rejected, and every size is bounded before any memory is allocated.
"""

from __future__ import annotations

import functools
import io
import math
import struct
from typing import Any

import msgpack
import numpy as np

from protocol.errors import InvalidInput

DTYPES = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)
MAX_NDIM = 8


@functools.lru_cache(maxsize=256)  # every tensor of every call asks; dtypes are few (errors are not cached)
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
    if not isinstance(data, bytes | memoryview):
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


MAX_NAME_CHARS = 256  # input names, dtype strings, map keys in a tensor body


def _kind(first_byte: int) -> str:
    """The msgpack family of a value from its first byte (spec: msgpack/spec.md, "Formats")."""
    if first_byte <= 0x7F or first_byte >= 0xE0 or 0xCC <= first_byte <= 0xD3:
        return "int"
    if first_byte <= 0x8F or first_byte in (0xDE, 0xDF):
        return "map"
    if first_byte <= 0x9F or first_byte in (0xDC, 0xDD):
        return "array"
    if first_byte <= 0xBF or 0xD9 <= first_byte <= 0xDB:
        return "str"
    if 0xC4 <= first_byte <= 0xC6:
        return "bin"
    return "other"  # nil, bool, float, ext, never-used: nothing a tensor body holds


_ATOMS = ("str", "int", "other")
_BIN_LENGTH = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}  # bin 8/16/32: header byte, then the length


class _BodyReader:
    """Walks a tensor body value by value, checking each type before msgpack builds anything.

    A generic ``unpackb`` would build whatever the bytes describe: 15 MB of nested
    empty arrays becomes a billion bytes of Python lists. Here only the shapes the
    schema allows are ever decoded, and tensor data stays a view into the payload, so
    decoding allocates next to nothing beyond the entry itself.
    """

    def __init__(self, payload: bytes, max_bytes: int, max_str_chars: int = MAX_NAME_CHARS) -> None:
        self.payload, self.max_bytes, self.max_str_chars = payload, max_bytes, max_str_chars
        self._start_at(0)

    def _start_at(self, offset: int) -> None:
        """Read on from ``offset`` (a BytesIO of bytes shares them: no copy of the payload)."""
        stream = io.BytesIO(self.payload)
        stream.seek(offset)
        self.base = offset
        self.unpacker = msgpack.Unpacker(
            stream, raw=False, read_size=min(len(self.payload), 1 << 16) or 1,
            max_buffer_size=1 << 20, max_str_len=self.max_str_chars, max_bin_len=self.max_bytes,
            max_array_len=MAX_NDIM, max_map_len=64, max_ext_len=0, strict_map_key=True)

    def tell(self) -> int:
        """Offset of the next value in the payload."""
        offset: int = self.base + self.unpacker.tell()
        return offset

    def _expect(self, kind: str, what: str) -> None:
        offset = self.tell()
        if offset >= len(self.payload):
            raise InvalidInput(f"msgpack ends before {what}")
        found = _kind(self.payload[offset])
        if found != kind:
            raise InvalidInput(f"{what} must be a msgpack {kind}, found {found}")

    def header(self, kind: str, what: str, limit: int) -> int:
        """A map's or array's length, at most ``limit``."""
        self._expect(kind, what)
        n: int = (self.unpacker.read_map_header() if kind == "map" else self.unpacker.read_array_header())
        if n > limit:
            raise InvalidInput(f"{what} has {n} items; at most {limit}")
        return n

    def scalar(self, kind: str, what: str) -> Any:
        """One str or int."""
        self._expect(kind, what)
        return self.unpacker.unpack()

    def kind(self, what: str) -> str:
        """The msgpack family of the next value."""
        offset = self.tell()
        if offset >= len(self.payload):
            raise InvalidInput(f"msgpack ends before {what}")
        return _kind(self.payload[offset])

    def atom(self, what: str) -> Any:
        """One str, int, float, bool or nil: a value that holds no other."""
        found = self.kind(what)
        if found not in _ATOMS:
            raise InvalidInput(f"{what} must be a str or a number, found {found}")
        return self.unpacker.unpack()

    def skip(self) -> None:
        """Step over one value without building it (a reply key this version does not know)."""
        self.unpacker.skip()

    def data(self, what: str, max_bytes: int) -> memoryview:
        """A bin's bytes as a view into the payload (no copy), its length checked from the header."""
        self._expect("bin", what)
        offset = self.tell()
        fmt = _BIN_LENGTH[self.payload[offset]]
        start = offset + 1 + struct.calcsize(fmt)
        (length,) = struct.unpack_from(fmt, self.payload, offset + 1)
        if length > max_bytes or start + length > len(self.payload):
            raise InvalidInput(f"{what} of {length} bytes is over the limit or past the end")
        self._start_at(start + length)  # skip the data without reading it through msgpack
        return memoryview(self.payload)[start:start + length]

    def finish(self) -> None:
        """Nothing may follow the body."""
        if self.tell() != len(self.payload):
            raise InvalidInput("trailing bytes after the msgpack body")


# A payload this small builds little whatever it describes (at most one Python object per byte:
# a few MB for a hostile one), so msgpack's C code unpacks it whole and the schema is checked on
# the result: a few microseconds where the walk takes tens. Anything larger, and anything the
# check refuses, is walked (:class:`_BodyReader`), which also words every error.
FAST_MAX_BYTES = 64 * 1024


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map from msgpack, refusing a repeated key (the walk refuses it too, with its message)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a map repeats a key")
    return found


def unpack_small(payload: bytes, max_str_chars: int = MAX_NAME_CHARS) -> Any:
    """``payload`` unpacked whole if it is small and plain msgpack; None otherwise (walk it). Nothing
    in it is checked against a schema: the caller does that."""
    if len(payload) > FAST_MAX_BYTES:
        return None
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_no_ext, timestamp=0,
                               object_pairs_hook=_pairs, max_str_len=max_str_chars,
                               max_bin_len=FAST_MAX_BYTES, max_ext_len=0)
    except Exception:  # anything at all: the walk decides, and says why
        return None


def is_atom(value: Any) -> bool:
    """A msgpack scalar: nil, a string or a number."""
    return value is None or isinstance(value, str | int | float)  # bool is an int


def _plain_tensor(tensor: Any, max_bytes: int) -> bool:
    """A tensor map the walk would return as is: known keys, a str dtype, ints for the shape."""
    if not isinstance(tensor, dict) or not set(tensor) <= {"dtype", "shape", "data"}:
        return False
    dtype, shape, data = tensor.get("dtype", ""), tensor.get("shape", []), tensor.get("data", b"")
    return (isinstance(dtype, str) and isinstance(data, bytes) and len(data) <= max_bytes
            and isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(isinstance(d, int) and not isinstance(d, bool) for d in shape))


def _plain_tensors(body: Any, max_bytes: int, max_tensors: int) -> bool:
    return isinstance(body, dict) and len(body) <= max_tensors and all(
        isinstance(name, str) and _plain_tensor(t, max_bytes) for name, t in body.items())


def unpack_tensors(payload: bytes, *, max_bytes: int, max_tensors: int) -> dict[str, dict[str, Any]]:
    """A request's ``inputs`` body: ``{name: {dtype, shape, data}}``, decoded under the schema only.

    Returns the wire maps for :func:`decode_tensor`; anything else raises ``InvalidInput``
    before it is built.
    """
    if len(payload) > max_bytes:
        raise InvalidInput(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    body = unpack_small(payload, MAX_NAME_CHARS)
    if _plain_tensors(body, max_bytes, max_tensors):
        return body  # type: ignore[no-any-return]
    reader = _BodyReader(payload, max_bytes)
    try:
        body = {}
        for _ in range(reader.header("map", "inputs", max_tensors)):
            name = reader.scalar("str", "an input name")
            body[name] = _tensor_map(reader, name, max_bytes)
        reader.finish()
    except (ValueError, msgpack.UnpackException) as e:  # limits hit inside msgpack itself
        raise InvalidInput(f"malformed msgpack: {e}") from e
    return body


def _tensor_map(reader: _BodyReader, name: str, max_bytes: int) -> dict[str, Any]:
    tensor: dict[str, Any] = {}
    for _ in range(reader.header("map", f"tensor {name!r}", 3)):
        key = reader.scalar("str", f"a key of tensor {name!r}")
        if key in tensor:
            raise InvalidInput(f"tensor {name!r} repeats {key!r}")
        if key == "dtype":
            tensor[key] = reader.scalar("str", f"{name!r} dtype")
        elif key == "shape":
            n = reader.header("array", f"{name!r} shape", MAX_NDIM)
            tensor[key] = [reader.scalar("int", f"{name!r} shape") for _ in range(n)]
        elif key == "data":
            tensor[key] = reader.data(f"{name!r} data", max_bytes)
        else:
            raise InvalidInput(f"tensor {name!r} has unknown key {key!r}")
    return tensor


MAX_REPLY_KEYS = 64
MAX_REPLY_ROWS = 1 << 16  # labels / confidences: one per row of the request
MAX_MESSAGE_CHARS = 1 << 16  # an error message
MAX_REPLY_TIMINGS = 32  # entries of a reply's timings (or error) map


def unpack_reply(payload: bytes, *, max_bytes: int, max_tensors: int) -> dict[str, Any]:
    """A reply map, walked key by key under the reply schema before anything is built.

    Scalars, ``outputs`` (tensor maps, data left in the payload), ``timings``,
    ``label`` / ``confidence`` (one per row) and ``error`` are read with their own
    bounds; an unknown key's value is stepped over unbuilt. A crafted reply (a header
    claiming 2^32 items, deep nesting, a huge string) is refused at its header.
    """
    if len(payload) > max_bytes:
        raise InvalidInput(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    plain = _plain_reply(unpack_small(payload, MAX_MESSAGE_CHARS), max_bytes, max_tensors)
    if plain is not None:
        return plain
    reader = _BodyReader(payload, max_bytes, MAX_MESSAGE_CHARS)
    try:
        reply: dict[str, Any] = {}
        for _ in range(reader.header("map", "a reply", MAX_REPLY_KEYS)):
            key = reader.scalar("str", "a reply key")
            if key in _REPLY_KEYS:
                reply[key] = _reply_value(reader, key, max_bytes, max_tensors)
            else:
                reader.skip()  # replies may gain keys within a version
        reader.finish()
    except (ValueError, msgpack.UnpackException) as e:  # limits hit inside msgpack itself
        raise InvalidInput(f"malformed msgpack: {e}") from e
    return reply


_REPLY_ATOMS = frozenset({"v", "id", "ok", "model", "version", "worker", "variant"})
_REPLY_KEYS = _REPLY_ATOMS | {"outputs", "timings", "error", "label", "confidence"}


def _plain_reply(obj: Any, max_bytes: int, max_tensors: int) -> dict[str, Any] | None:
    """The reply the walk would return for ``obj`` when every known key holds what the schema
    says; None when anything does not (the walk then decides, and words the error)."""
    if not isinstance(obj, dict) or len(obj) > MAX_REPLY_KEYS or not all(isinstance(k, str) for k in obj):
        return None
    reply = {k: v for k, v in obj.items() if k in _REPLY_KEYS}
    for key, value in reply.items():
        if key in _REPLY_ATOMS:
            ok = is_atom(value)
        elif key == "outputs":
            ok = _plain_tensors(value, max_bytes, max_tensors)
        elif key in ("timings", "error"):
            ok = isinstance(value, dict) and len(value) <= MAX_REPLY_TIMINGS and all(
                isinstance(k, str) and is_atom(v) for k, v in value.items())
        else:  # label, confidence: one atom per row
            ok = isinstance(value, list) and len(value) <= MAX_REPLY_ROWS and all(map(is_atom, value))
        if not ok:
            return None
    return reply


class Unread:
    """Stands for a reply value of the wrong kind, stepped over unbuilt: the schema check that
    follows reports it (with the request id, once that is read)."""

    def __repr__(self) -> str:
        return "<unread value>"


_CONTAINERS = {"outputs": "map", "timings": "map", "error": "map", "label": "array", "confidence": "array"}


def _reply_value(reader: _BodyReader, key: str, max_bytes: int, max_tensors: int) -> Any:
    found = reader.kind(repr(key))
    if key in _CONTAINERS and found != _CONTAINERS[key]:
        if found in _ATOMS:
            return reader.unpacker.unpack()
        reader.skip()
        return Unread()
    if key == "outputs":
        outputs: dict[str, Any] = {}
        for _ in range(reader.header("map", "outputs", max_tensors)):
            name = reader.scalar("str", "an output name")
            outputs[name] = _tensor_map(reader, name, max_bytes)
        return outputs
    if key in ("timings", "error"):
        n = reader.header("map", key, MAX_REPLY_TIMINGS)
        return {reader.scalar("str", f"a key of {key}"): reader.atom(f"a value of {key}") for _ in range(n)}
    if key in ("label", "confidence"):
        return [reader.atom(f"a {key}") for _ in range(reader.header("array", key, MAX_REPLY_ROWS))]
    return reader.atom(repr(key))


def pack(obj: Any) -> bytes:
    """Encode msgpack (bin type for bytes, str for text)."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed
