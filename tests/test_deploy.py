"""The deployment files, checked offline by deploy/check.py: compose, Prometheus rules, Kubernetes.

Each check runs on the real files and must pass; then each is shown to bite on a copy broken in one
way. docker-compose, promtool and kubernetes-validate are needed: without them a test skips, except
in CI (CI=true), where a missing tool fails, as a missing Redis does (tests/conftest.py).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from protocol import keys

ROOT = Path(__file__).resolve().parents[1]
MODEL = "hybrid_cnn_lstm"


def load_check() -> ModuleType:
    """deploy/check.py by path: deploy/ is not an installed package."""
    spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy" / "check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing(why: str) -> None:
    """Skip for a missing tool; fail instead in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"in CI: {why} (.ci/run and the `dev` extra install it)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def check() -> ModuleType:
    try:
        return load_check()
    except ImportError as e:  # PyYAML or jsonschema: the `dev` extra
        missing(str(e))
        raise


def run(check: ModuleType, step: Callable[..., list[str]], *args: Any) -> list[str]:
    """``step(*args)``, skipping (failing in CI) when its tool is missing."""
    try:
        return step(*args)
    except check.ToolMissing as e:
        missing(str(e))
        raise


@pytest.fixture(scope="module")
def k8s(check: ModuleType) -> dict[str, list[tuple[str, dict]]]:
    """variant → its (file, document) list, after the whole k8s step passed once."""
    run(check, check.check_k8s)
    return {variant: check.manifests(variant) for variant in check.variants()}


def find(docs: list[tuple[str, dict]], kind: str, name: str) -> dict:
    return next(doc for _, doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name)


# --- the real files pass -----------------------------------------------------------------------------


def test_compose_file_is_valid_and_follows_our_rules(check):
    assert run(check, check.check_compose)


def test_prometheus_configs_rules_and_rule_unit_tests_pass(check):
    assert run(check, check.check_prometheus)


def test_kubernetes_manifests_are_valid_for_every_variant(k8s):
    assert set(k8s) == {"single", "cluster", "multi"}


def test_scaledobjects_watch_the_streams_protocol_keys_names(k8s):
    single = find(k8s["single"], "ScaledObject", "streamserve-worker")
    assert {t["metadata"]["stream"] for t in single["spec"]["triggers"] if "stream" in t["metadata"]} == {
        keys.request_stream(MODEL, 0, "live"), keys.request_stream(MODEL, 0, "backfill")}
    assert keys.request_stream(MODEL) == "ss:{hybrid_cnn_lstm}:requests"
    for shard in range(3):
        scaler = find(k8s["cluster"], "ScaledObject", f"streamserve-worker-shard-{shard}")
        streams = {t["metadata"]["stream"] for t in scaler["spec"]["triggers"] if t["type"] != "cpu"}
        tag = "{hybrid_cnn_lstm}" if shard == 0 else f"{{hybrid_cnn_lstm:{shard}}}"
        assert streams == {f"ss:{tag}:requests", f"ss:{tag}:backfill"}
        assert {t["type"] for t in scaler["spec"]["triggers"]} == {"redis-cluster-streams", "cpu"}
        assert {t["metadata"].get("consumerGroup") for t in scaler["spec"]["triggers"]} == {
            keys.consumer_group(MODEL), None}


def test_vendored_keda_schemas_are_the_files_the_readme_names(check):
    readme = (check.SCHEMA_DIR / "README.md").read_text()
    assert all(sha in readme for sha in check.VENDORED_SHA256.values())
    assert not list(check.vendored_problems())


# --- compose: each rule bites ---------------------------------------------------------------------------


def compose_with(check: ModuleType, change: Callable[[dict], None]) -> list[str]:
    compose = check.load_yaml(ROOT / "docker-compose.yml")
    change(compose["services"])
    return list(check.compose_problems(compose, check.load_yaml(check.PROMETHEUS_DIR / "prometheus.yml")))


