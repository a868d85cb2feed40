"""Security as docs/security.md states it: ACL users, TLS, authenticated control messages.

The ACL rules are read from the ``acl`` blocks of docs/security.md and loaded
into a redis-server of this module's own, so the documented rules are the
tested ones. The TLS server gets a throwaway CA made here with ``openssl``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import models
import msgpack
import numpy as np
import pydantic
import pytest
import redis
from conftest import MODEL, SERVER_START_BOUND_S, ThreadedWorker, not_charged_to_the_test, wait_until
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

import worker.worker
from experiments.store import ExperimentStore
from lab.embedded_redis import free_port, server_binary
from producer import Client
from protocol import control, keys
from protocol.control import Command, Unauthenticated, Verifier
from protocol.errors import InvalidInput
from protocol.settings import Settings
from registry import Registry
from registry.rollout import publish_reload
from worker.control import ControlListener
from worker.worker import Worker

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
ACL_MODEL = "hybrid_cnn_lstm"  # the model the documented rules name
PASSWORD = "test-password"
SECRET = "a-test-secret-of-32-characters!!"
OTHER_SECRET = "another-secret-of-16+chars"
X = np.zeros((60, 110), np.float32)
NO_RETRY = Retry(NoBackoff(), 0)  # a refused connection should fail now, not after backoffs


# ---- servers ------------------------------------------------------------------------------------

def documented_acl_rules() -> dict[str, str]:
    """Role → its ``user …`` line, from the ``acl`` blocks of docs/security.md (lines joined)."""
    blocks = re.findall(r"```acl\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [" ".join(block.split()) for block in blocks]
    return {line.split()[1]: line for line in lines}


def start_server(args: list[str], ping: Callable[[], object]) -> subprocess.Popen[bytes]:
    """Start a server and wait until ``ping`` succeeds; skip if it exits saying it has no TLS."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def up() -> bool:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            if "tls" in output.lower():
                pytest.skip(f"{args[0]} cannot serve TLS: {output[-300:]}")
            raise AssertionError(f"{args[0]} exited: {output[-500:]}")
        try:
            ping()
            return True
        except redis.ConnectionError:
            return False

    try:
        wait_until(up, 10.0, interval_s=0.02, message=f"{args[0]} did not answer")
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Kill the server and close its pipe."""
    process.kill()
    process.wait()
    if process.stdout:
        process.stdout.close()


class AclServer:
    """A redis-server whose users are ``admin`` and the documented roles, all with ``PASSWORD``."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        users = [f"{line} >{PASSWORD}" for line in documented_acl_rules().values()]
        conf = [f"port {self.port}", "bind 127.0.0.1", 'save ""', "appendonly no", f"dir {directory}",
                "user default off", f"user admin on >{PASSWORD} ~* &* +@all", *users]
        (directory / "redis.conf").write_text("\n".join(conf) + "\n")
        self.process = start_server([str(server_binary()), str(directory / "redis.conf")],
                                    lambda: self.connect("admin").ping())
        try:
            self._grant_xackdel_where_served()
        except BaseException:
            stop_server(self.process)
            raise

    def _grant_xackdel_where_served(self) -> None:
        """What docs/security.md says to do on Redis >= 8.2."""
        with self.connect("admin") as admin:
            if "xackdel" in admin.acl_cat("stream"):
                stream = keys.request_stream(ACL_MODEL)
                admin.execute_command("ACL", "SETUSER", "worker", f"(%RW~{stream} +xackdel)")

    def url(self, role: str) -> str:
        """A ``redis://`` URL that logs in as ``role``."""
        return f"redis://{role}:{PASSWORD}@127.0.0.1:{self.port}/0"

    def connect(self, role: str) -> redis.Redis:
        """A client logged in as ``role``."""
        return redis.Redis.from_url(self.url(role), retry=NO_RETRY)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    with not_charged_to_the_test(SERVER_START_BOUND_S):  # the module's server, not the test's waits
        server = AclServer(tmp_path_factory.mktemp("acl"))
    yield server
    stop_server(server.process)


@pytest.fixture
def acl(acl_server: AclServer) -> Iterator[AclServer]:
    """The ACL server, emptied, with an empty ACL log."""
    with acl_server.connect("admin") as admin:
        admin.flushall()
        admin.execute_command("ACL", "LOG", "RESET")
    yield acl_server


