"""The benchmarks' client processes: forked from a server process that has imported their code.

A spawned child starts a fresh interpreter and imports numpy, redis-py, our client and the
benchmark module: about 2 s on a busy 2-core box, paid by every client process of every phase.
A ``forkserver`` child is forked from one long-lived, single-threaded process that did those
imports once, so it starts in milliseconds; like a spawned one it shares no threads, locks or
connections with the parent.

A forked child would inherit the fork server's CPU affinity, fixed when that server started;
these children take the cores their parent has when it creates them, as spawned ones do (a
scenario that pins its bots to some cores pins them by pinning itself).
"""

from __future__ import annotations

import os
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import Any


class _Process(ForkServerProcess):
    """A fork-server child that runs on its parent's cores of the moment it was created."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parent_cores = os.sched_getaffinity(0)

    def run(self) -> None:
        os.sched_setaffinity(0, self.parent_cores)
        super().run()


class _Context(ForkServerContext):
    Process = _Process


def context(*preload: str) -> ForkServerContext:
    """The ``forkserver`` context, its server importing ``preload`` (module names) when it starts.

    The server starts on the first child and then serves the whole parent process: the first
    call's ``preload`` is the one that counts; a later caller's children import what they miss."""
    ctx = _Context()
    ctx.set_forkserver_preload(list(preload))
    return ctx
