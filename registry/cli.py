"""``streamserve registry …`` subcommands.

``register`` checks an ONNX model against its input spec (or infers the spec) with
ONNX Runtime before anything is stored (:mod:`registry.contract`). ``register
--alternate`` compares the outputs of the formats, which needs the serving
backends: the top-level CLI passes a ``parity_checker`` in. Every command that
takes a version takes its number, an alias or its label.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol import connection, sharding
from protocol.errors import RegistryError
from protocol.settings import Settings
from registry.contract import register_onnx
from registry.resharding import reshard
from registry.rollout import wait_for_fleet
from registry.store import FORMATS, PRIMARY, STAGES, ModelVersion, Registry

ParityChecker = Callable[[Registry, ModelVersion], dict[str, float]]


def register(subparsers: argparse._SubParsersAction, *, parity_checker: ParityChecker | None = None,
             more_commands: Callable[[argparse._SubParsersAction], None] | None = None) -> None:
    """Add the ``registry`` command group; the parity hook comes from the serving side."""
    parser = subparsers.add_parser("registry", help="versions, stages, aliases, history, artifacts")
    sub = parser.add_subparsers(dest="registry_command", required=True)
    _add_reading(sub)
    _add_register(sub, parity_checker)
    _add_promote(sub)
    _add_changes(sub)
    if more_commands is not None:  # import/export/sync with other registries (integrations.cli.register)
        more_commands(sub)
    p = sub.add_parser("shards", help="show a model's stream shard layout, or change it live (S)")
    p.add_argument("name")
    p.add_argument("shards", type=int, nargs="?", help="the new number of shards; omitted: show the layout")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per step: workers cover, shards drain")
    p.set_defaults(func=_shards)


def _add_reading(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="models, or the versions of one model")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_list)
    p = sub.add_parser("show", help="one version (number, alias, label or 'production'): its inputs, "
                       "outputs, labels, variants, metrics")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--json", action="store_true", help="the whole registry record as JSON")
    p.set_defaults(func=_show)
    p = sub.add_parser("compare", help="two versions side by side, metric deltas = V2 − V1")
    p.add_argument("name")
    p.add_argument("v1")
    p.add_argument("v2")
    p.set_defaults(func=_compare)
    p = sub.add_parser("history", help="stage and alias changes; --at T: what was in Production")
    p.add_argument("name")
    p.add_argument("--at", help="ISO time or Unix seconds")
    p.set_defaults(func=_history)


def _add_register(sub: argparse._SubParsersAction, parity_checker: ParityChecker | None) -> None:
    p = sub.add_parser("register", help="check a model against its spec and copy it into the store as a "
                       "new version")
    p.add_argument("name")
    p.add_argument("artifact", type=Path)
    p.add_argument("--input-spec", type=json.loads,
                   help='JSON, e.g. {"features": {"dtype": "<f4", "shape": [60, 110]}}; for ONNX, default: '
                   "inferred from the graph (its leading axis is the batch axis)")
    p.add_argument("--outputs", help="comma-separated output names (ONNX: checked against the graph's; "
                   "default: the graph's)")
    p.add_argument("--labels", default="", help="comma-separated class labels of the first output")
    p.add_argument("--label", help="a version label unique within the model, e.g. 1.1.0; commands then "
                   "take it wherever they take a version number")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--description", default="")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="format of ARTIFACT")
    p.add_argument("--alternate", action="append", default=[], metavar="FORMAT=PATH",
                   help="a fallback artifact of the same model, e.g. torch_export=model.pt2")
    p.set_defaults(func=_register, parity_checker=parity_checker)


def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="move a version to a stage (Production archives the previous)")
    p.add_argument("name")
    p.add_argument("version", help="number, alias or label")
    p.add_argument("--stage", default="Production", choices=STAGES)
    p.add_argument("--reason", default="")
    p.add_argument("--allow-archived", action="store_true", help="allow Archived → Production (rollback)")
    p.add_argument("--wait", action="store_true", help="wait until every live worker serves it")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--rollback-on-failure", action="store_true",
                   help="with --wait: restore the previous Production if any worker fails to load it, "
                   "or serves it only through a fallback variant (without --allow-fallback)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="with --wait: a worker serving the version through a fallback variant (e.g. the "
                   "torch artifact when the ONNX one cannot load) counts as switched")
    p.set_defaults(func=_promote)


def _add_changes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alias", help="point an alias at a version (or --remove it)")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", nargs="?", help="number, alias or label")
    p.add_argument("--remove", action="store_true")
    p.add_argument("--reason", default="")
    p.set_defaults(func=_alias)
    p = sub.add_parser("variant", help="serve one of a version's artifacts (primary, onnx_int8_dynamic, …)")
    p.add_argument("name")
    p.add_argument("version", help="number, alias or label")
    p.add_argument("variant")
    p.add_argument("--reason", default="")
    p.set_defaults(func=_variant)
    p = sub.add_parser("metrics", help="add or update metrics/tags/description of a version")
    p.add_argument("name")
    p.add_argument("version", help="number, alias or label")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--description")
    p.set_defaults(func=_metrics)
    p = sub.add_parser("delete", help="delete a version (not Production, not aliased)")
    p.add_argument("name")
    p.add_argument("version", help="number, alias or label")
    p.add_argument("--reason", default="")
    p.set_defaults(func=_delete)
    p = sub.add_parser("gc", help="remove artifacts no version references")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=_gc)


def _shards(args: argparse.Namespace, settings: Settings) -> int:
    with connection.connect(settings.redis_url) as client:
        if args.shards is None:
            layout = sharding.read_layout(client, args.name)
            print(f"{args.name}: route {layout.route}, serve {layout.serve}, highest {layout.highest}")
            return 0
        report = reshard(client, args.name, args.shards, timeout_s=args.timeout_s,
                         ttl_s=settings.heartbeat_ttl_s, secret=settings.control_secret)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


@contextmanager
def _registry(settings: Settings) -> Iterator[Registry]:
    with connection.connect(settings.redis_url) as client:
        yield Registry(client, settings.artifact_dir, control_secret=settings.control_secret)


def _pairs(items: list[str], cast=str) -> dict:
    return {k: cast(v) for k, v in (item.split("=", 1) for item in items)}


def _list(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        if args.name is None:
            print("\n".join(reg.models()))
            return 0
        versions, aliases = reg.versions(args.name), reg.aliases(args.name)
    for mv in versions:
        held = ",".join(a for a, v in aliases.items() if v == mv.version)
        # Headline metrics only; per-variant numbers (``variant.measure``) are in `show`.
        metrics = " ".join(f"{k}={v:.4g}" for k, v in mv.metrics.items() if "." not in k)
        variants = ",".join(mv.load_order)
        print(f"{mv.title:<14} {mv.stage:<10} {held:<20} {mv.sha256[:12]} [{variants}] {metrics}")
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        mv = reg.resolve(args.name, args.version)
        aliases = [a for a, v in reg.aliases(args.name).items() if v == mv.version]
    if args.json:
        print(json.dumps(mv.__dict__, indent=2, default=str))
    else:
        print("\n".join(show_lines(mv, aliases)))
    return 0


def show_lines(mv: ModelVersion, aliases: list[str]) -> list[str]:
    """What ``registry show`` prints: the version, its inputs and outputs, variants and metrics."""
    lines = [f"{mv.name} {mv.title}: {mv.stage}, {mv.format}, {mv.size_bytes} bytes, sha256 {mv.sha256[:16]}",
             f"  aliases: {', '.join(aliases) or '-'}; variants: {', '.join(mv.load_order)} "
             f"(serving {mv.serving_variant or PRIMARY}); golden outputs: {'yes' if mv.golden else 'no'}"]
    if mv.description:
        lines.append(f"  description: {mv.description}")
    lines.append("  inputs (per-sample shape; the batch axis comes first):")
    lines += [f"    {name:<20} {s.get('dtype')!s:<5} {s.get('shape')}" for name, s in mv.input_spec.items()]
    lines.append("  outputs:")
    for i, name in enumerate(mv.output_names):
        s = mv.output_spec.get(name)
        spec = f"{s['dtype']:<5} {s['shape']!s:<12} {s['kind']}" if s else "(not recorded)"
        labels = f" labels {','.join(mv.labels)}" if i == 0 and mv.labels else ""
        lines.append(f"    {name:<20} {spec}{labels}")
    lines += [f"  metric {k} = {v:.6g}" for k, v in sorted(mv.metrics.items())]
    lines += [f"  tag {k} = {v}" for k, v in sorted(mv.tags.items())]
    return lines


def _compare(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        a, b = reg.resolve(args.name, args.v1), reg.resolve(args.name, args.v2)
        result = reg.compare(args.name, a.version, b.version)
    print(f"{'':<16} {a.title:>14} {b.title:>14} {'delta':>12}")
    for name, m in result["metrics"].items():
        delta = "" if m["delta"] is None else f"{m['delta']:+.4g}"
        print(f"{name:<16} {_fmt(m['a']):>14} {_fmt(m['b']):>14} {delta:>12}")
    for name, f in result["facts"].items():
        mark = "" if f["a"] == f["b"] else "  (differs)"
        print(f"{name:<16} {_fmt(f['a'])} | {_fmt(f['b'])}{mark}")
    return 0


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _history(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        if args.at:
            at_s = float(args.at) if args.at.replace(".", "").isdigit() else dt.datetime.fromisoformat(
                args.at).timestamp()
            version = reg.production_at(args.name, at_s)
            print(reg.title(args.name, version) if version else "no version was in Production")
            return 0
        changes = reg.history(args.name)
        titles = {v: reg.title(args.name, v) for v in {c.version for c in changes}}
    for c in changes:
        when = dt.datetime.fromtimestamp(c.at_ms / 1000).isoformat(timespec="milliseconds")
        print(f"{when} {c.kind:<6} {titles[c.version]:<14} {c.source} → {c.target}  by {c.who}  {c.reason}")
    return 0


def _register(args: argparse.Namespace, settings: Settings) -> int:
    outputs = None if args.outputs is None else [o for o in args.outputs.split(",") if o]
    labels = [label for label in args.labels.split(",") if label]
    details = {"metrics": _pairs(args.metric, float), "tags": _pairs(args.tag),
               "description": args.description,
               "alternates": {f: Path(p) for f, p in _pairs(args.alternate).items()}}
    with _registry(settings) as reg:
        if args.format == "onnx":
            mv = register_onnx(reg, args.name, args.artifact, input_spec=args.input_spec, labels=labels,
                               label=args.label, output_names=outputs, **details)
        elif args.input_spec is None:
            raise RegistryError(f"a {args.format} artifact needs --input-spec (only an ONNX graph's is "
                                "inferred)")
        else:
            mv = reg.register(args.name, args.artifact, input_spec=args.input_spec,
                              output_names=outputs or ["probs"], labels=labels, fmt=args.format,
                              label=args.label, **details)
        if mv.alternates and args.parity_checker:
            mv = reg.update(args.name, mv.version, metrics=args.parity_checker(reg, mv))
    print(f"registered {mv!r}")
    how = "inferred from the graph" if args.input_spec is None else "checked against the graph"
    print(f"  input spec ({how if args.format == 'onnx' else 'as given'}): {json.dumps(mv.input_spec)}")
    if mv.output_spec:
        print(f"  output spec: {json.dumps(mv.output_spec)}")
    for name, value in mv.metrics.items():
        print(f"  {name} = {value:.6g}")
    return 0


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        previous = _production_version(reg, args.name)
        version = reg.resolve(args.name, args.version).version
        mv = reg.promote(args.name, version, args.stage, reason=args.reason,
                         allow_archived=args.allow_archived)
        print(f"promoted {mv!r}")
        if not (args.wait and args.stage == "Production"):
            return 0
        report = wait_for_fleet(reg.redis, args.name, version, timeout_s=args.timeout_s,
                                ttl_s=settings.heartbeat_ttl_s, variant=mv.serving_variant or PRIMARY,
                                allow_fallback=args.allow_fallback, label=mv.label)
        print("\n".join(report.lines()))
        if report.ok:
            return 0
        if args.rollback_on_failure and previous is not None and previous != version:
            not_served = sorted({*report.failed, *report.fallback})
            reg.promote(args.name, previous, "Production", allow_archived=True,
                        reason=f"automatic rollback: {mv.title} failed on {not_served}")
            print(f"rolled back to {reg.title(args.name, previous)}")
    return 1


def _production_version(reg: Registry, name: str) -> int | None:
    try:
        return reg.production(name).version
    except RegistryError:
        return None


def _alias(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        if args.remove:
            reg.remove_alias(args.name, args.alias, reason=args.reason)
        elif args.version is None:
            print(f"{args.alias} → {reg.resolve(args.name, args.alias).title}")
        else:
            reg.set_alias(args.name, args.alias, reg.resolve(args.name, args.version).version,
                          reason=args.reason)
    return 0


def _variant(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        version = reg.resolve(args.name, args.version).version
        mv = reg.select_variant(args.name, version, args.variant, reason=args.reason)
    print(f"{mv!r} now serves variant {mv.serving_variant or 'primary'}")
    return 0


def _metrics(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        version = reg.resolve(args.name, args.version).version
        mv = reg.update(args.name, version, metrics=_pairs(args.metric, float),
                        tags=_pairs(args.tag), description=args.description)
    print(json.dumps({"metrics": mv.metrics, "tags": mv.tags, "description": mv.description}, indent=2))
    return 0


def _delete(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        mv = reg.resolve(args.name, args.version)
        reg.delete(args.name, mv.version, reason=args.reason)
    print(f"deleted {args.name} {mv.title}; run `streamserve registry gc` to free its artifact")
    return 0


def _gc(args: argparse.Namespace, settings: Settings) -> int:
    with _registry(settings) as reg:
        removed = reg.gc(dry_run=args.dry_run)
    for path in removed:
        print(("would remove " if args.dry_run else "removed ") + str(path))
    return 0
