from worker.batcher import Batcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedSource:
    """Hands out items on a timeline; waiting advances the fake clock."""

    def __init__(self, clock: FakeClock, arrivals: list[tuple[float, str]]) -> None:
        self.clock, self.arrivals, self.calls = clock, list(arrivals), []

    def __call__(self, count: int, wait_ms: float) -> list[str]:
        self.calls.append((count, wait_ms))
        ready = [item for t, item in self.arrivals if t <= self.clock.now][:count]
        if not ready and self.arrivals:
            next_t = self.arrivals[0][0]
            if next_t <= self.clock.now + wait_ms / 1000:
                self.clock.now = next_t
                ready = [item for t, item in self.arrivals if t <= self.clock.now][:count]
            else:
                self.clock.now += wait_ms / 1000
        self.arrivals = [(t, i) for t, i in self.arrivals if i not in ready]
        return ready


def test_batch_closes_on_size_without_waiting_for_the_deadline():
    clock = FakeClock()
    source = ScriptedSource(clock, [(0.0, f"r{i}") for i in range(10)])
    batch = Batcher(source, max_batch=4, max_wait_ms=50, clock=clock).next_batch(100)
    assert batch == ["r0", "r1", "r2", "r3"]
    assert clock.now == 0.0


def test_batch_closes_on_time_measured_from_the_first_item():
    clock = FakeClock()
    source = ScriptedSource(clock, [(0.010, "a"), (0.012, "b"), (0.030, "late")])
    batch = Batcher(source, max_batch=8, max_wait_ms=5, clock=clock).next_batch(100)
    assert batch == ["a", "b"]
    assert abs(clock.now - 0.015) < 1e-9  # 5 ms after the first item, not after the call
    # Each later fetch asked only for what the deadline had left.
    assert all(wait <= 5 for _, wait in source.calls[1:])


def test_zero_wait_takes_what_is_there_in_one_read():
    clock = FakeClock()
    source = ScriptedSource(clock, [(0.0, "a"), (0.0, "b"), (0.001, "c")])
    assert Batcher(source, max_batch=8, max_wait_ms=0, clock=clock).next_batch(10) == ["a", "b"]
    assert len(source.calls) == 1


def test_empty_when_nothing_arrives_within_the_first_wait():
    clock = FakeClock()
    source = ScriptedSource(clock, [(1.0, "a")])
    assert Batcher(source, max_batch=8, max_wait_ms=5, clock=clock).next_batch(20) == []
    assert abs(clock.now - 0.020) < 1e-9