def openssl(*args: str | Path, cwd: Path) -> None:
    """Run the ``openssl`` CLI; fail with its output."""
    done = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def make_ca(d: Path, name: str) -> None:
    """``<name>.crt`` and ``<name>.key``: a self-signed CA (EC P-256, one day)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, name: str, ca: str, serial: int) -> None:
    """``<name>.crt`` and ``<name>.key`` signed by ``ca``, for ``localhost`` and 127.0.0.1."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                  "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-set_serial", str(serial), "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


class TlsServer:
    """A redis-server on a TLS port only, asking clients for certificates (mutual TLS)."""

    def __init__(self, d: Path) -> None:
        self.dir, self.port = d, free_port()
        make_ca(d, "ca")
        make_ca(d, "other-ca")
        make_cert(d, "server", "ca", 1)
        make_cert(d, "client", "ca", 2)
        args = [str(server_binary()), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
                "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "yes",
                "--save", "", "--appendonly", "no", "--dir", str(d)]
        self.process = start_server(args, lambda: redis.Redis.from_url(self.url()).ping())

    def url(self, scheme: str = "rediss", **tls: str) -> str:
        """A URL to this server; by default with our CA and the client certificate."""
        d = self.dir
        options = tls or {"ssl_ca_certs": str(d / "ca.crt"), "ssl_certfile": str(d / "client.crt"),
                          "ssl_keyfile": str(d / "client.key")}
        return f"{scheme}://localhost:{self.port}/0?{urlencode(options)}"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (.ci/run installs it)")
    with not_charged_to_the_test(SERVER_START_BOUND_S):  # the module's server, not the test's waits
        server = TlsServer(tmp_path_factory.mktemp("tls"))
    yield server
    stop_server(server.process)


def serving_settings(redis_url: str, tmp_path: Path, **changes: object) -> Settings:
    """Fast heartbeats; a reconcile interval no test waits for, so a quick switch proves a reload."""
    return Settings(redis_url=redis_url, artifact_dir=tmp_path / "artifacts", heartbeat_interval_s=0.2,
                    heartbeat_ttl_s=1.0, block_ms=50, reconcile_interval_s=600.0, **changes)


def subscribers(client: redis.Redis) -> int:
    """How many connections listen on the control channel."""
    return int(client.pubsub_numsub(keys.control_channel())[0][1])


def wait_subscribed(client: redis.Redis, more_than: int = 0) -> None:
    """Until a worker's listener has subscribed: a reload published before that is lost."""
    wait_until(lambda: subscribers(client) > more_than, 5, message="the worker did not subscribe")


def register_two_versions(registry: Registry, model: str, tmp_path: Path) -> None:
    """v1 in Production, v2 registered."""
    for seed in (1, 2):
        registry.register(model, models.linear_softmax(tmp_path / f"m{seed}.onnx", seed=seed),
                          input_spec=models.SPEC, output_names=["probs"], labels=models.LABELS)
    registry.promote(model, 1)


# ---- ACL ----------------------------------------------------------------------------------------

def test_doc_has_the_three_roles():
    assert set(documented_acl_rules()) == {"bot", "worker", "ops"}


@pytest.mark.timeout(60)  # waits: the worker's 10 s, calls of 5 s, five of 5 s
def test_bot_predicts_worker_serves_ops_promotes_with_the_documented_rules(acl, tmp_path):
    ops = Registry(acl.connect("ops"), tmp_path / "artifacts")
    register_two_versions(ops, ACL_MODEL, tmp_path)
    settings = serving_settings(acl.url("worker"), tmp_path)
    with ThreadedWorker(Worker(settings, ACL_MODEL)), Client.from_url(acl.url("bot"), timeout_s=5) as bot:
        p = bot.predict(ACL_MODEL, X)
        assert (p.model_version, p.label in models.LABELS) == (1, True)
        assert len(bot.predict_many(ACL_MODEL, [X, X, X])) == 3
        bot.record_outcome(ACL_MODEL, p.request_id, correct=True)
        assert bot.health(ACL_MODEL).versions == {1}
        wait_subscribed(ops.redis)
        # An experiment: ops write it and nudge the fleet; the worker reads it and writes its journals.
        experiments = ExperimentStore(ops.redis, ops)
        experiments.create(ACL_MODEL, 1, 2, treatment_share=0.5, unit="request_id")
        wait_until(lambda: bot.predict(ACL_MODEL, X).variant == "treatment", 5, message="no treatment served")
        experiments.set_status(ACL_MODEL, "stopped")
        ops.promote(ACL_MODEL, 2)  # publishes the reload the worker's subscription must receive
        wait_until(lambda: bot.health(ACL_MODEL).versions == {2}, 5, message="the worker missed the reload")
        assert bot.predict(ACL_MODEL, X).model_version == 2
    with acl.connect("admin") as admin:
        denied = [(e["username"], e["object"]) for e in admin.acl_log()]  # redis-py decodes this one
    # Every refusal would be a permission the code needs and the rules lack, even one it swallows.
    assert [d for d in denied if d[1] != "client|setinfo"] == []


