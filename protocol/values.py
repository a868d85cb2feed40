"""Values as Redis returns them: ``bytes`` from a plain client, ``str`` with ``decode_responses``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

    # Stream entry or hash fields as redis-py's XADD and HSET take them. Its parameter is a
    # dict (invariant in the key), so a ``dict[str, str]`` is not accepted where this is.
    Fields: TypeAlias = dict[FieldT, EncodableT]
    # A hash as HGETALL returns it: bytes from a plain client, str with ``decode_responses``.
    RawHash: TypeAlias = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]
    # XRANGE / XREVRANGE rows from a plain (bytes) client. redis-py's own type also allows str,
    # for decode_responses clients, and None, for entries deleted under XCLAIM.
    StreamRows: TypeAlias = list[tuple[bytes, dict[bytes, bytes]]]


def text(value: bytes | str | int | float) -> str:
    """``value`` as ``str`` (UTF-8 for bytes; ``str()`` for numbers)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_dict(data: RawHash) -> dict[str, str]:
    """A hash as HGETALL returns it, with keys and values as ``str``."""
    return {text(k): text(v) for k, v in data.items()}


def int_or_none(value: str | None) -> int | None:
    """``int(value)``, or ``None`` for a missing or empty field."""
    return int(value) if value else None
