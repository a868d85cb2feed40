"""Which models stay loaded: LRU under a byte budget and a count, pins, busy models; RSS measurement."""

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from worker import cache as cache_module
from worker.cache import CacheEntry, ModelCache, measure_load, release_memory, rss_bytes

MB = 2**20


def loaded_cache(sizes_mb: dict[str, int], **limits) -> ModelCache:
    """A cache with every model of ``sizes_mb`` loaded, in that order (the first least recently used)."""
    cache = ModelCache(**limits)
    for now_ms, (model, size) in enumerate(sizes_mb.items()):
        cache.add(model)
        cache.loading(model)
        cache.loaded(model, size * MB, load_ms=100.0, now_ms=now_ms)
    return cache


def test_a_new_model_is_cold_and_loading_then_loaded_records_the_load():
    cache = ModelCache(pinned=["p"])
    cache.add("a")
    cache.add("p")
    assert cache.entry("a") == CacheEntry(state="cold")
    assert cache.entry("p").pinned
    cache.loading("a")
    assert cache.entry("a").state == "loading" and cache.entry("a").state != "loaded"
    cache.loaded("a", 5 * MB, load_ms=250.0, now_ms=1_700_000_000_000)
    assert cache.entry("a") == CacheEntry("loaded", 5 * MB, 1_700_000_000_000, 250.0, False, "")
    assert cache.entry("a").state == "loaded" and cache.used_bytes() == 5 * MB


def test_failed_and_evicted_keep_what_a_reload_needs():
    cache = loaded_cache({"a": 5})
    cache.evicted("a")
    assert cache.entry("a").state == "evicted" and cache.entry("a").size_bytes == 0
    assert cache.used_bytes() == 0 and cache.entry("a").state != "loaded"
    assert cache.expected_size_bytes("a") == 5 * MB
    cache.loading("a")
    cache.failed("a", "FileNotFoundError: model.onnx")
    assert cache.entry("a").load_error == "FileNotFoundError: model.onnx"
    cache.loaded("a", 6 * MB, load_ms=90.0, now_ms=7)
    assert cache.entry("a").load_error == ""  # cleared by the next success


def test_entry_is_a_copy():
    cache = loaded_cache({"a": 5})
    cache.entry("a").state = "cold"
    assert cache.entry("a").state == "loaded"


def test_victims_least_recently_used_first_and_touch_reorders():
    cache = loaded_cache({"a": 10, "b": 10, "c": 10}, budget_bytes=30 * MB)
    assert cache.victims("d", incoming_bytes=10 * MB) == ["a"]
    cache.touch("a")  # a batch used a: b is now the oldest
    assert cache.victims("d", incoming_bytes=10 * MB) == ["b"]
    assert cache.victims("d", incoming_bytes=20 * MB) == ["b", "c"]


def test_budget_by_bytes_evicts_as_few_as_fit():
    cache = loaded_cache({"small": 1, "big": 50, "mid": 20}, budget_bytes=100 * MB)
    assert cache.victims("x", incoming_bytes=29 * MB) == []  # 71 + 29 = 100: fits exactly
    assert cache.victims("x", incoming_bytes=30 * MB) == ["small"]
    assert cache.victims("x", incoming_bytes=31 * MB) == ["small", "big"]


def test_no_limits_never_evicts():
    cache = loaded_cache({"a": 500, "b": 500})
    assert cache.victims("c", incoming_bytes=10_000 * MB) == []
    assert cache.over_budget_bytes() == 0


def test_max_loaded_by_count():
    cache = loaded_cache({"a": 1, "b": 1, "c": 1}, max_loaded=3)
    assert cache.victims() == []
    assert cache.victims("d") == ["a"]
    assert cache.victims("b") == []  # already loaded: it takes no new slot
    cache.loading("d")  # a load in progress holds a slot too
    assert cache.victims("e") == ["a", "b"]
    assert cache.victims("d") == ["a"]  # counted once


def test_both_limits_take_the_stricter():
    cache = loaded_cache({"a": 10, "b": 10, "c": 10}, budget_bytes=100 * MB, max_loaded=2)
    assert cache.victims("d", incoming_bytes=10 * MB) == ["a", "b"]  # count, not bytes, binds


def test_pinned_models_are_never_victims():
    cache = loaded_cache({"p": 10, "a": 10, "b": 10}, budget_bytes=30 * MB, pinned=["p"])
    assert cache.victims("d", incoming_bytes=10 * MB) == ["a"]
    assert cache.victims("d", incoming_bytes=30 * MB) == ["a", "b"]  # not enough, but never p


def test_busy_models_are_never_victims():
    cache = loaded_cache({"a": 10, "b": 10, "c": 10}, budget_bytes=30 * MB)
    assert cache.victims("d", incoming_bytes=10 * MB, busy=lambda m: m == "a") == ["b"]