def test_a_popping_client_from_the_protocol_alone_works_under_the_bot_role(acl, tmp_path):
    """docs/protocol.md §4 "Compatibility": XADD, then BLPOP on the reply key, with raw commands only."""
    ops = Registry(acl.connect("ops"), tmp_path / "artifacts")
    register_two_versions(ops, ACL_MODEL, tmp_path)
    tensor = {"dtype": "<f4", "shape": [1, 60, 110], "data": X.tobytes()}
    fields = {"v": "1", "id": "popper1", "deadline_ms": str(int(time.time() * 1000) + 20_000),
              "inputs": msgpack.packb({"features": tensor}, use_bin_type=True)}
    settings = serving_settings(acl.url("worker"), tmp_path)
    with ThreadedWorker(Worker(settings, ACL_MODEL)), acl.connect("bot") as bot:
        bot.xadd(keys.request_stream(ACL_MODEL), fields)
        popped = bot.blpop([keys.reply_key(ACL_MODEL, "popper1")], timeout=10)
        assert popped is not None, "no reply within 10 s"
        reply = msgpack.unpackb(popped[1], raw=False)
        assert (reply["id"], reply["ok"], reply["label"][0] in models.LABELS) == ("popper1", True, True)
        assert bot.lpop(keys.reply_key(ACL_MODEL, "popper1")) is None


BOT_DENIED = {
    "write the registry": ("HSET", keys.model_hash(ACL_MODEL), "production_version", "9"),
    "read the registry": ("HGETALL", keys.version_hash(ACL_MODEL, 1)),
    "publish control messages": ("PUBLISH", keys.control_channel(), "{}"),
    "listen to control messages": ("SUBSCRIBE", keys.control_channel()),
    "read other bots' requests": ("XRANGE", keys.request_stream(ACL_MODEL), "-", "+"),
    "read requests as a group": ("XREADGROUP", "GROUP", "workers", "x", "STREAMS",
                                 keys.request_stream(ACL_MODEL), ">"),
    "trim with XTRIM": ("XTRIM", keys.request_stream(ACL_MODEL), "MAXLEN", "0"),
    "delete requests": ("XDEL", keys.request_stream(ACL_MODEL), "1-1"),
    "delete the stream": ("DEL", keys.request_stream(ACL_MODEL)),
    "delete a reply": ("DEL", keys.reply_key(ACL_MODEL, "abc")),
    "fake a heartbeat": ("HSET", keys.worker_hash(ACL_MODEL, "w"), "version", "1"),
    "read the experiment": ("HGETALL", keys.experiment_hash(ACL_MODEL)),
    "read outcomes": ("XRANGE", keys.outcomes_stream(ACL_MODEL), "-", "+"),
    "write another model's stream": ("XADD", keys.request_stream("other"), "*", "a", "1"),
    "read unrelated keys": ("GET", "anything"),
    "FLUSHALL": ("FLUSHALL",),
    "FLUSHDB": ("FLUSHDB",),
    "CONFIG": ("CONFIG", "GET", "*"),
    "KEYS": ("KEYS", "*"),
    "SCAN": ("SCAN", "0"),
    "MONITOR": ("MONITOR",),
    "REPLICAOF": ("REPLICAOF", "NO", "ONE"),
    "ACL": ("ACL", "LIST"),
    "CLIENT LIST": ("CLIENT", "LIST"),
    "EVAL": ("EVAL", "return 1", "0"),
}


@pytest.mark.parametrize("command", BOT_DENIED.values(), ids=BOT_DENIED.keys())
def test_bot_is_refused(acl, command):
    with acl.connect("bot") as bot, pytest.raises(NoPermissionError):
        bot.execute_command(*command)


