"""Offline checks of the deployment files: compose, Prometheus rules, Kubernetes manifests.

    python -m deploy.check [compose] [prometheus] [k8s]      (from the repository root; all three by default)

Each step prints what it checked and exits non-zero on the first step that fails. Nothing is started:
no Docker engine, Kubernetes API or KEDA runs here. docs/deployment.md#validation lists what these
checks prove and what they cannot.

- compose: ``docker-compose config`` (Debian's docker-compose) parses and interpolates
  docker-compose.yml; then our rules: a health check and restart policy on every service, the
  worker's probe, grace period and metrics port, and Prometheus discovering every worker.
- prometheus: ``promtool check config`` on both Prometheus configs, ``promtool check rules`` and
  ``promtool test rules`` (alerts_test.yml); then every alert has a severity, a summary and a test
  in which it fires.
- k8s: built-in kinds against the Kubernetes OpenAPI schemas bundled by ``kubernetes-validate``
  (strict: unknown fields refused) for two Kubernetes versions; KEDA kinds against KEDA's CRD schema
  (vendored in deploy/k8s/schemas, made strict the same way) and its scaler parameter names; then
  cross-references (names, selectors, env, ports, probes) and the stream names against protocol.keys.
  A one-model Deployment (``--model``) scales on exactly the streams it reads; a model group
  (``--models`` / ``--all-models``, deploy/k8s/multi) on its models' summed lag from Prometheus,
  each stream counted once, with a replica floor.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from protocol import keys
from protocol.errors import InvalidInput
from protocol.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
K8S_DIR = ROOT / "deploy" / "k8s"
SCHEMA_DIR = K8S_DIR / "schemas"
# The oldest Kubernetes minor still commonly run, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
KEDA_TAG = "v2.20.2"
VENDORED_SHA256 = {
    "keda.sh_scaledobjects.yaml": "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80",
    "keda.sh_triggerauthentications.yaml": "275307b4cb19ca8f0f506a879282aa4c67587ac16ec757f494d6585c5c185d65",
}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
NAMESPACE = "streamserve"
SEVERITIES = {"page", "warning"}
# Streams KEDA scales on: every lane of every shard a worker Deployment reads.
REDIS_TRIGGERS = {"redis-streams", "redis-cluster-streams"}
ADDRESS_KEYS = {"address", "addresses", "host", "hosts"}
SECRET_KEYS = {"password", "username", "sentinelPassword", "sentinelUsername", "apiKey"}
PROBES = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
# The gauge a model group scales on (worker/metrics.py; tests/test_deploy.py checks workers export it).
LAG_METRIC = "streamserve_stream_lag"
SELECTION_FLAGS = ("--model", "--models", "--all-models")  # which models a worker serves: one of them
# A request stream's name, to read its model back; protocol.keys then rebuilds it to compare.
STREAM_NAME = re.compile(re.escape(keys.PREFIX) + r":\{(?P<model>[^:{}]+)(:\d+)?\}:\w+")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

Doc = dict[str, Any]


class ToolMissing(Exception):
    """A command-line tool a check needs is not installed."""


class CheckFailed(Exception):
    """A deployment file is wrong; the message lists every problem found."""


def run_tool(*args: str, cwd: Path = ROOT) -> str:
    """Run ``args``; its stdout. ToolMissing when the program is absent, CheckFailed when it fails."""
    if shutil.which(args[0]) is None:
        raise ToolMissing(f"{args[0]} is not installed")
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"`{' '.join(args)}` exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def fail_on(problems: Iterable[str]) -> None:
    """Raise CheckFailed listing ``problems``, if there are any."""
    found = list(problems)
    if found:
        raise CheckFailed("\n".join(f"- {p}" for p in found))


def load_yaml(path: Path) -> Any:
    """The one YAML document in ``path``."""
    return yaml.safe_load(path.read_text())


def seconds(duration: str | int | float) -> float:
    """A compose or Prometheus duration ("1m30s", "15s", 10) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def unknown_settings(env: dict[str, Any], where: str) -> Iterator[str]:
    """STREAMSERVE_* names that are no setting: pydantic-settings would ignore them silently."""
    fields = {f"STREAMSERVE_{name.upper()}" for name in Settings.model_fields}
    for name in sorted(env):
        if name.startswith("STREAMSERVE_") and name not in fields:
            yield f"{where}: {name} is not a setting of protocol/settings.py"


