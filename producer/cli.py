"""``streamserve predict`` and ``streamserve health``.

``predict`` builds its request from the model's registered input spec (the Production version's
``input_spec``, read from the registry hashes through :mod:`protocol.keys`), so any model can be
tried without knowing its inputs; a predictable problem (no Production version, an unreadable spec,
a file that does not fit) is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from producer.client import Client
from protocol import codec, keys, messages
from protocol.errors import ConfigError, InvalidInput, ModelNotFound, RegistryError
from protocol.messages import OUTSIDE, Prediction
from protocol.settings import Settings
from protocol.values import text

# name → (dtype, per-sample shape): a version's inputs as its registry hash declares them
Spec = dict[str, tuple[np.dtype, tuple[int, ...]]]
MAX_SPEC_BYTES = 1 << 16  # a registry field is untrusted: a spec is a few hundred bytes
SHOWN_VALUES = 6  # the summary line on stderr abbreviates longer outputs


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client-side commands."""
    p = subparsers.add_parser(
        "predict", help="send one request: random inputs built from the model's registered input spec, "
                        "or arrays from --npy / --npz")
    p.add_argument("model")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--npy", help="the array of a model with one input: one sample, or N rows with a "
                                      "leading batch axis; cast to the input's registered dtype")
    source.add_argument("--npz", help="one array per input, by input name (numpy.savez), for a model with "
                                      "several inputs")
    p.add_argument("--shape", help="per-sample shape of the random sample (e.g. 60,110), overriding the "
                                   "registered one; a model with one input only")
    p.add_argument("--route", default="")
    p.add_argument("--timeout-s", type=float, default=1.0)
    p.add_argument("--in-experiment", action="store_true",
                   help="take part in the model's running experiment (assigned to an arm and journaled as an "
                        "exposure, which then waits for an outcome); by default the request is sent outside "
                        "any experiment and the Production version answers it")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("health", help="live workers of a model and the versions they serve")
    p.add_argument("model")
    p.set_defaults(func=_health)


def _predict(args: argparse.Namespace, settings: Settings) -> int:
    with Client.from_url(settings.redis_url) as client:
        spec = production_spec(client.redis, args.model)
        features = _features(args, spec)
        first = next(iter(features))
        # A random sample is one sample; a file's array of the input's registered rank is one sample,
        # with one axis more it is N rows.
        sample_ndim = len(spec[first][1]) if args.npy or args.npz else features[first].ndim
        p = client.predict(args.model, features, route=args.route, timeout_s=args.timeout_s,
                           sample_ndim=sample_ndim, experiment=args.in_experiment)
    print(json.dumps(reply_json(p), indent=2))
    print(f"answered by {p.model} v{p.model_version}, arm: {_arm(p, args.in_experiment)}; {summary(p)}",
          file=sys.stderr)
    return 0


def production_spec(client: Any, model: str) -> Spec:
    """The input spec of ``model``'s Production version, read from its registry hashes (§11 of the
    protocol); ``ModelNotFound`` without one, ``RegistryError`` for a spec that cannot be read."""
    version = client.hget(keys.model_hash(model), "production_version")
    if version is None:
        known = client.exists(keys.model_hash(model))
        raise ModelNotFound(f"model {model!r} " + ("has no version in Production" if known
                                                   else "is not in the registry"))
    number = text(version)
    if not (number.isascii() and number.isdigit() and len(number) < 12):
        raise RegistryError(f"model {model!r}: production_version {number[:32]!r} is not a number")
    raw = client.hget(keys.version_hash(model, int(number)), "input_spec")
    return parse_spec(raw, f"{model} v{number}")


def parse_spec(raw: Any, where: str) -> Spec:
    """A registry ``input_spec`` (JSON text) as name → (dtype, per-sample shape); ``RegistryError``
    naming what is wrong, for anything but 1-16 inputs of a wire dtype and positive dimensions."""
    if raw is None:
        raise RegistryError(f"{where} has no input_spec in its registry hash")
    try:
        if len(raw) > MAX_SPEC_BYTES:
            raise ValueError(f"{len(raw)} bytes")
        entries = json.loads(raw)
        if not isinstance(entries, dict) or not 1 <= len(entries) <= messages.MAX_INPUTS:
            raise ValueError(f"not a map of 1-{messages.MAX_INPUTS} inputs")
        return {str(name): _field_spec(entry) for name, entry in entries.items()}
    except (ValueError, TypeError, InvalidInput) as e:  # JSONDecodeError is a ValueError
        raise RegistryError(f"{where}: input_spec is unreadable ({str(e)[:200]})") from e


def _field_spec(entry: Any) -> tuple[np.dtype, tuple[int, ...]]:
    dtype, shape = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)
    if not isinstance(dtype, str) or not isinstance(shape, list) or len(shape) >= codec.MAX_NDIM:
        raise ValueError(f"an input needs a dtype and a shape of at most {codec.MAX_NDIM - 1} dims, "
                         f"got {str(entry)[:80]}")
    if not all(type(d) is int and d >= 1 for d in shape):
        raise ValueError(f"shape {shape} must hold positive ints")
    return np.dtype(codec.dtype_name(np.dtype(dtype))), tuple(shape)


