"""The benchmarks' client processes: forked from a server process that has imported their code.

A spawned child starts a fresh interpreter and imports numpy, redis-py, our client and the
benchmark module: about 2 s on a busy 2-core box, paid by every client process of every phase.
A ``forkserver`` child is forked from one long-lived, single-threaded process that did those
imports once, so it starts in milliseconds; like a spawned one it shares no threads, locks or
connections with the parent.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import ForkServerContext


def context(*preload: str) -> ForkServerContext:
    """The ``forkserver`` context, its server importing ``preload`` (module names) when it starts.

    The server starts on the first child and then serves the whole parent process: the first
    call's ``preload`` is the one that counts; a later caller's children import what they miss."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx
