"""Listen on the control channel in a background thread and nudge the worker.

The listener only sets flags (through ``on_command``); the worker acts between
batches. On (re)connect it nudges too, since messages sent while it was away
are lost: pub/sub has no history, the registry has.
"""

from __future__ import annotations

import logging
import threading

import redis

from protocol import control, keys
from protocol.errors import InvalidInput

log = logging.getLogger(__name__)
RETRY_DELAY_S = 1.0


class ControlListener:
    """A daemon thread subscribed to ``ss:control``; commands for ``model`` go to ``on_command``."""

    def __init__(self, redis_url: str, model: str, on_command) -> None:
        self.redis_url, self.model, self.on_command = redis_url, model, on_command
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"control-{model}", daemon=True)

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

    def _listen(self) -> None:
        with redis.Redis.from_url(self.redis_url) as client, client.pubsub() as pubsub:
            pubsub.subscribe(keys.control_channel())
            self.on_command(None)  # (re)connected: whatever we missed, reconcile now
            while not self.stopping.is_set():
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self._dispatch(message["data"])

    def _dispatch(self, raw: bytes) -> None:
        try:
            command = control.decode(raw)
        except InvalidInput as e:
            log.warning("ignoring control message: %s", e)
            return
        if command.model == self.model:
            log.info("control: %s %s v%s", command.command, command.model, command.version)
            self.on_command(command)