# --- compose ---------------------------------------------------------------------------------------


def check_compose(path: Path = ROOT / "docker-compose.yml") -> list[str]:
    """docker-compose config, then :func:`compose_problems`."""
    run_tool("docker-compose", "-f", str(path), "config", "--quiet", cwd=path.parent)
    compose = load_yaml(path)
    fail_on(compose_problems(compose, load_yaml(PROMETHEUS_DIR / "prometheus.yml")))
    return ["docker-compose.yml: `docker-compose config` accepts it; every service has a health check and "
            "a restart policy; worker probe, grace period, settings and Prometheus discovery agree"]


def compose_problems(compose: Doc, prometheus: Doc) -> Iterator[str]:
    """Our rules for docker-compose.yml (``prometheus`` is the config the prometheus service mounts)."""
    services: dict[str, Doc] = compose.get("services", {})
    for name, service in services.items():
        yield from service_basics(name, service)
    workers = [name for name, s in services.items() if str(s.get("command", [""])[0]) == "worker"]
    if not workers:
        yield "docker-compose.yml: no service runs `worker`"
    for name in workers:
        yield from compose_worker_problems(name, services[name], prometheus)
    yield from compose_redis_problems(services)
    yield from compose_prometheus_problems(services)


def service_basics(name: str, service: Doc) -> Iterator[str]:
    """A health check and a restart policy; a one-shot job (restart "no") may disable its check."""
    check = service.get("healthcheck")
    restart = service.get("restart")
    if restart is None:
        yield f"compose service {name}: no restart policy"
    if not check or (check.get("disable") and restart != "no"):
        yield f"compose service {name}: no health check"


def compose_worker_problems(name: str, service: Doc, prometheus: Doc) -> Iterator[str]:
    """The worker's probe hits /readyz on its metrics port, its stop grace outlasts the drain."""
    env = service.get("environment", {})
    port = int(env.get("STREAMSERVE_METRICS_PORT", 0))
    probe = " ".join(service.get("healthcheck", {}).get("test", []))
    if f":{port}/readyz" not in probe:
        yield f"compose service {name}: the health check does not GET /readyz on port {port}"
    grace_s = grace_period_s(env)
    if seconds(service.get("stop_grace_period", "10s")) <= grace_s:
        yield f"compose service {name}: stop_grace_period must exceed the grace period ({grace_s} s)"
    yield from unknown_settings(env, f"compose service {name}")
    if not any(dns_sd_finds(job, name, port) for job in prometheus.get("scrape_configs", [])):
        yield f"prometheus.yml: no dns_sd_configs job finds every `{name}` container (type A, port {port})"


def grace_period_s(env: dict[str, Any]) -> float:
    """STREAMSERVE_GRACE_PERIOD_S from ``env``, else the setting's default."""
    return float(env.get("STREAMSERVE_GRACE_PERIOD_S", Settings.model_fields["grace_period_s"].default))


def dns_sd_finds(job: Doc, name: str, port: int) -> bool:
    """True if ``job`` discovers every container of compose service ``name`` on ``port``."""
    return any(name in sd.get("names", []) and sd.get("type") == "A" and sd.get("port") == port
               for sd in job.get("dns_sd_configs", []))


def compose_redis_problems(services: dict[str, Doc]) -> Iterator[str]:
    """Redis keeps an append-only file, fsynced every second."""
    command = " ".join(services.get("redis", {}).get("command", []))
    if "--appendonly yes" not in command or "--appendfsync everysec" not in command:
        yield "compose service redis: AOF with appendfsync everysec expected"


def compose_prometheus_problems(services: dict[str, Doc]) -> Iterator[str]:
    """The prometheus service mounts our config and rules, and both files exist."""
    mounts = [str(v).split(":")[0] for v in services.get("prometheus", {}).get("volumes", [])]
    for wanted in ("./deploy/prometheus/prometheus.yml", "./deploy/prometheus/alerts.yml"):
        if wanted not in mounts:
            yield f"compose service prometheus: {wanted} is not mounted"
        elif not (ROOT / wanted).is_file():
            yield f"compose service prometheus: {wanted} does not exist"


# --- prometheus ------------------------------------------------------------------------------------