def test_bot_cannot_register_or_promote_or_publish(acl, tmp_path):
    with acl.connect("bot") as bot:
        with pytest.raises(NoPermissionError):
            Registry(bot, tmp_path).register(ACL_MODEL, models.linear_softmax(tmp_path / "m.onnx"),
                                             input_spec=models.SPEC, output_names=["probs"])
        with pytest.raises(NoPermissionError):
            publish_reload(bot, ACL_MODEL, secret=SECRET)


def test_what_acls_cannot_stop_a_bot_from_doing_with_xadd(acl):
    """docs/security.md's stated limits: XADD can trim (MAXLEN) and exhaust the ID space."""
    stream = keys.request_stream(ACL_MODEL)
    with acl.connect("bot") as bot:
        bot.xadd(stream, {"a": "1"})
        bot.xadd(stream, {"a": "2"}, maxlen=0)
        with acl.connect("admin") as admin:
            assert admin.xlen(stream) == 0
        bot.xadd(stream, {"a": "3"}, id="18446744073709551615-18446744073709551615")
        with pytest.raises(redis.ResponseError, match="exhausted the last possible ID"):
            bot.xadd(stream, {"a": "4"})


WORKER_DENIED = {
    "write the registry": ("HSET", keys.version_hash(ACL_MODEL, 1), "stage", "Production"),
    "write the experiment": ("HSET", keys.experiment_hash(ACL_MODEL), "status", "stopped"),
    "publish control messages": ("PUBLISH", keys.control_channel(), "{}"),
    "touch another model": ("XADD", keys.request_stream("other"), "*", "a", "1"),
    "read outcomes": ("XRANGE", keys.outcomes_stream(ACL_MODEL), "-", "+"),
    "FLUSHALL": ("FLUSHALL",),
    "KEYS": ("KEYS", "*"),
    "CONFIG": ("CONFIG", "SET", "maxmemory", "1"),
}


@pytest.mark.parametrize("command", WORKER_DENIED.values(), ids=WORKER_DENIED.keys())
def test_worker_is_refused(acl, command):
    with acl.connect("worker") as client, pytest.raises(NoPermissionError):
        client.execute_command(*command)


@pytest.mark.parametrize("command", [("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*"),
                                     ("HSET", "not-ours", "a", "1")], ids=str)
def test_ops_is_refused_dangerous_commands_and_foreign_keys(acl, command):
    with acl.connect("ops") as ops, pytest.raises(NoPermissionError):
        ops.execute_command(*command)


# ---- TLS ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)  # waits: the worker's 10 s, calls of 5 s, two of 5 s
def test_tls_round_trip_with_ca_verification_and_client_certificate(tls_server, tmp_path):
    url = tls_server.url()
    with redis.Redis.from_url(url) as admin:
        admin.flushall()
        register_two_versions(Registry(admin, tmp_path / "artifacts"), MODEL, tmp_path)
    with ThreadedWorker(Worker(serving_settings(url, tmp_path), MODEL)), \
            Client.from_url(url, timeout_s=5) as bot, redis.Redis.from_url(url) as ops:
        assert bot.predict(MODEL, X).model_version == 1
        wait_subscribed(ops)
        Registry(ops, tmp_path / "artifacts").promote(MODEL, 2)  # the listener's own TLS connection
        wait_until(lambda: bot.health(MODEL).versions == {2}, 5, message="the worker missed the reload")
        assert bot.predict(MODEL, X).model_version == 2


def _tls_refusals(server: TlsServer) -> dict[str, tuple[str, str | None]]:
    """Case → (URL, what the error says)."""
    d = server.dir
    cert = {"ssl_certfile": str(d / "client.crt"), "ssl_keyfile": str(d / "client.key")}
    return {
        "no CA: the system's CAs do not know ours": (server.url(**cert), "CERTIFICATE_VERIFY_FAILED"),
        "another CA": (server.url(ssl_ca_certs=str(d / "other-ca.crt"), **cert), "CERTIFICATE_VERIFY_FAILED"),
        # TLS 1.3: the server checks the client's certificate after the handshake, then hangs up.
        "no client certificate (mutual TLS)": (server.url(ssl_ca_certs=str(d / "ca.crt")), None),
        "plain TCP to the TLS port": (server.url("redis", db="0"), None),
    }


