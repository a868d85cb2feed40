"""Listen on the control channel in a background thread and nudge the worker.

The listener only sets flags (through ``on_command``); the worker acts between
batches. On (re)connect it nudges too, since messages sent while it was away
are lost: pub/sub has no history, the registry has.

Nothing a publisher sends can end the thread: a message that does not decode,
fails authentication (with a ``secret``) or makes ``on_command`` raise is
logged and counted in ``rejected``, and the listener reads the next one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import redis

from protocol import connection, control, keys
from protocol.control import Command, Secret, Unauthenticated
from protocol.errors import InvalidInput

log = logging.getLogger(__name__)
RETRY_DELAY_S = 1.0
# How often the listener looks at its stop event while no message comes: a stopping worker waits at
# most this for its listener thread (an idle wake-up costs microseconds).
STOP_POLL_S = 0.2
REJECTION_REASONS = ("malformed", "unauthenticated", "error")


class ControlListener:
    """A daemon thread subscribed to ``ss:control``; commands for ``model`` go to ``on_command``.

    ``model`` is a name, or a test of a name (a worker serving several models passes
    its selector's ``matches``).

    ``rejected`` counts dropped messages by reason (``REJECTION_REASONS``) and
    ``last_rejection`` says why the latest was dropped, for the worker's heartbeat.
    """

    def __init__(self, redis_url: str, model: str | Callable[[str], bool],
                 on_command: Callable[[Command | None], object], *,
                 secret: Secret | None = None, max_age_ms: int = control.DEFAULT_MAX_AGE_MS) -> None:
        self.redis_url, self.on_command = redis_url, on_command
        self.accepts: Callable[[str], bool] = model.__eq__ if isinstance(model, str) else model
        self.verifier = control.Verifier(secret, max_age_ms=max_age_ms)
        self.rejected: Counter[str] = Counter()
        self.last_rejection = ""
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="control", daemon=True)

    def start(self) -> ControlListener:
        """Start listening."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop and wait (about a second at most) for the thread to end."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(RETRY_DELAY_S + 1.5)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._listen()
            except redis.RedisError as e:
                log.warning("control channel lost (%s); resubscribing", e)
                self.stopping.wait(RETRY_DELAY_S)
            except Exception:  # whatever it was, the next subscription may work: never end the thread
                log.exception("control listener failed; resubscribing")
                self.stopping.wait(RETRY_DELAY_S)

    def _listen(self) -> None:
        with connection.connect(self.redis_url) as client, client.pubsub() as pubsub:
            pubsub.subscribe(keys.control_channel())
            self.on_command(None)  # (re)connected: whatever we missed, reconcile now
            while not self.stopping.is_set():
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=STOP_POLL_S)
                if message is not None:
                    self._dispatch(message["data"])

    def _dispatch(self, raw: object) -> None:
        try:
            command = self._accept(raw)
            if command is not None:
                log.info("control: %s %s v%s", command.command, command.model, command.version)
                self.on_command(command)
        except Unauthenticated as e:
            self._reject("unauthenticated", e)
        except InvalidInput as e:
            self._reject("malformed", e)
        except Exception as e:  # a bug, in decoding or in on_command: the next message may still work
            log.exception("control message failed")
            self._reject("error", e)

    def _accept(self, raw: object) -> Command | None:
        """The command if it is for one of our models and acceptable; None if it is for another model."""
        if not isinstance(raw, bytes | str):
            raise InvalidInput(f"malformed control message: {type(raw).__name__} payload")
        command = control.decode(raw)
        if not self.accepts(command.model):
            return None  # checked before verifying: replay memory holds only our own commands
        return self.verifier.check(command)

    def _reject(self, reason: str, error: Exception) -> None:
        self.rejected[reason] += 1
        self.last_rejection = f"{reason}: {error}"[:200]
        log.warning("ignoring control message (%s): %s", reason, self.last_rejection)