def check_prometheus(directory: Path = PROMETHEUS_DIR) -> list[str]:
    """promtool on the configs, the rules and the rule tests, then :func:`rule_problems`."""
    for config in ("prometheus.yml", "prometheus-k8s.yml"):
        run_tool("promtool", "check", "config", config, cwd=directory)
    run_tool("promtool", "check", "rules", "alerts.yml", cwd=directory)
    run_tool("promtool", "test", "rules", "alerts_test.yml", cwd=directory)
    alerts, tests = load_yaml(directory / "alerts.yml"), load_yaml(directory / "alerts_test.yml")
    fail_on(rule_problems(alerts, tests))
    return ["deploy/prometheus: both configs pass `promtool check config`, alerts.yml `promtool check "
            "rules`, alerts_test.yml `promtool test rules`; every alert has a severity, a summary and a "
            "test in which it fires"]


def rule_problems(alerts: Doc, tests: Doc) -> Iterator[str]:
    """Every alert is labelled, annotated and made to fire by at least one unit test."""
    fired = {case["alertname"] for test in tests.get("tests", [])
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    for group in alerts.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert")
            if name is None:
                continue
            if rule.get("labels", {}).get("severity") not in SEVERITIES:
                yield f"alert {name}: severity must be one of {sorted(SEVERITIES)}"
            if not {"summary", "description"} <= set(rule.get("annotations", {})):
                yield f"alert {name}: a summary and a description annotation are needed"
            if name not in fired:
                yield f"alert {name}: no test in alerts_test.yml expects it to fire"


# --- kubernetes: loading and schemas ---------------------------------------------------------------


def manifests(variant: str) -> list[tuple[str, Doc]]:
    """(file, document) of what one variant applies: the shared files, the example Secret, the variant."""
    paths = [*sorted(K8S_DIR.glob("*.yaml")), K8S_DIR / "examples" / "secret.yaml",
             *sorted((K8S_DIR / variant).glob("*.yaml"))]
    return [(str(p.relative_to(ROOT)), doc) for p in paths
            for doc in yaml.safe_load_all(p.read_text()) if doc is not None]


def variants() -> list[str]:
    """The directories under deploy/k8s that are a complete fleet (one Redis, a Cluster, a model group)."""
    return sorted(p.name for p in K8S_DIR.iterdir() if p.is_dir() and p.name not in {"examples", "schemas"})


def check_k8s() -> list[str]:
    """Schemas, KEDA parameters, references and the fleet's rules, for every variant."""
    fail_on(vendored_problems())
    report = []
    for variant in variants():
        docs = manifests(variant)
        fail_on([*(p for where, doc in docs for p in schema_problems(where, doc)),
                 *keda_problems(docs), *reference_problems(docs), *fleet_problems(docs)])
        kinds = sorted({d["kind"] for _, d in docs})
        report.append(f"deploy/k8s/{variant}: {len(docs)} objects ({', '.join(kinds)}) valid against "
                      f"Kubernetes {' and '.join(K8S_VERSIONS)} (strict) and KEDA {KEDA_TAG} CRDs; "
                      "scaler parameters, references, probes, ports, stream names and lag queries agree")
    fail_on(overlap_problems({variant: manifests(variant) for variant in variants()}))
    report.append("deploy/k8s: no Deployment or PodDisruptionBudget selects another variant's pods")
    return report


def overlap_problems(by_variant: dict[str, list[tuple[str, Doc]]]) -> Iterator[str]:
    """No selector of one variant selects another's worker pods: fleets applied side by side would
    fight over them, and a pod under two PodDisruptionBudgets cannot be evicted (node drains stall)."""
    pods = [(variant, d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"])
            for variant, docs in by_variant.items() for _, d in docs if d["kind"] == "Deployment"]
    for variant, docs in by_variant.items():
        for doc in (d for _, d in docs if d["kind"] in {"Deployment", "PodDisruptionBudget"}):
            selector = doc["spec"]["selector"].get("matchLabels", {})
            yield from (f"deploy/k8s/{variant}: {doc['kind']} {doc['metadata']['name']} selects the pods of "
                        f"deploy/k8s/{other}'s Deployment {name}" for other, name, labels in pods
                        if other != variant and matches(selector, labels))


def vendored_problems() -> Iterator[str]:
    """The vendored KEDA CRDs are the files named in schemas/README.md, unmodified."""
    for name, expected in VENDORED_SHA256.items():
        actual = hashlib.sha256((SCHEMA_DIR / name).read_bytes()).hexdigest()
        if actual != expected:
            yield f"deploy/k8s/schemas/{name}: sha256 {actual}, not the vendored {expected}"


def schema_problems(where: str, doc: Doc) -> Iterator[str]:
    """``doc`` against its kind's schema: KEDA's CRD for keda.sh, Kubernetes' own otherwise."""
    what = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if str(doc.get("apiVersion", "")).startswith("keda.sh/"):
        yield from (f"{what}: {p}" for p in keda_schema_problems(doc))
    else:
        yield from (f"{what}: {p}" for p in builtin_schema_problems(doc))


def builtin_schema_problems(doc: Doc) -> Iterator[str]:
    """kubernetes-validate's strict schemas, for each Kubernetes version in K8S_VERSIONS."""
    yield from builtin_schema_problems_of(json.dumps(doc, sort_keys=True))


@cache
def builtin_schema_problems_of(doc_json: str) -> tuple[str, ...]:
    """:func:`builtin_schema_problems` of a document as JSON, remembered: each call re-reads megabytes."""
    return tuple(validate_builtin(json.loads(doc_json)))


def validate_builtin(doc: Doc) -> Iterator[str]:
    """The problems kubernetes-validate finds in ``doc``."""
    try:  # 100 MB of schemas: loaded only when the k8s step runs
        import kubernetes_validate
        from kubernetes_validate.utils import VersionNotSupportedError
    except ImportError as e:
        raise ToolMissing("kubernetes-validate is not installed (the `dev` extra)") from e
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            yield f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}"
        except (kubernetes_validate.SchemaNotFoundError, VersionNotSupportedError) as e:
            yield f"{e.message} (kubernetes-validate {kubernetes_validate.__version__})"


@cache
def crd_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    """A validator for KEDA ``kind`` at API ``version``, strict like ``kubectl --validate=strict``."""
    crd = load_yaml(SCHEMA_DIR / f"keda.sh_{kind.lower()}s.yaml")
    entry = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(strict_schema(entry["schema"]["openAPIV3Schema"]))


def strict_schema(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields and does not keep unknowns."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def keda_schema_problems(doc: Doc) -> Iterator[str]:
    """The CRD's OpenAPI schema, its one CEL rule (min <= max replicas), and the object's metadata."""
    group_version = str(doc.get("apiVersion", ""))
    if group_version != "keda.sh/v1alpha1" or doc.get("kind") not in KEDA_KINDS:
        yield f"no vendored schema for {group_version} {doc.get('kind')}"
        return
    for error in crd_validator(doc["kind"], "v1alpha1").iter_errors(doc):
        yield f"{'.'.join(map(str, error.path))}: {error.message}"
    spec = doc.get("spec", {})
    # The CRD's x-kubernetes-validations rule, which jsonschema cannot evaluate (CEL).
    if doc["kind"] == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        yield "spec: minReplicaCount must be less than or equal to maxReplicaCount"
    yield from metadata_problems(doc.get("metadata", {}))


def metadata_problems(metadata: Doc) -> Iterator[str]:
    """Object metadata as the API server checks it for a custom resource, in the part we use."""
    extra = set(metadata) - {"name", "namespace", "labels", "annotations"}
    if extra:
        yield f"metadata: unexpected fields {sorted(extra)}"
    name = str(metadata.get("name", ""))
    if len(name) > 253 or not DNS_LABEL.fullmatch(name):
        yield f"metadata.name {name!r} is not a DNS-1123 subdomain"


# --- kubernetes: KEDA parameters -------------------------------------------------------------------


@cache
def scaler_params() -> dict[str, dict[str, set[str]]]:
    """Scaler type → {"metadata", "fromEnv", "authParams", "required"} name sets (KEDA_TAG's sources)."""
    data = json.loads((SCHEMA_DIR / "keda-scaler-params.json").read_text())
    return {kind: {k: set(v) for k, v in params.items()} for kind, params in data["scalers"].items()}


def keda_problems(docs: list[tuple[str, Doc]]) -> Iterator[str]:
    """Trigger metadata and TriggerAuthentication parameters are names KEDA's scalers read."""
    auth_types: dict[str, set[str]] = {}
    for where, doc in docs:
        if doc.get("kind") == "ScaledObject":
            for trigger in doc["spec"].get("triggers", []):
                yield from (f"{where}: trigger {trigger.get('name')}: {p}" for p in trigger_problems(trigger))
                ref = trigger.get("authenticationRef", {}).get("name")
                auth_types.setdefault(ref, set()).add(trigger.get("type"))
    for where, doc in docs:
        if doc.get("kind") == "TriggerAuthentication":
            used_by = auth_types.get(doc["metadata"]["name"], set())
            yield from (f"{where}: {p}" for p in auth_problems(doc, used_by))


def trigger_problems(trigger: Doc) -> Iterator[str]:
    """One trigger's type, metadata names and required names; Redis triggers scale on the lag."""
    params = scaler_params().get(trigger.get("type", ""))
    if params is None:
        yield f"scaler type {trigger.get('type')!r} is not one we checked ({sorted(scaler_params())})"
        return
    metadata: dict[str, str] = trigger.get("metadata", {})
    allowed = params["metadata"] | {f"{name}FromEnv" for name in params["fromEnv"]}
    yield from (f"metadata {name!r} is not read by the {trigger['type']} scaler"
                for name in sorted(set(metadata) - allowed))
    given = {name.removesuffix("FromEnv") for name in metadata}
    yield from (f"metadata {name!r} is required" for name in sorted(params["required"] - given))
    yield from (f"metadata {name!r}: credentials belong in a TriggerAuthentication"
                for name in sorted(SECRET_KEYS & set(metadata)))
    if trigger["type"] in REDIS_TRIGGERS:
        yield from redis_trigger_problems(metadata, given)
    if trigger["type"] == "prometheus":
        yield from prometheus_trigger_problems(trigger)
    if trigger["type"] == "cpu" and trigger.get("metricType") not in {"Utilization", "AverageValue"}:
        yield "the cpu scaler needs metricType Utilization or AverageValue"


def redis_trigger_problems(metadata: dict[str, str], given: set[str]) -> Iterator[str]:
    """An address, a consumer group and a lag target (KEDA >= 2.10, Redis >= 7)."""
    if not given & ADDRESS_KEYS:
        yield "a Redis address is required (address, addresses, host(s)+port(s), or …FromEnv)"
    if not metadata.get("consumerGroup"):
        yield "consumerGroup is required: the lag is the workers' group's"
    if not str(metadata.get("lagCount", "")).isdigit() or int(metadata["lagCount"]) < 1:
        yield "lagCount (a positive integer) is required: we scale on the consumer-group lag"


def prometheus_trigger_problems(trigger: Doc) -> Iterator[str]:
    """An http(s) server, a positive threshold, and replicas = ceil(value / threshold) (AverageValue)."""
    metadata = trigger.get("metadata", {})
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(metadata.get("serverAddress", ""))):
        yield "serverAddress must be Prometheus' http(s) URL"
    try:
        if float(metadata.get("threshold", "")) <= 0:
            yield "threshold must be positive"
    except ValueError:
        yield "threshold must be a number"
    # Value would scale by value / threshold times the current replicas, not to ceil(value / threshold).
    if trigger.get("metricType", "AverageValue") != "AverageValue":
        yield "metricType must be AverageValue (the default): desired replicas = ceil(value / threshold)"


def auth_problems(doc: Doc, trigger_types: set[str]) -> Iterator[str]:
    """A TriggerAuthentication sets only parameters that the scalers using it read."""
    if not trigger_types:
        yield f"TriggerAuthentication {doc['metadata']['name']} is used by no trigger"
    params = scaler_params()
    allowed = set().union(*(params[t]["authParams"] for t in trigger_types if t in params))
    for ref in doc["spec"].get("secretTargetRef", []):
        if ref["parameter"] not in allowed:
            yield f"parameter {ref['parameter']!r} is read by none of {sorted(trigger_types)}"


# --- kubernetes: references between objects --------------------------------------------------------


def index(docs: list[tuple[str, Doc]]) -> dict[tuple[str, str], Doc]:
    """(kind, name) → document."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in docs}


def reference_problems(docs: list[tuple[str, Doc]]) -> Iterator[str]:
    """Every name one object refers to exists, in our namespace."""
    objects = index(docs)
    for where, doc in docs:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] != "Namespace" and namespace != NAMESPACE:
            yield f"{where}: {doc['kind']}/{doc['metadata']['name']} is not in namespace {NAMESPACE}"
        for kind, name, key in references(doc):
            target = objects.get((kind, name))
            if target is None:
                yield f"{where}: {doc['kind']}/{doc['metadata']['name']} refers to a missing {kind}/{name}"
            elif key is not None and key not in {**target.get("data", {}), **target.get("stringData", {})}:
                yield f"{where}: {kind}/{name} has no key {key!r}"
    if ("Namespace", NAMESPACE) not in objects:
        yield f"no Namespace {NAMESPACE}"


def references(doc: Doc) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key or None) of what ``doc`` needs to exist."""
    if doc["kind"] == "ScaledObject":
        target = doc["spec"]["scaleTargetRef"]
        yield target.get("kind", "Deployment"), target["name"], None
        for trigger in doc["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                yield trigger["authenticationRef"].get("kind", "TriggerAuthentication"), \
                    trigger["authenticationRef"]["name"], None
    elif doc["kind"] == "TriggerAuthentication":
        for ref in doc["spec"].get("secretTargetRef", []):
            yield "Secret", ref["name"], ref["key"]
    elif doc["kind"] == "Deployment":
        yield from pod_references(doc["spec"]["template"]["spec"])


def pod_references(pod: Doc) -> Iterator[tuple[str, str, str | None]]:
    """ConfigMaps, Secrets and claims a pod spec mounts or reads its environment from."""
    for container in pod["containers"]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"], None
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"], None
    for volume in pod.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None


# --- kubernetes: the worker fleet ------------------------------------------------------------------


def fleet_problems(docs: list[tuple[str, Doc]]) -> Iterator[str]:
    """Each worker Deployment: probes, ports, grace, resources, settings; its PDB, Service, streams."""
    objects = index(docs)
    settings = objects.get(("ConfigMap", "streamserve-settings"), {}).get("data", {})
    yield from unknown_settings(settings, "ConfigMap streamserve-settings")
    deployments = [doc for _, doc in docs if doc["kind"] == "Deployment"]
    if not deployments:
        yield "no worker Deployment"
    for deployment in deployments:
        what = f"Deployment {deployment['metadata']['name']}"
        yield from (f"{what}: {p}" for p in worker_pod_problems(deployment, settings))
        yield from (f"{what}: {p}" for p in selector_problems(deployment, docs))
        yield from (f"{what}: {p}" for p in stream_problems(deployment, docs, settings))


def worker_container(deployment: Doc) -> Doc:
    """The container that runs ``streamserve worker``."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c.get("args", [""])[0] == "worker")


def worker_pod_problems(deployment: Doc, settings: dict[str, str]) -> Iterator[str]:
    """Probes on the metrics port, scrape annotations, a grace period above the drain, resources."""
    pod = deployment["spec"]["template"]
    container = worker_container(deployment)
    port = int(settings.get("STREAMSERVE_METRICS_PORT", 0))
    if {"name": "metrics", "containerPort": port} not in container.get("ports", []):
        yield f"container port `metrics` must be {port} (STREAMSERVE_METRICS_PORT)"
    for probe, path in PROBES.items():
        if container.get(probe, {}).get("httpGet") != {"path": path, "port": "metrics"}:
            yield f"{probe} must GET {path} on the metrics port"
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)}
    if not scrape.items() <= pod["metadata"].get("annotations", {}).items():
        yield f"pod annotations prometheus.io/scrape \"true\" and prometheus.io/port \"{port}\" expected"
    grace_s = grace_period_s(settings)
    if pod["spec"].get("terminationGracePeriodSeconds", 30) <= grace_s:
        yield f"terminationGracePeriodSeconds must exceed STREAMSERVE_GRACE_PERIOD_S ({grace_s} s)"
    resources = container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if not {"cpu", "memory"} <= set(requests) or "memory" not in limits:
        yield "cpu and memory requests and a memory limit are needed"
    if "replicas" in deployment["spec"]:
        yield "`replicas` is set: each `kubectl apply` would reset what KEDA chose"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """True if ``labels`` satisfy the matchLabels ``selector``."""
    return all(labels.get(k) == v for k, v in selector.items())


def selector_problems(deployment: Doc, docs: list[tuple[str, Doc]]) -> Iterator[str]:
    """Its own selector, one PodDisruptionBudget and the metrics Service select its pods."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    if not matches(deployment["spec"]["selector"]["matchLabels"], labels):
        yield "spec.selector does not select its own pods"
    budgets = [d for _, d in docs if d["kind"] == "PodDisruptionBudget"
               and matches(d["spec"]["selector"].get("matchLabels", {}), labels)]
    if len(budgets) != 1:
        yield f"{len(budgets)} PodDisruptionBudgets select its pods, 1 expected"
    if not any(d["kind"] == "Service" and matches(d["spec"].get("selector", {}), labels) for _, d in docs):
        yield "no Service selects its pods for Prometheus"


def worker_args(deployment: Doc) -> dict[str, str]:
    """``--flag value`` pairs of the worker command line."""
    args = worker_container(deployment)["args"]
    return {a: b for a, b in zip(args, args[1:], strict=False) if a.startswith("--")}


def reads_shards(deployment: Doc) -> list[int]:
    """The shards ``--shards`` names; shard 0 when it reads all (on one Redis there is one shard)."""
    shards = worker_args(deployment).get("--shards")
    return [int(s) for s in shards.split(",")] if shards else [0]


def expected_streams(deployment: Doc) -> set[str]:
    """Every lane of every shard a one-model Deployment (``--model``) reads."""
    return model_streams(worker_args(deployment)["--model"], reads_shards(deployment))


def model_selection(deployment: Doc) -> list[str] | None:
    """The names and fnmatch patterns of ``--models`` (or ``--model``); None for ``--all-models``."""
    args = worker_container(deployment)["args"]
    if "--all-models" in args:
        return None
    flags = worker_args(deployment)
    return [part for part in flags.get("--models", flags.get("--model", "")).split(",") if part]


def serves(selection: list[str] | None, model: str) -> bool:
    """True if a worker started with ``selection`` serves ``model`` once it has a Production version."""
    return selection is None or any(fnmatch.fnmatchcase(model, item) for item in selection)


def promql_model_regex(selection: list[str]) -> str:
    """The RE2 regex (anchored by PromQL) of the model names ``selection`` matches, as fnmatch reads it."""
    def item(pattern: str) -> str:
        out = pattern.replace(".", r"\\.").replace("*", ".*").replace("?", ".")
        return out.replace("[!", "[^")
    return "|".join(item(p) for p in selection)


def group_lag_query(selection: list[str] | None, lane: str) -> str:
    """The lag query a model group scales on: each stream's lag once (every pod exports it), summed."""
    matchers = f'lane="{lane}"' if selection is None else \
        f'lane="{lane}", model=~"{promql_model_regex(selection)}"'
    return f"sum(max by (model, shard, lane) ({LAG_METRIC}{{{matchers}}}))"


def stream_problems(deployment: Doc, docs: list[tuple[str, Doc]], settings: dict[str, str]) -> Iterator[str]:
    """One ScaledObject scales it, on the lag of the streams it reads, with env it has."""
    name = deployment["metadata"]["name"]
    scalers = [d for _, d in docs
               if d["kind"] == "ScaledObject" and d["spec"]["scaleTargetRef"]["name"] == name]
    if len(scalers) != 1:
        yield f"{len(scalers)} ScaledObjects scale it, 1 expected"
        return
    triggers = scalers[0]["spec"]["triggers"]
    redis_triggers = [t for t in triggers if t["type"] in REDIS_TRIGGERS]
    chosen = [f for f in SELECTION_FLAGS if f in worker_container(deployment)["args"]]
    if len(chosen) != 1:
        yield f"exactly one of {', '.join(SELECTION_FLAGS)} expected, not {chosen}"
    elif chosen == ["--model"]:
        yield from one_model_problems(deployment, redis_triggers)
        yield from shard_label_problems(deployment)
    else:
        yield from group_problems(deployment, scalers[0])
    env = set(settings) | secret_keys(docs)
    for trigger in redis_triggers:
        for key, value in trigger["metadata"].items():
            if key.endswith("FromEnv") and value not in env:
                yield f"trigger {trigger.get('name')}: {key} names {value!r}, which its container lacks"


def one_model_problems(deployment: Doc, triggers: list[Doc]) -> Iterator[str]:
    """A one-model fleet scales on exactly the streams it reads, in the workers' group."""
    streams = {t["metadata"].get("stream") for t in triggers}
    if streams != expected_streams(deployment):
        yield f"ScaledObject streams {sorted(map(str, streams))} != the streams it reads " \
              f"{sorted(expected_streams(deployment))}"
    group = keys.consumer_group(worker_args(deployment)["--model"])
    if any(t["metadata"].get("consumerGroup") != group for t in triggers):
        yield f"the ScaledObject's consumerGroup must be {group!r}, the workers' group"


def group_problems(deployment: Doc, scaler: Doc) -> Iterator[str]:
    """A model group scales on its models' summed lag from Prometheus, per lane, above a floor;
    Redis triggers watch only streams of models it serves; pins are among them; its label and name."""
    selection = model_selection(deployment)
    triggers = scaler["spec"]["triggers"]
    # Compared without whitespace: `max by(model,shard,lane)` is the same query.
    queries = {"".join(t["metadata"].get("query", "").split()) for t in triggers if t["type"] == "prometheus"}
    for lane in keys.LANES:
        if "".join(group_lag_query(selection, lane).split()) not in queries:
            yield f"no prometheus trigger with the {lane} lag query {group_lag_query(selection, lane)!r}"
    if "--shards" in worker_args(deployment):
        yield "--shards with a model group: its lag queries would count shards it does not read"
    if scaler["spec"].get("minReplicaCount", 0) < 1:
        yield "minReplicaCount must be at least 1: the lag series vanish with the fleet"
    yield from (f"trigger {t.get('name')}: {p}" for t in triggers if t["type"] in REDIS_TRIGGERS
                for p in group_stream_problems(deployment, selection, t["metadata"]))
    pins = [p for p in worker_args(deployment).get("--pin", "").split(",") if p]
    yield from (f"--pin {p}: not a model it serves" for p in pins if not serves(selection, p))
    yield from model_group_label_problems(deployment)


def group_stream_problems(deployment: Doc, selection: list[str] | None,
                          metadata: dict[str, str]) -> Iterator[str]:
    """A Redis trigger of a group watches one stream of a model it serves, on a shard it reads."""
    stream = str(metadata.get("stream", ""))
    found = STREAM_NAME.fullmatch(stream)
    model = found["model"] if found else ""
    readable = found and serves(selection, model) and stream in model_streams(model, reads_shards(deployment))
    if not readable:
        yield f"stream {stream!r} is not one the Deployment reads"
    elif metadata.get("consumerGroup") != keys.consumer_group(model):
        yield f"consumerGroup must be {keys.consumer_group(model)!r}, the workers' group"


def model_streams(model: str, shards: list[int]) -> set[str]:
    """Every lane of ``shards`` of ``model``, as protocol.keys names them (none for an invalid name)."""
    try:
        return {keys.request_stream(model, shard, lane) for shard in shards for lane in keys.LANES}
    except InvalidInput:
        return set()


def model_group_label_problems(deployment: Doc) -> Iterator[str]:
    """A group's pods carry ``model-group``, selected on and ending its name, and no ``shard``: the
    one-model fleets' selectors name a shard, so they never select a group's pods."""
    group = deployment["spec"]["selector"]["matchLabels"].get("model-group")
    if not group:
        yield "a model group's selector needs a model-group label, to stay apart from other groups"
    elif not deployment["metadata"]["name"].endswith(f"-{group}"):
        yield f"the name should end in -{group} (its model-group)"
    if "shard" in deployment["spec"]["template"]["metadata"]["labels"]:
        yield "a model group's pods carry no shard label: a one-model fleet's selector would select them"


def secret_keys(docs: list[tuple[str, Doc]]) -> set[str]:
    """Every key of every Secret (all are envFrom'd into the worker)."""
    return {key for _, d in docs if d["kind"] == "Secret"
            for key in {**d.get("data", {}), **d.get("stringData", {})}}


def shard_label_problems(deployment: Doc) -> Iterator[str]:
    """The ``shard`` label and the name say which shard ``--shards`` reads (``all`` without it)."""
    shards = worker_args(deployment).get("--shards")
    label = deployment["spec"]["template"]["metadata"]["labels"].get("shard")
    if label != (shards or "all"):
        yield f"label shard={label!r} but --shards {shards!r}"
    if shards is not None and not deployment["metadata"]["name"].endswith(f"-shard-{shards}"):
        yield f"the name should end in -shard-{shards}"


# --- command line ----------------------------------------------------------------------------------

STEPS: dict[str, Callable[[], list[str]]] = {"compose": check_compose, "prometheus": check_prometheus,
                                              "k8s": check_k8s}


def main(argv: list[str] | None = None) -> int:
    """Run the steps named (all by default); 0 when all pass, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__.split("\n")[0])
    parser.add_argument("steps", nargs="*", metavar="|".join(STEPS), help="default: all")
    steps = parser.parse_args(argv).steps or list(STEPS)
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    for step in steps:
        try:
            for line in STEPS[step]():
                print(f"ok  {line}")
        except (ToolMissing, CheckFailed) as e:
            print(f"FAILED {step}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
