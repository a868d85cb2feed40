"""Values as Redis returns them: ``bytes`` from a plain client, ``str`` with ``decode_responses``."""

from __future__ import annotations

from collections.abc import Mapping


def text(value: bytes | str | int | float) -> str:
    """``value`` as ``str`` (UTF-8 for bytes; ``str()`` for numbers)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_dict(data: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash as HGETALL returns it, with keys and values as ``str``."""
    return {text(k): text(v) for k, v in data.items()}


def int_or_none(value: str | None) -> int | None:
    """``int(value)``, or ``None`` for a missing or empty field."""
    return int(value) if value else None
