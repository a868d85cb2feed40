"""Which models stay loaded: LRU bookkeeping under a memory budget and/or a count, with pins.

:class:`ModelCache` holds no model; it records each served model's state (cold, loading, loaded,
evicted, failed), its measured size and load time, and the order in which models were last used,
and says which loaded models to evict before another one loads (:meth:`ModelCache.victims`).
The loop does the loading and unloading and reports back. Times come from the caller.

A model's size is what loading it added to this process's resident set (:func:`measure_load`):
the only number that covers every backend (onnxruntime arenas, torch, plain numpy) alike. It
undercounts memory a backend touches only on its first inference, and counts whatever else the
process allocated during the load; :func:`release_memory` after an eviction hands freed memory
back to the system so that the next measurement starts from a true baseline.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

STATES = ("cold", "loading", "loaded", "evicted", "failed")


@dataclass
class CacheEntry:
    """One served model in this process: what the heartbeat publishes about its cache state."""

    state: str = "cold"  # one of STATES
    size_bytes: int = 0  # measured size while loaded; 0 when not loaded
    loaded_at_ms: int = 0  # wall-clock ms of the last successful load (0: never)
    load_ms: float = 0.0  # how long the last successful load took (0: never)
    pinned: bool = False
    load_error: str = ""  # the last load failure ("" none, cleared by a successful load)


class ModelCache:
    """Least-recently-used bookkeeping for the models one process serves.

    ``budget_bytes`` bounds the sum of loaded models' measured sizes and ``max_loaded`` their
    count (0 = no limit for either). Pinned models are never offered for eviction.
    """

    def __init__(self, budget_bytes: int = 0, max_loaded: int = 0, pinned: Iterable[str] = ()) -> None:
        if budget_bytes < 0 or max_loaded < 0:
            raise ValueError(f"budget_bytes and max_loaded must be >= 0, not {budget_bytes}, {max_loaded}")
        self.budget_bytes = budget_bytes
        self.max_loaded = max_loaded
        self.pinned = frozenset(pinned)
        # Least recently used first; every served model is in it, loaded or not.
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._last_size: dict[str, int] = {}  # survives an eviction: what a reload will likely take

    def __repr__(self) -> str:
        loaded = [m for m, e in self._entries.items() if e.state == "loaded"]
        return (f"ModelCache(budget_bytes={self.budget_bytes}, max_loaded={self.max_loaded}, "
                f"used_bytes={self.used_bytes()}, loaded={loaded!r})")

    def add(self, model: str) -> None:
        """Start serving ``model`` (cold, least recently used); no-op when already served."""
        if model not in self._entries:
            self._entries[model] = CacheEntry(pinned=model in self.pinned)
            self._entries.move_to_end(model, last=False)

    def remove(self, model: str) -> None:
        """Stop serving ``model``; the caller has unloaded it."""
        self._entries.pop(model, None)
        self._last_size.pop(model, None)

    def touch(self, model: str) -> None:
        """``model`` is being used now (a batch picked it): it becomes the most recently used."""
        self._entry(model)
        self._entries.move_to_end(model)

    def loading(self, model: str) -> None:
        """A load of ``model`` has started."""
        self._entry(model).state = "loading"

    def loaded(self, model: str, size_bytes: int, load_ms: float, now_ms: int) -> None:
        """``model`` loaded at ``now_ms`` (wall clock) in ``load_ms``, measured at ``size_bytes``."""
        entry = self._entry(model)
        entry.state, entry.size_bytes, entry.load_ms = "loaded", max(0, size_bytes), load_ms
        entry.loaded_at_ms, entry.load_error = now_ms, ""
        self._last_size[model] = entry.size_bytes
        self.touch(model)  # just loaded for a request: not the next one to go

    def failed(self, model: str, error: str) -> None:
        """A load of ``model`` failed with ``error``; nothing of it is resident."""
        entry = self._entry(model)
        entry.state, entry.size_bytes, entry.load_error = "failed", 0, error

    def evicted(self, model: str) -> None:
        """``model`` has been unloaded to make room; its last load time and size are kept for a reload."""
        entry = self._entry(model)
        entry.state, entry.size_bytes = "evicted", 0

    def victims(self, incoming: str | None = None, incoming_bytes: int = 0,
                busy: Callable[[str], bool] = lambda m: False) -> list[str]:
        """The loaded models to evict, least recently used first, so that ``incoming`` fits.

        Fits means: loaded sizes + ``incoming_bytes`` within the byte budget, and the models
        loaded or loading (``incoming`` counted once) within ``max_loaded``. Never a pinned
        model, one ``busy`` says is in use, or ``incoming`` itself. When even evicting every
        candidate is not enough, all candidates come back and :meth:`over_budget_bytes` tells
        by how much the budget is exceeded once the load is done.
        """
        used = self.used_bytes() + incoming_bytes
        count = sum(1 for m, e in self._entries.items()
                    if e.state in ("loaded", "loading") and m != incoming) + (incoming is not None)
        chosen: list[str] = []
        for model, entry in self._entries.items():
            if not self._over(used, count):
                break
            if entry.state != "loaded" or entry.pinned or model == incoming or busy(model):
                continue
            chosen.append(model)
            used -= entry.size_bytes
            count -= 1
        return chosen

    def over_budget_bytes(self) -> int:
        """By how many bytes the loaded models exceed the budget now (0 within it or with no budget)."""
        return max(0, self.used_bytes() - self.budget_bytes) if self.budget_bytes else 0

    def used_bytes(self) -> int:
        """The sum of the loaded models' measured sizes."""
        return sum(e.size_bytes for e in self._entries.values() if e.state == "loaded")

    def entry(self, model: str) -> CacheEntry:
        """A copy of ``model``'s entry (``KeyError`` when it is not served)."""
        return dataclasses.replace(self._entries[model])

    def expected_load_ms(self, model: str, default_ms: float = 2000.0) -> float:
        """How long loading ``model`` should take: its last load's time, ``default_ms`` before any."""
        entry = self._entries.get(model)
        return entry.load_ms if entry is not None and entry.load_ms > 0 else default_ms

    def expected_size_bytes(self, model: str, default_bytes: int = 0) -> int:
        """What loading ``model`` should add: its last measured size, ``default_bytes`` before any."""
        return self._last_size.get(model, default_bytes)

    def _entry(self, model: str) -> CacheEntry:
        """``model``'s entry, added (cold) first if it was not served yet."""
        self.add(model)
        return self._entries[model]

    def _over(self, used_bytes: int, count: int) -> bool:
        """Whether ``used_bytes`` or ``count`` exceeds its limit."""
        return ((self.budget_bytes > 0 and used_bytes > self.budget_bytes)
                or (self.max_loaded > 0 and count > self.max_loaded))