def _features(args: argparse.Namespace, spec: Spec) -> dict[str, np.ndarray]:
    """The request's inputs, in the spec's order: from --npz, --npy, or drawn at random."""
    names = list(spec)
    if args.shape is not None and (args.npz or args.npy):
        raise ConfigError("--shape shapes the random sample; it does not apply with --npy or --npz")
    if args.npz:
        arrays = _load_npz(args.npz)
        if set(arrays) != set(names):
            raise ConfigError(f"{args.npz} holds {sorted(arrays)}; the model's inputs are {sorted(names)}")
        return {n: _cast(arrays[n], spec[n][0], n) for n in names}
    if len(names) != 1 and (args.npy or args.shape is not None):
        what = "--npy" if args.npy else "--shape"
        raise ConfigError(f"{what} is for a model with one input; this one has {len(names)} "
                          f"({', '.join(names)}): give them by name with --npz")
    if args.npy:
        return {names[0]: _cast(_load_npy(args.npy), spec[names[0]][0], names[0])}
    rng = np.random.default_rng()
    if args.shape is not None:
        spec = {names[0]: (spec[names[0]][0], _parse_shape(args.shape))}
    return {n: _random(rng, dtype, shape) for n, (dtype, shape) in spec.items()}


def _parse_shape(text_: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text_.split(",") if d.strip())
    except ValueError as e:
        raise ConfigError(f"--shape {text_!r} must be comma-separated integers, e.g. 60,110") from e
    if any(d < 1 for d in shape):
        raise ConfigError(f"--shape {text_!r} must hold positive integers")
    return shape


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A random sample: normal floats; integers and bools 0 or 1 (a valid index into any table of two
    or more, where an integer input is a category)."""
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


def _load_npy(path: str) -> np.ndarray:
    loaded = _load(path)
    if not isinstance(loaded, np.ndarray):
        raise ConfigError(f"{path} is an .npz archive: give it with --npz")
    return loaded


def _load_npz(path: str) -> dict[str, np.ndarray]:
    loaded = _load(path)
    if isinstance(loaded, np.ndarray):
        raise ConfigError(f"{path} holds one array (.npy): give it with --npy, or save the inputs by "
                          "name with numpy.savez")
    with loaded:
        try:  # members are read here: one of pickled objects is refused now (never loaded)
            return {name: loaded[name] for name in loaded.files}
        except ValueError as e:
            raise ConfigError(f"cannot read {path} as .npz: {e}") from e


def _load(path: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # not an array file, or pickled objects (never loaded)
        raise ConfigError(f"cannot read {path} as .npy/.npz: {e}") from e


def _cast(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """``array`` in the input's dtype, where numpy casts within a kind (float64 → float32); a float
    file for an integer input is refused, not truncated."""
    try:
        return array.astype(dtype, casting="same_kind", copy=False)
    except TypeError as e:
        raise ConfigError(f"input {name!r}: the file holds {array.dtype}, the model takes {dtype}") from e


def reply_json(p: Prediction) -> dict[str, Any]:
    """The reply for stdout: ``label`` and ``confidence`` (one per row) when the version has labels,
    and every output's value(s): one sample's (a number for a scalar output) or every row's."""
    reply: dict[str, Any] = {"model": p.model, "version": p.model_version, "variant": p.variant}
    if p.labels:
        reply.update(label=p.labels, confidence=p.confidences)
    reply["outputs"] = {name: _plain(p.value_of(name) if p.single else p.values_of(name))
                        for name in p.output_names}
    reply.update(queue_ms=round(p.queue_ms, 3), infer_ms=round(p.infer_ms, 3), worker=p.worker)
    return reply


def summary(p: Prediction) -> str:
    """The answer in words: the label and its confidence when there are labels, else the outputs."""
    if p.labels:
        pairs = zip(p.labels, p.confidences, strict=False)
        return ", ".join(f"{label} (confidence {c:.3f})" for label, c in pairs)
    return "; ".join(f"{name} {_short(p.value_of(name) if p.single else p.values_of(name))}"
                     for name in p.output_names)


def _plain(value: float | np.ndarray) -> Any:
    return value if isinstance(value, float) else value.tolist()


def _short(value: float | np.ndarray) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return np.array2string(value, precision=4, threshold=SHOWN_VALUES, edgeitems=SHOWN_VALUES // 2)


def _arm(p: Prediction, asked_in: bool) -> str:
    """Which arm answered, in words; the JSON on stdout stays machine-readable."""
    if p.variant == OUTSIDE:
        return "none (sent outside any experiment)"
    if not p.in_experiment:
        return "none (no experiment active)"
    if asked_in:
        return f"{p.variant} (journaled as an exposure of the running experiment)"
    return (f"{p.variant}: the worker predates the 'experiment' field, so this request was journaled as an "
            "exposure of the running experiment")


def _health(args: argparse.Namespace, settings: Settings) -> int:
    with Client.from_url(settings.redis_url) as client:
        health = client.health(args.model)
    for w in health.workers:
        version = f"v{w.version}" if w.version is not None else w.cache or "none"  # cold, evicted, …
        print(f"{w.worker_id:<40} {version:<8} {w.backend:<12} {w.state:<9} age={w.age_ms()}ms {w.error}")
    print(repr(health))
    return 0 if health.ok else 1