def test_the_incoming_model_is_never_its_own_victim():
    cache = loaded_cache({"a": 10, "b": 10}, budget_bytes=15 * MB)
    assert cache.victims("a") == ["b"]


def test_only_loaded_models_are_victims_and_only_loaded_or_loading_ones_take_slots():
    cache = loaded_cache({"a": 10, "b": 10}, max_loaded=2)
    cache.add("cold")
    cache.failed("broken", "ValueError: bad graph")
    assert cache.victims() == []
    assert cache.victims("x") == ["a"]
    cache.loading("cold")
    assert cache.victims() == ["a"]  # over by one; the loading model holds a slot but is not evictable


def test_when_nothing_can_fit_every_candidate_is_returned_and_the_excess_reported():
    cache = loaded_cache({"p": 40, "a": 10, "b": 10}, budget_bytes=50 * MB, pinned=["p"])
    assert cache.over_budget_bytes() == 10 * MB
    assert cache.victims("x", incoming_bytes=30 * MB) == ["a", "b"]
    for model in ("a", "b"):
        cache.evicted(model)
    cache.loaded("x", 30 * MB, load_ms=1.0, now_ms=0)
    assert cache.used_bytes() == 70 * MB
    assert cache.over_budget_bytes() == 20 * MB


def test_expected_load_ms_is_the_last_load_time():
    cache = ModelCache()
    cache.add("a")
    assert cache.expected_load_ms("a") == 2000.0
    assert cache.expected_load_ms("unknown", default_ms=50.0) == 50.0
    cache.loaded("a", MB, load_ms=300.0, now_ms=0)
    cache.evicted("a")
    cache.loaded("a", MB, load_ms=120.0, now_ms=1)
    cache.evicted("a")
    assert cache.expected_load_ms("a") == 120.0


def test_remove_forgets_the_model():
    cache = loaded_cache({"a": 10, "b": 10}, max_loaded=1)
    cache.remove("a")
    with pytest.raises(KeyError):
        cache.entry("a")
    assert cache.victims() == [] and cache.used_bytes() == 10 * MB


def test_negative_limits_are_refused():
    with pytest.raises(ValueError):
        ModelCache(budget_bytes=-1)


def test_rss_grows_after_allocating_a_touched_array():
    before = rss_bytes()
    assert before > 0
    array = np.ones(50 * MB // 8)  # ones, not empty/zeros: every page is written, so resident
    assert rss_bytes() - before >= 40 * MB
    del array


def test_measure_load_measures_what_the_load_allocated():
    result, size_bytes, load_ms = measure_load(lambda: np.full(40 * MB // 8, 1.5))
    assert result.nbytes == 40 * MB
    assert size_bytes >= 30 * MB
    assert load_ms >= 0


def test_measure_load_times_with_the_given_clock():
    ticks = iter([10.0, 10.25])
    _, _, load_ms = measure_load(lambda: None, clock=lambda: next(ticks))
    assert load_ms == 250.0


def test_release_memory_returns():
    array = np.ones(20 * MB // 8)
    del array
    release_memory()


@pytest.mark.skipif(cache_module._MALLOC_TRIM is None, reason="no glibc malloc_trim here")
def test_release_memory_hands_freed_heap_pages_back():
    # 64 KiB blocks come from malloc's heap, not their own mmap; freeing every other one leaves
    # holes that glibc keeps for reuse (RSS stays up) until malloc_trim returns them.
    blocks = [np.ones(64 * 1024 // 8) for _ in range(2000)]
    kept = blocks[::2]
    del blocks
    gc.collect()
    before = rss_bytes()
    release_memory()
    assert before - rss_bytes() >= 30 * MB
    del kept


ALLOCATING_BATCHES = """
import resource, sys
import numpy as np
from worker.cache import keep_batch_memory
if sys.argv[1] == "kept":
    assert keep_batch_memory(16 << 20)

def batch():  # a batch's stacked inputs and its entries' tensor bytes, freed after the batch
    stacked = np.ones(512 * 1024 // 8)
    entries = [np.ones(26 * 1024 // 8) for _ in range(100)]
    del stacked, entries

batch()  # the first batch maps its pages either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(cache_module._MALLOPT is None, reason="no glibc mallopt here")
def test_kept_batch_memory_is_reused_without_page_faults():
    def page_faults(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        done = subprocess.run([sys.executable, "-c", ALLOCATING_BATCHES, mode], env=env, check=True,
                              capture_output=True, text=True, timeout=60)
        return int(done.stdout)

    # glibc's defaults hand the freed heap top back after each batch and fault it in again
    assert page_faults("default") > 1000
    assert page_faults("kept") < 50


def test_keep_batch_memory_leaves_an_operators_tunables_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert not cache_module.keep_batch_memory(16 << 20)
