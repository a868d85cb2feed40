"""Control-channel commands: JSON on the ``ss:control`` pub/sub channel.

A command is a nudge; the registry stays the source of truth. A worker that
missed one still converges, because it re-reads the registry periodically.

    {"command": "reload", "model": "hybrid_cnn_lstm", "version": 4, "id": "…", "sent_ms": …, "sig": "…"}

Decoding is strict: at most ``MAX_CONTROL_BYTES``, checked before parsing; a
JSON object with no unknown or duplicate keys; every field of its exact type
(``true`` is not an integer). With a shared secret, a publisher adds ``sig``,
the hex HMAC-SHA256 of :meth:`Command.canonical`, and a :class:`Verifier`
drops unsigned, badly signed, stale (``sent_ms`` off by more than
``max_age_ms``) and replayed (same ``id``) commands. docs/security.md has the
trust model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeGuard

from pydantic import SecretStr

from protocol.errors import InvalidInput
from protocol.keys import check_model_name

COMMANDS = frozenset({"reload"})
MAX_CONTROL_BYTES = 1024  # a signed reload is under 300 bytes
DEFAULT_MAX_AGE_MS = 30_000  # publisher and worker clocks must agree within this
MAX_SEEN_IDS = 4096  # replay memory; far more than the signed commands of one max_age window
SIGNATURE_CONTEXT = b"streamserve-control-v1\n"  # a control HMAC is never valid for anything else
_MAX_INT = 2**63 - 1
_ID = re.compile(r"[A-Za-z0-9_\-]{0,64}")
_SIG = re.compile(r"[0-9a-f]{64}")
_REQUIRED = ("command", "model")

Secret = SecretStr | str | bytes


class Unauthenticated(InvalidInput):
    """A control message that is unsigned, badly signed, stale or replayed while a secret is set."""


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= _MAX_INT  # type() is: bool is an int subclass


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _matches(pattern: re.Pattern[str]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, str) and bool(pattern.fullmatch(value))


def _is_version(value: object) -> bool:
    return value is None or (_is_int(value) and value >= 1)


# field → (check, what the check wants, for the error message)
_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "command": (_is_str, "a string"),
    "model": (_is_str, "a string"),
    "version": (_is_version, "an integer >= 1 or null"),
    "id": (_matches(_ID), "[A-Za-z0-9_-], at most 64 chars"),
    "sent_ms": (_is_int, "a non-negative integer"),
    "sig": (_matches(_SIG), "64 lowercase hex digits"),
}


@dataclass(frozen=True)
class Command:
    """One control message; ``sig`` is empty when unsigned."""

    command: str
    model: str
    version: int | None = None
    id: str = ""
    sent_ms: int = 0
    sig: str = ""

    def canonical(self) -> bytes:
        """What ``sig`` signs: a context tag, then every field but ``sig`` as sorted, compact JSON."""
        fields = {k: v for k, v in asdict(self).items() if k != "sig"}
        return SIGNATURE_CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def encode(self) -> str:
        """The JSON published on the channel (without ``sig`` when unsigned)."""
        data = asdict(self)
        if not self.sig:
            del data["sig"]  # what workers from before signing accept
        return json.dumps(data)

    def signed(self, secret: Secret) -> Command:
        """This command with ``sig`` set."""
        return replace(self, sig=signature(self, secret))


def reload(model: str, version: int | None = None, *, secret: Secret | None = None) -> Command:
    """Ask every worker of ``model`` to serve ``version`` (None: whatever the registry says)."""
    command = Command("reload", check_model_name(model), version, uuid.uuid4().hex, _now_ms())
    return command.signed(secret) if secret is not None else command


def signature(command: Command, secret: Secret) -> str:
    """The hex HMAC-SHA256 of ``command`` under ``secret``."""
    return hmac.new(_key(secret), command.canonical(), hashlib.sha256).hexdigest()


def decode(raw: bytes | str) -> Command:
    """Parse and validate a control message; ``InvalidInput`` if it is not one of ours."""
    data = _load(raw)
    _check_fields(data)
    command = Command(**data)
    if command.command not in COMMANDS:
        raise InvalidInput(f"unknown control command {command.command!r}")
    check_model_name(command.model)
    return command


def _load(raw: bytes | str) -> dict[str, Any]:
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_CONTROL_BYTES:
        raise InvalidInput(f"malformed control message: {size} bytes, the limit is {MAX_CONTROL_BYTES}")
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidInput(f"malformed control message: {e}") from e
    if not isinstance(data, dict):
        raise InvalidInput("malformed control message: not a JSON object")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("duplicate key")
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _check_fields(data: dict[str, Any]) -> None:
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise InvalidInput(f"malformed control message: unknown field(s) {unknown}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise InvalidInput(f"malformed control message: missing field(s) {missing}")
    for name, value in data.items():
        check, wanted = _FIELDS[name]
        if not check(value):
            raise InvalidInput(f"control {name!r} must be {wanted}, got {value!r:.80}")


class Verifier:
    """Accepts only signed, fresh, first-seen commands when it has a secret; everything without one.

    Not thread-safe: one per listener thread.
    """

    def __init__(self, secret: Secret | None, *, max_age_ms: int = DEFAULT_MAX_AGE_MS,
                 max_ids: int = MAX_SEEN_IDS) -> None:
        self._key = _key(secret) if secret is not None else None
        self.max_age_ms, self.max_ids = max_age_ms, max_ids
        self._seen: OrderedDict[str, int] = OrderedDict()  # id → sent_ms, oldest first

    @property
    def enabled(self) -> bool:
        """True when commands must be signed."""
        return self._key is not None

    def check(self, command: Command, now_ms: int | None = None) -> Command:
        """Return ``command`` if acceptable, else raise ``Unauthenticated``."""
        if self._key is None:
            return command
        expected = hmac.new(self._key, command.canonical(), hashlib.sha256).hexdigest()
        if not command.sig or not hmac.compare_digest(expected, command.sig):
            raise Unauthenticated(f"control message {command.id!r} is unsigned or badly signed")
        now_ms = _now_ms() if now_ms is None else now_ms
        if abs(now_ms - command.sent_ms) > self.max_age_ms:
            raise Unauthenticated(f"control message {command.id!r} is stale: sent_ms {command.sent_ms}, "
                                  f"now {now_ms}, max age {self.max_age_ms} ms")
        self._remember(command, now_ms)
        return command

    def _remember(self, command: Command, now_ms: int) -> None:
        while self._seen and (len(self._seen) >= self.max_ids
                              or next(iter(self._seen.values())) < now_ms - self.max_age_ms):
            self._seen.popitem(last=False)
        if not command.id or command.id in self._seen:
            raise Unauthenticated(f"control message {command.id!r} has no id or was seen before (replay)")
        self._seen[command.id] = command.sent_ms


def _key(secret: Secret) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret.encode() if isinstance(secret, str) else secret


def _now_ms() -> int:
    return int(time.time() * 1000)
