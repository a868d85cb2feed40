"""Idempotent requests, worker side: each computed reply leaves a marker (``keys.done_key``) for
``idempotency_window_s``; a request re-sent with the same id gets that reply, computed once."""

from __future__ import annotations

import time

import numpy as np
from conftest import MODEL, wait_until
from test_worker import drain, reply, send

from protocol import codec, keys, messages

X = np.random.default_rng(11).standard_normal((1, 60, 110)).astype(np.float32)


def resend(r, request_id: str, *, reply_to: str | None = None) -> None:
    deadline_ms = int(time.time() * 1000) + 60_000
    fields = messages.encode_request(request_id, {"features": X}, deadline_ms=deadline_ms, reply_to=reply_to,
                                     resend=True)
    r.xadd(keys.request_stream(MODEL), fields)


def raw_reply(r, token: str) -> bytes:
    raw = r.lpop(keys.reply_key(MODEL, token))
    assert raw is not None, f"no reply on {token}"
    return raw


def test_a_request_re_sent_after_its_reply_gets_the_same_reply_uncomputed(r, settings, production):
    send(r, "once", X, rows=False)
    first = drain(settings)
    original = raw_reply(r, "once")
    assert (first.computed, first.replayed) == (1, 0)
    resend(r, "once", reply_to="once-again")  # the bot's second attempt listens on a fresh list
    second = drain(settings)
    assert (second.computed, second.replayed) == (0, 1), "answered from the marker, no model call"
    assert raw_reply(r, "once-again") == original
    assert codec.unpack(original, max_bytes=1 << 20)["ok"]


def test_a_re_sent_request_never_seen_is_computed_and_marked(r, settings, production):
    resend(r, "fresh")
    worker = drain(settings)
    assert (worker.computed, worker.replayed) == (1, 0)
    assert reply(r, "fresh")["ok"]
    assert r.exists(keys.done_key(MODEL, "fresh"))


def test_a_marker_lives_no_longer_than_the_window_then_a_re_send_is_computed(r, settings, production):
    s = settings.with_overrides(idempotency_window_s=0.5)
    send(r, "brief", X, rows=False)
    drain(s)
    marker = keys.done_key(MODEL, "brief")
    assert 0 < r.pttl(marker) <= 500
    wait_until(lambda: not r.exists(marker), 5, message="the marker outlived its window")
    resend(r, "brief")
    assert drain(s).computed == 1


def test_the_normal_path_reads_no_marker_and_errors_leave_none(r, settings, production):
    r.config_resetstat()
    send(r, "plain", X, rows=False)
    send(r, "expired", X, rows=False, deadline_ms=int(time.time() * 1000) - 5)
    drain(settings)
    assert "cmdstat_mget" not in r.info("commandstats"), "no lookup without a re-sent request"
    assert reply(r, "plain")["ok"] and not reply(r, "expired")["ok"]
    assert r.exists(keys.done_key(MODEL, "plain")) and not r.exists(keys.done_key(MODEL, "expired"))


def test_a_garbled_marker_is_ignored_and_the_request_computed(r, settings, production):
    r.set(keys.done_key(MODEL, "tampered"), b"")  # untrusted: an empty value is no reply
    resend(r, "tampered")
    assert drain(settings).computed == 1
    assert reply(r, "tampered")["ok"]


def test_a_worker_whose_acl_refuses_markers_serves_without_them(r, settings, production, redis_server):
    """An ACL written before markers existed: a SET in the reply transaction would abort it whole."""
    r.acl_setuser("no-markers", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                  commands=["+@all", "-set"])
    try:
        s = settings.with_overrides(redis_url=f"redis://no-markers:pw@127.0.0.1:{redis_server.port}/0")
        resend(r, "unmarked")
        worker = drain(s)
        assert reply(r, "unmarked")["ok"] and worker.computed == 1
        assert not r.exists(keys.done_key(MODEL, "unmarked"))
    finally:
        r.acl_deluser("no-markers")