COMPOSE_BREAKS: dict[str, Callable[[dict], None]] = {
    "no health check": lambda s: s["redis"].pop("healthcheck"),
    "health check disabled on a long-running service": lambda s: s["worker"].update(
        healthcheck={"disable": True}),
    "no restart policy": lambda s: s["prometheus"].pop("restart"),
    "probe on /healthz, not /readyz": lambda s: s["worker"]["healthcheck"].update(
        test=["CMD", "python", "-c", "urlopen('http://127.0.0.1:9100/healthz')"]),
    "stop grace not above the drain": lambda s: s["worker"].update(stop_grace_period="10s"),
    "misspelt setting": lambda s: s["worker"]["environment"].update(STREAMSERVE_MAX_BACH="8"),
    "metrics port Prometheus does not scrape": lambda s: s["worker"]["environment"].update(
        STREAMSERVE_METRICS_PORT="9200"),
    "Redis without AOF": lambda s: s["redis"].update(command=["redis-server"]),
    "rules not mounted": lambda s: s["prometheus"]["volumes"].pop(1),
}


@pytest.mark.parametrize("name", COMPOSE_BREAKS)
def test_compose_rules_refuse(check, name):
    assert compose_with(check, COMPOSE_BREAKS[name])


def test_compose_rules_accept_the_file_as_it_is(check):
    assert compose_with(check, lambda services: None) == []


def test_prometheus_without_dns_discovery_scrapes_one_worker_only(check):
    compose = check.load_yaml(ROOT / "docker-compose.yml")
    static = {"scrape_configs": [{"job_name": "streamserve-worker",
                                  "static_configs": [{"targets": ["worker:9100"]}]}]}
    assert any("dns_sd_configs" in p for p in check.compose_problems(compose, static))


def test_docker_compose_itself_refuses_a_malformed_file(check, tmp_path):
    redis_check = '    healthcheck:\n      test: ["CMD", "redis'
    text = (ROOT / "docker-compose.yml").read_text()
    assert redis_check in text
    text = text.replace(redis_check, redis_check.replace("healthcheck", "healthchek"))
    (tmp_path / "docker-compose.yml").write_text(text)
    with pytest.raises(check.CheckFailed, match="healthchek"):
        run(check, check.check_compose, tmp_path / "docker-compose.yml")


# --- prometheus: the rule tests catch a wrong rule ----------------------------------------------------


def copy_prometheus(check: ModuleType, tmp_path: Path) -> Path:
    for path in check.PROMETHEUS_DIR.glob("*.yml"):
        shutil.copy(path, tmp_path)
    return tmp_path


@pytest.mark.parametrize(("old", "new"), [
    ('code!~"OK|INVALID_INPUT|OVERLOADED"', 'code!="OK"'),  # the bot's INVALID_INPUT would page
    ("[5m])) > 0.2", "[5m])) > 0"),                           # one failure in a quiet hour would page
    ("!= on (model, instance, job) group_left", "!="),       # misses a stale child under --processes
    ('streamserve_stream_lag{lane="live"}) > 100', 'streamserve_stream_lag{lane="live"}) > 1000'),
])
def test_promtool_rule_tests_catch_a_changed_rule(check, tmp_path, old, new):
    directory = copy_prometheus(check, tmp_path)
    alerts = (directory / "alerts.yml").read_text()
    assert old in alerts
    (directory / "alerts.yml").write_text(alerts.replace(old, new))
    with pytest.raises(check.CheckFailed, match="promtool test rules|FAILED"):
        run(check, check.check_prometheus, directory)


def test_an_alert_without_a_firing_test_is_refused(check):
    alerts = check.load_yaml(check.PROMETHEUS_DIR / "alerts.yml")
    tests = check.load_yaml(check.PROMETHEUS_DIR / "alerts_test.yml")
    tests["tests"] = [t for t in tests["tests"]
                      if all(c["alertname"] != "StreamserveDeadLetters" for c in t["alert_rule_test"])]
    assert list(check.rule_problems(alerts, tests)) == [
        "alert StreamserveDeadLetters: no test in alerts_test.yml expects it to fire"]


