"""`streamserve chaos` in small: SIGKILLs under load and hostile entries, nothing lost, nothing crashes."""

import pytest

from lab import chaos
from protocol.settings import Settings


@pytest.mark.timeout(180)
def test_kills_and_hostile_entries_lose_nothing(tmp_path):
    settings = Settings(heartbeat_interval_s=0.5, heartbeat_ttl_s=2.0, artifact_dir=tmp_path)
    result = chaos.run(settings, seconds=8, rate_rps=40, workers=2, kill_every_s=2.0, bots=2,
                       hostile_entries=60, progress=lambda _line: None)
    summary = result.summary()
    assert result.kills >= 2 and result.crashes == 0
    assert result.sent > 0 and result.answered == result.sent and summary["lost"] == 0
    assert result.duplicate_replies == 0 and result.pending_end == 0 and result.stream_length_end == 0
    assert result.consumers_end == result.live_workers_end == 2
    assert summary["worst_ms"] <= 2 * 1000 * settings.heartbeat_ttl_s
    hostile = result.hostile
    assert hostile["sent"] == 60 and hostile.get("reply OK", 0) == 0 and "reply unanswered" not in hostile
    assert hostile["reply INVALID_INPUT"] + hostile["expected dead letters"] == 60
    assert hostile["dead-lettered"] == hostile["expected dead letters"]