@pytest.mark.parametrize("case", ["no CA: the system's CAs do not know ours", "another CA",
                                  "no client certificate (mutual TLS)", "plain TCP to the TLS port"])
def test_tls_refuses_unverified_or_anonymous_clients(tls_server, case):
    url, says = _tls_refusals(tls_server)[case]
    with redis.Redis.from_url(url, retry=NO_RETRY, socket_timeout=5) as client, \
            pytest.raises(redis.ConnectionError, match=says):
        client.ping()


# ---- control messages ---------------------------------------------------------------------------

def signed(model: str = MODEL, version: int | None = 2, secret: str = SECRET, **changes: Any) -> Command:
    """A fresh reload signed with ``secret``, then altered by ``changes`` (which breaks the signature)."""
    return replace(control.reload(model, version, secret=secret), **changes)


MALFORMED = {
    "model is a number (killed every listener once)": b'{"command": "reload", "model": 123}',
    "not JSON": b"not json",
    "not an object": b'["reload"]',
    "too large, refused before parsing": b'{"command": "reload", "model": "m", "id": "' + b"a" * 2000 + b'"}',
    "deeply nested": b"[" * 1000,
    "unknown field": b'{"command": "reload", "model": "m", "exec": "rm -rf /"}',
    "missing model": b'{"command": "reload"}',
    "duplicate key": b'{"command": "reload", "model": "m", "model": "n"}',
    "bool version": b'{"command": "reload", "model": "m", "version": true}',
    "float version": b'{"command": "reload", "model": "m", "version": 2.0}',
    "version 0": b'{"command": "reload", "model": "m", "version": 0}',
    "NaN": b'{"command": "reload", "model": "m", "version": NaN}',
    "string sent_ms": b'{"command": "reload", "model": "m", "sent_ms": "1"}',
    "negative sent_ms": b'{"command": "reload", "model": "m", "sent_ms": -1}',
    "id with a newline": b'{"command": "reload", "model": "m", "id": "abc\\n"}',
    "uppercase signature": b'{"command": "reload", "model": "m", "sig": "' + b"A" * 64 + b'"}',
    "not UTF-8": b'{"command": "reload", "model": "\xff"}',
    "unknown command": b'{"command": "shutdown", "model": "m"}',
    "bad model name": b'{"command": "reload", "model": "m}"}',
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_control_messages_are_refused(raw):
    with pytest.raises(InvalidInput):
        control.decode(raw)


def test_signed_reload_round_trips_and_an_unsigned_one_has_no_sig_field():
    command = signed()
    assert control.decode(command.encode()) == command
    assert Verifier(SECRET).check(control.decode(command.encode())) == command
    assert "sig" not in json.loads(control.reload(MODEL).encode())


def test_verifier_drops_unsigned_forged_tampered_stale_and_replayed_commands():
    verifier, now_ms = Verifier(SECRET, max_age_ms=30_000), signed().sent_ms
    unsigned, forged, tampered = control.reload(MODEL, 2), signed(secret=OTHER_SECRET), signed(version=3)
    for bad in (unsigned, forged, replace(tampered, version=4),
                signed(sent_ms=now_ms - 31_000), signed(sent_ms=now_ms + 31_000)):
        with pytest.raises(Unauthenticated):
            verifier.check(bad, now_ms)
    fresh = signed()
    assert verifier.check(fresh, now_ms) == fresh
    with pytest.raises(Unauthenticated, match="replay"):
        verifier.check(fresh, now_ms)
    assert Verifier(None).check(control.reload(MODEL)).sig == ""  # no secret: unsigned is fine


def test_the_documented_test_vector():
    text = DOC.read_text()
    signed_text = re.search(r"```text\n(.*?)\n```", text, flags=re.S).group(1)
    published = json.loads(re.search(r"```json\n(.*?)```", text, flags=re.S).group(1))
    secret = re.search(r"the secret `([^`]+)`", text).group(1)
    command = control.decode(json.dumps(published))
    assert command.canonical() == signed_text.encode()
    assert Verifier(secret).check(command, now_ms=command.sent_ms) == command


class Recorder:
    """An ``on_command`` that keeps what it is given; ``fail_first`` raises on the first real command."""

    def __init__(self, fail_first: bool = False) -> None:
        self.commands: list[Command] = []
        self.connected = threading.Event()
        self.fail_first = fail_first

    def __call__(self, command: Command | None) -> None:
        if command is None:
            self.connected.set()
            return
        self.commands.append(command)
        if self.fail_first and len(self.commands) == 1:
            raise RuntimeError("on_command failed")


@pytest.fixture
def listen(redis_server, r):
    """Start a ControlListener for MODEL on the session server; stopped at teardown."""
    started: list[ControlListener] = []

    def start(recorder: Recorder, **options: object) -> ControlListener:
        started.append(ControlListener(redis_server.url, MODEL, recorder, **options).start())
        wait_until(recorder.connected.is_set, 5, message="the listener did not subscribe")
        return started[-1]

    yield start
    for listener in started:
        listener.stop()


def test_listener_with_a_secret_obeys_only_signed_fresh_new_commands(r, listen):
    recorder = Recorder()
    listener = listen(recorder, secret=SECRET)
    replayed = signed()
    hostile = [b'{"command": "reload", "model": 123}', b"not json", b"x" * (1 << 20),
               control.reload(MODEL, 2).encode(), signed(secret=OTHER_SECRET).encode(),
               signed(sent_ms=0).encode(), replayed.encode(), replayed.encode(),
               signed(model="other").encode()]
    for raw in hostile:
        r.publish(keys.control_channel(), raw)
    publish_reload(r, MODEL, 7, secret=SECRET)
    wait_until(lambda: any(c.version == 7 for c in recorder.commands), message="signed reload not obeyed")
    assert [c.version for c in recorder.commands] == [2, 7]  # the first copy of `replayed`, then ours
    assert listener.rejected == {"malformed": 3, "unauthenticated": 4}
    assert listener.thread.is_alive()


def test_listener_without_a_secret_survives_hostile_messages_and_still_obeys(r, listen):
    recorder = Recorder(fail_first=True)
    listener = listen(recorder)
    for raw in (b'{"command": "reload", "model": 123}', b"not json", b"x" * (1 << 20)):
        r.publish(keys.control_channel(), raw)
    publish_reload(r, MODEL, 3)  # on_command raises on this one
    publish_reload(r, MODEL, 4)
    wait_until(lambda: len(recorder.commands) == 2, message="the listener stopped obeying")
    assert [c.version for c in recorder.commands] == [3, 4]
    assert listener.rejected == {"malformed": 3, "error": 1}
    assert "on_command failed" in listener.last_rejection
    assert listener.thread.is_alive()


def test_control_secret_comes_from_the_environment_and_stays_secret(monkeypatch):
    monkeypatch.setenv("STREAMSERVE_CONTROL_SECRET", SECRET)
    settings = Settings()
    assert settings.control_secret is not None and settings.control_secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()
    with pytest.raises(pydantic.ValidationError):  # a JSON copy holds a mask, which must not pass for a key
        Settings.model_validate_json(settings.model_dump_json())
    with pytest.raises(pydantic.ValidationError):
        Settings(control_secret="short")


def test_worker_with_a_secret_ignores_unsigned_and_forged_reloads_and_obeys_the_registrys(
        r, settings, registry, tmp_path, monkeypatch):
    """Needs the worker to pass ``settings.control_secret`` to its listener, and Registry to sign."""
    listeners: list[ControlListener] = []

    def recording_listener(*args: Any, **kwargs: Any) -> ControlListener:
        listeners.append(ControlListener(*args, **kwargs))
        return listeners[-1]

    monkeypatch.setattr(worker.worker, "ControlListener", recording_listener)
    register_two_versions(registry, MODEL, tmp_path)
    worker_settings = settings.with_overrides(control_secret=SECRET, reconcile_interval_s=600.0)
    signing_registry = Registry(r, settings.artifact_dir, control_secret=SECRET)
    others = subscribers(r)  # the session's server: listeners of other tests may still be there
    with ThreadedWorker(Worker(worker_settings, MODEL)), Client.from_url(settings.redis_url) as bot:
        wait_until(lambda: bot.health(MODEL).versions == {1}, 5)
        wait_subscribed(r, others)
        publish_reload(r, MODEL, 1)
        publish_reload(r, MODEL, 1, secret=OTHER_SECRET)
        signing_registry.promote(MODEL, 2)  # a signed reload, published after the two above
        wait_until(lambda: bot.health(MODEL).versions == {2}, 5, message="the signed reload was not obeyed")
    assert listeners[0].rejected == {"unauthenticated": 2}