def exported_series() -> dict[str, set[str]]:
    """Sample name → label names, as a worker's /metrics exposes them once it has served a request."""
    from worker.metrics import WorkerMetrics

    process = WorkerMetrics("worker-1")
    metrics = process.model(MODEL)
    metrics.requests("1", "primary", "OK")
    metrics.stream(0, "live", lag=3, pending=1)
    metrics.queue_wait("live", 0.001)
    metrics.inference("1", 4, 0.01)
    metrics.model_load("1", ok=True)
    metrics.load_seconds(0.2)
    metrics.cache("loaded", 1 << 20, 1.0)
    metrics.evicted()
    metrics.serving(1, 1)
    process.cache_totals(1 << 20, 512 << 20)
    return {sample.name: set(sample.labels)
            for family in process.registry.collect() for sample in family.samples}


def test_alerts_and_their_tests_use_what_workers_export(check):
    """The rule tests feed series shaped like the worker's own; Prometheus adds instance and job,
    and prometheus-client's multiprocess mode adds pid (the version served, under --processes)."""
    exported = exported_series()
    used = set(re.findall(r"\bstreamserve_[a-z_]+", (check.PROMETHEUS_DIR / "alerts.yml").read_text()))
    assert used and used <= set(exported), used - set(exported)
    for test in check.load_yaml(check.PROMETHEUS_DIR / "alerts_test.yml")["tests"]:
        for series in test["input_series"]:
            name, _, labels = series["series"].partition("{")
            added_by_scrape = {"instance", "job", "pid"}
            if name != "up":
                assert name in exported, name
                assert set(re.findall(r"(\w+)=", labels)) - added_by_scrape <= exported[name], series


# --- kubernetes: each check bites ---------------------------------------------------------------------


def problems(check: ModuleType, docs: list[tuple[str, dict]]) -> list[str]:
    return [*(p for where, doc in docs for p in check.schema_problems(where, doc)),
            *check.keda_problems(docs), *check.reference_problems(docs), *check.fleet_problems(docs)]


def broken(k8s, variant: str, kind: str, name: str, change: Callable[[dict], None]) -> list[tuple[str, dict]]:
    docs = copy.deepcopy(k8s[variant])
    change(find(docs, kind, name))
    return docs


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def trigger(scaled_object: dict, name: str = "live-lag") -> dict:
    return next(t for t in scaled_object["spec"]["triggers"] if t["name"] == name)


def secret_ref(auth: dict) -> dict:
    return auth["spec"]["secretTargetRef"][0]


