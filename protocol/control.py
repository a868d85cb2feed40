"""Control-channel commands: JSON on the ``ss:control`` pub/sub channel.

A command is a nudge; the registry stays the source of truth. A worker that
missed one still converges, because it re-reads the registry periodically.

    {"command": "reload", "model": "hybrid_cnn_lstm", "version": 4, "id": "…", "sent_ms": …}
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass

from protocol.errors import InvalidInput
from protocol.keys import check_model_name

COMMANDS = frozenset({"reload"})


@dataclass(frozen=True)
class Command:
    """One control message."""

    command: str
    model: str
    version: int | None = None
    id: str = ""
    sent_ms: int = 0

    def encode(self) -> str:
        """The JSON published on the channel."""
        return json.dumps(asdict(self))


def reload(model: str, version: int | None = None) -> Command:
    """Ask every worker of ``model`` to serve ``version`` (None: whatever the registry says)."""
    return Command("reload", check_model_name(model), version, uuid.uuid4().hex, int(time.time() * 1000))


def decode(raw: bytes | str) -> Command:
    """Parse and validate a control message; ``InvalidInput`` if it is not one of ours."""
    try:
        data = json.loads(raw)
        command = Command(**data)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"malformed control message: {e}") from e
    if command.command not in COMMANDS:
        raise InvalidInput(f"unknown control command {command.command!r}")
    check_model_name(command.model)
    if command.version is not None and not isinstance(command.version, int):
        raise InvalidInput("control 'version' must be an integer or null")
    return command
