"""The load generator never leaves its caller waiting on a bot process that died."""

import pytest

from lab.loadgen import LoadSpec, run_load


@pytest.mark.timeout(60)  # two spawned interpreters importing numpy and redis-py: seconds on a busy box
def test_a_bot_that_dies_raises_instead_of_waiting_forever():
    spec = LoadSpec("nope://not-a-redis-url", "m", requests=1)  # Client.from_url raises in the bot
    with pytest.raises(RuntimeError, match="exited with code 1 before it reported"):
        run_load(spec, 2)