def rss_bytes() -> int:
    """This process's resident set size now, in bytes.

    Linux: ``/proc/self/statm``'s second field × the page size. Elsewhere the peak RSS from
    ``getrusage`` (it never falls, so a size measured with it is a lower bound); 0 if neither.
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, the others KiB


def _libc(name: str) -> Callable[..., int] | None:
    """A glibc function, or ``None`` where the C library has none (musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):
        return None


_MALLOC_TRIM, _MALLOPT = _libc("malloc_trim"), _libc("mallopt")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD_MAX_BYTES = 32 << 20  # glibc refuses more (64-bit: half its heap size)


def keep_batch_memory(batch_bytes: int) -> bool:
    """Let the C allocator keep freed blocks of up to ``batch_bytes`` (at most 32 MiB) for reuse.

    Every batch allocates and frees the same buffers: its stacked inputs, each entry's tensor
    bytes, the read's answer. With glibc's defaults a block over 128 KiB is mapped and unmapped
    around each use, and free memory at the top of the heap is handed back, so the next batch
    faults every page in again: about five page faults per request in a live worker. This keeps
    them mapped: blocks up to ``batch_bytes`` come from the heap, and up to twice that of free
    heap stays. Returns whether it applied; an operator's own ``GLIBC_TUNABLES``, or another C
    library, is left alone.
    """
    if _MALLOPT is None or "GLIBC_TUNABLES" in os.environ or batch_bytes <= 0:
        return False
    mmap_bytes = min(batch_bytes, MMAP_THRESHOLD_MAX_BYTES)
    return bool(_MALLOPT(M_MMAP_THRESHOLD, mmap_bytes)) and bool(_MALLOPT(M_TRIM_THRESHOLD, 2 * mmap_bytes))


def release_memory(*, collect: bool = True) -> None:
    """Hand freed memory back to the system, so that RSS falls after an eviction.

    Collects reference cycles (``collect``; a model's graph often holds some), then asks glibc to
    return the free pages of its heaps, which it otherwise keeps for later allocations. No-op past
    the collection where there is no ``malloc_trim``. A full collection takes tens of
    milliseconds in a serving process and holds the interpreter meanwhile; the trim alone takes
    a fraction of one and releases it.
    """
    if collect:
        gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def measure_load(
    load: Callable[[], T], clock: Callable[[], float] = time.perf_counter,
) -> tuple[T, int, float]:
    """Run ``load`` and return ``(its result, the RSS it added in bytes, the time it took in ms)``.

    The size is ``max(0, RSS after - RSS before)``; memory freed earlier is returned to the
    system first, or the load could reuse it unseen (not the cycles a collection would find:
    collecting would stall every thread of a serving process for tens of milliseconds).
    """
    release_memory(collect=False)
    before = rss_bytes()
    started = clock()
    result = load()
    load_ms = (clock() - started) * 1000
    return result, max(0, rss_bytes() - before), load_ms