WORKER = ("Deployment", "streamserve-worker")
AUTH = ("TriggerAuthentication", "streamserve-redis")
SCALER = ("ScaledObject", "streamserve-worker")
K8S_BREAKS: dict[str, tuple[tuple[str, str], Callable[[dict], None], str]] = {
    # Kubernetes' own schemas, strict
    "unknown probe field": (WORKER, lambda d: container(d)["livenessProbe"].update(httpget={}), "httpget"),
    "port as a string": (WORKER, lambda d: container(d)["ports"][0].update(containerPort="9100"),
                         "'9100' is not of type 'integer'"),
    # KEDA's CRD schema, strict, and its CEL rule
    "unknown ScaledObject field": (SCALER, lambda d: d["spec"].update(minReplicas=2), "minReplicas"),
    "lagCount not a string": (SCALER, lambda d: trigger(d)["metadata"].update(lagCount=32), "32"),
    "min above max": (SCALER, lambda d: d["spec"].update(minReplicaCount=20), "minReplicaCount"),
    # KEDA's scaler parameters
    "misspelt lagCount": (SCALER, lambda d: trigger(d)["metadata"].update(
        lagcount=trigger(d)["metadata"].pop("lagCount")), "lagcount"),
    "password in metadata": (SCALER, lambda d: trigger(d)["metadata"].update(password="x"), "credentials"),
    "unknown scaler": (SCALER, lambda d: trigger(d).update(type="redis-stream"), "redis-stream"),
    "no consumer group": (SCALER, lambda d: trigger(d)["metadata"].pop("consumerGroup"), "consumerGroup"),
    "auth parameter no scaler reads": (AUTH, lambda d: secret_ref(d).update(parameter="pasword"), "pasword"),
    # references
    "missing Secret key": (AUTH, lambda d: secret_ref(d).update(key="REDIS_PASS"), "REDIS_PASS"),
    "scales a Deployment that is not there": (SCALER, lambda d: d["spec"]["scaleTargetRef"].update(
        name="streamserve"), "Deployment/streamserve"),
    "address from env the container lacks": (SCALER, lambda d: trigger(d)["metadata"].update(
        addressFromEnv="REDIS_HOST"), "REDIS_HOST"),
    "other namespace": (SCALER, lambda d: d["metadata"].update(namespace="default"), "namespace"),
    # the fleet's rules
    "readiness on /healthz": (WORKER, lambda d: container(d)["readinessProbe"]["httpGet"].update(
        path="/healthz"), "readinessProbe"),
    "grace below the drain": (WORKER, lambda d: d["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=10), "terminationGracePeriodSeconds"),
    "replicas fixed under KEDA": (WORKER, lambda d: d["spec"].update(replicas=3), "replicas"),
    "no memory limit": (WORKER, lambda d: container(d)["resources"].pop("limits"), "memory limit"),
    "no scrape annotation": (WORKER, lambda d: d["spec"]["template"]["metadata"].pop("annotations"),
                             "prometheus.io"),
    "another model's stream": (SCALER, lambda d: trigger(d)["metadata"].update(
        stream=keys.request_stream("other_model")), "other_model"),
    "misspelt setting": (("ConfigMap", "streamserve-settings"), lambda d: d["data"].update(
        STREAMSERVE_GRACE_PERIOD="10"), "STREAMSERVE_GRACE_PERIOD"),
}


@pytest.mark.parametrize("name", K8S_BREAKS)
def test_k8s_checks_refuse(check, k8s, name):
    (kind, obj), change, expected = K8S_BREAKS[name]
    found = problems(check, broken(k8s, "single", kind, obj, change))
    assert any(expected in p for p in found), found


def test_k8s_checks_accept_the_manifests_as_they_are(check, k8s):
    assert problems(check, k8s["single"]) == []
    assert problems(check, k8s["cluster"]) == []
    assert problems(check, k8s["multi"]) == []


@pytest.mark.parametrize(("change", "expected"), [
    # shard 1's ScaledObject watching shard 2's stream: it would scale on the wrong backlog
    (lambda d: trigger(d)["metadata"].update(stream=keys.request_stream(MODEL, 2)), "streams"),
    (lambda d: d["spec"]["scaleTargetRef"].update(name="streamserve-worker-shard-2"), "ScaledObjects"),
])
def test_each_shard_scales_on_its_own_streams(check, k8s, change, expected):
    docs = broken(k8s, "cluster", "ScaledObject", "streamserve-worker-shard-1", change)
    assert any(expected in p for p in problems(check, docs))


def test_a_shard_deployment_must_say_which_shard_it_reads(check, k8s):
    def read_shard_2(d: dict) -> None:
        args = container(d)["args"]
        args[args.index("--shards") + 1] = "2"

    docs = broken(k8s, "cluster", "Deployment", "streamserve-worker-shard-1", read_shard_2)
    found = problems(check, docs)
    assert any("label shard='1' but --shards '2'" in p for p in found), found
    assert any("streams" in p for p in found), found


def test_a_pdb_selecting_nothing_is_refused(check, k8s):
    docs = broken(k8s, "single", "PodDisruptionBudget", "streamserve-worker",
                  lambda d: d["spec"]["selector"]["matchLabels"].update(shard="0"))
    assert any("PodDisruptionBudgets select its pods" in p for p in problems(check, docs))


def test_the_command_line_runs_the_steps_named(check, k8s, capsys):
    assert check.main(["k8s"]) == 0
    assert capsys.readouterr().out.count("ok  deploy/k8s/") == 3
    with pytest.raises(SystemExit):
        check.main(["kubernetes"])


def test_durations(check):
    assert check.seconds("1m30s") == 90 and check.seconds("15s") == 15 and check.seconds(10) == 10
    with pytest.raises(ValueError):
        check.seconds("15 s")


# --- kubernetes: a model group (deploy/k8s/multi) -------------------------------------------------------

GROUP = ("Deployment", "streamserve-worker-fx")
GROUP_SCALER = ("ScaledObject", "streamserve-worker-fx")


def set_arg(flag: str, value: str | None) -> Callable[[dict], None]:
    """Set ``flag``'s value in the worker's args (append it when absent; remove it for None)."""
    def change(deployment: dict) -> None:
        args = container(deployment)["args"]
        if flag in args:
            del args[args.index(flag):args.index(flag) + 2]
        if value is not None:
            args += [flag, value]
    return change


def relabel(deployment: dict, label: str, value: str) -> None:
    """Give the Deployment's selector and pods ``label=value``."""
    deployment["spec"]["selector"]["matchLabels"][label] = value
    deployment["spec"]["template"]["metadata"]["labels"][label] = value


def query(scaler: dict, lane: str = "live") -> dict:
    return trigger(scaler, f"group-{lane}-lag")["metadata"]


GROUP_BREAKS: dict[str, tuple[tuple[str, str], Callable[[dict], None], str]] = {
    # the group's lag: summed over its models, each stream counted once, per lane
    "each pod's reading summed": (GROUP_SCALER, lambda d: query(d).update(
        query='sum(streamserve_stream_lag{lane="live", model=~"fx_.*"})'), "live lag query"),
    "another group's models": (GROUP_SCALER, lambda d: query(d).update(
        query=query(d)["query"].replace("fx_", "eq_")), "live lag query"),
    "no backfill trigger": (GROUP_SCALER, lambda d: d["spec"]["triggers"].remove(
        trigger(d, "group-backfill-lag")), "backfill lag query"),
    "the pattern changed, not the query": (GROUP, set_arg("--models", "fx_*,eq_spx"), "live lag query"),
    "floor of 0": (GROUP_SCALER, lambda d: d["spec"].update(minReplicaCount=0), "minReplicaCount"),
    "--shards on a group": (GROUP, set_arg("--shards", "0"), "--shards"),
    # KEDA's prometheus scaler
    "misspelt serverAddress": (GROUP_SCALER, lambda d: query(d).update(
        serverAdress=query(d).pop("serverAddress")), "serverAdress"),
    "no threshold": (GROUP_SCALER, lambda d: query(d).pop("threshold"), "'threshold' is required"),
    "threshold not a number": (GROUP_SCALER, lambda d: query(d).update(threshold="32 entries"), "threshold"),
    "server without a scheme": (GROUP_SCALER, lambda d: query(d).update(
        serverAddress="prometheus:9090"), "serverAddress"),
    "Value metric type": (GROUP_SCALER, lambda d: trigger(d, "group-live-lag").update(
        metricType="Value"), "AverageValue"),
    # the pinned hot model's Redis trigger, the pins, the labels
    "a hot stream of a model it does not serve": (GROUP_SCALER, lambda d: trigger(
        d, "fx-eurusd-live-lag")["metadata"].update(stream=keys.request_stream("eq_spx")), "eq_spx"),
    "a hot stream of a shard it does not read": (GROUP_SCALER, lambda d: trigger(
        d, "fx-eurusd-live-lag")["metadata"].update(stream=keys.request_stream("fx_eurusd", 1)),
        "fx_eurusd:1"),
    "a pin outside the group": (GROUP, set_arg("--pin", "eq_spx"), "--pin eq_spx"),
    "--model beside --models": (GROUP, set_arg("--model", "fx_eurusd"), "exactly one of"),
    "no model-group in the selector": (GROUP, lambda d: d["spec"]["selector"]["matchLabels"].pop(
        "model-group"), "model-group"),
    "name without its group": (GROUP, lambda d: relabel(d, "model-group", "eq"), "should end in -eq"),
}


@pytest.mark.parametrize("name", GROUP_BREAKS)
def test_model_group_checks_refuse(check, k8s, name):
    (kind, obj), change, expected = GROUP_BREAKS[name]
    found = problems(check, broken(k8s, "multi", kind, obj, change))
    assert any(expected in p for p in found), found


def test_a_model_group_scales_on_the_sum_of_its_models_lag(check, k8s):
    """Several triggers give the largest of their replica counts: the group's lag is one summed query."""
    scaler = find(k8s["multi"], *GROUP_SCALER)
    worker = find(k8s["multi"], *GROUP)
    assert check.model_selection(worker) == ["fx_*"]
    assert query(scaler)["query"] == (
        'sum(max by (model, shard, lane) (streamserve_stream_lag{lane="live", model=~"fx_.*"}))')
    assert query(scaler, "backfill")["query"] == check.group_lag_query(["fx_*"], "backfill")
    assert scaler["spec"]["minReplicaCount"] >= 1
    assert check.group_lag_query(None, "live") == (
        'sum(max by (model, shard, lane) (streamserve_stream_lag{lane="live"}))')


@pytest.mark.parametrize("selection", [
    ["fx_*"], ["a.b", "fx_?1"], ["fx_[ab]*", "hybrid_cnn_lstm"], ["fx_[!a]*"]])
def test_the_lag_query_selects_the_models_the_workers_serve(check, selection):
    names = ["fx_a1", "fx_b1", "fx_c", "fx_", "axb", "a.b", "hybrid_cnn_lstm", "xfx_a1", "fx_a12"]
    promql = check.promql_model_regex(selection)
    regex = promql.replace("\\\\", "\\")  # a PromQL string's escaped backslash, unescaped
    for name in names:  # PromQL anchors its regexes at both ends
        assert bool(re.fullmatch(regex, name)) == check.serves(selection, name), (name, regex)


def test_a_model_group_scales_on_a_gauge_workers_export(check):
    assert check.LAG_METRIC in exported_series()
    assert exported_series()[check.LAG_METRIC] == {"model", "shard", "lane"}


def test_the_multi_model_page_names_only_metrics_workers_export():
    page = (ROOT / "docs" / "multi-model.md").read_text()
    named = set(re.findall(r"\bstreamserve_[a-z_]+", page))
    exported = {re.sub(r"_(bucket|count|sum|created)$", "", name) for name in exported_series()}
    assert {"streamserve_model_loaded", "streamserve_cache_budget_bytes"} <= named
    assert named <= exported, named - exported


def test_fleets_of_different_variants_select_none_of_each_others_pods(check, k8s):
    """A group's pods carry no shard label; with one, single/'s Deployment and PDB select them."""
    assert list(check.overlap_problems(k8s)) == []
    with_shard = broken(k8s, "multi", *GROUP, lambda d: d["spec"]["template"]["metadata"]["labels"].update(
        shard="all"))
    found = list(check.overlap_problems({**k8s, "multi": with_shard}))
    assert any("deploy/k8s/single: PodDisruptionBudget streamserve-worker selects the pods of "
               "deploy/k8s/multi's Deployment streamserve-worker-fx" in p for p in found), found
    assert any("no shard label" in p for p in problems(check, with_shard))
