"""A disk cache for the design's calibrations: ``experiment simulate`` and ``create`` need not re-run them.

The group-sequential boundaries and the drift that sizes the plan are calibrated by
simulating 200,000 look paths (:mod:`experiments.stats`): about 2.6 s and 130 MB
each time a process first needs them. They depend only on their arguments and on the
code that computes them, so :func:`disk_cached` keys each result by the function's
name, its arguments, the source of its whole module and numpy's version (the random
streams), and keeps it as JSON under the cache directory, in ``calibration/``:
``Settings.cache_dir`` (``STREAMSERVE_CACHE_DIR``; the ``streamserve`` command
passes it to :func:`configure`), else ``~/.cache/streamserve``. A file that is missing, unreadable or
malformed is computed again and rewritten; a directory that cannot be written only
costs the time.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


_directory: list[Path] = []  # the configured cache directory, if any (settings are read once, by the CLI)


def configure(directory: Path | None) -> None:
    """Keep calibrations under ``directory`` (``Settings.cache_dir``); None: the default."""
    _directory[:] = [directory] if directory is not None else []


def cache_dir() -> Path:
    """Where calibrations are kept (created on first write)."""
    base = _directory[0] if _directory else Path.home() / ".cache" / "streamserve"
    return base / "calibration"


def disk_cached(function: F) -> F:
    """Keep ``function``'s results (numbers, or tuples / lists of numbers) on disk, keyed by its arguments
    and its module's source."""
    module = sys.modules.get(function.__module__)
    try:
        source = inspect.getsource(module) if module is not None else function.__qualname__
    except (OSError, TypeError):  # no source (frozen, zipped): the function's name and numpy's version
        source = function.__qualname__
    code = hashlib.sha256(f"{source}\0{np.__version__}".encode()).hexdigest()

    @functools.wraps(function)
    def cached(*args: Any, **kwargs: Any) -> Any:
        key = json.dumps([function.__module__, function.__qualname__, code, args, sorted(kwargs.items())],
                         default=repr)
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        path = cache_dir() / f"{function.__qualname__.strip('_')}-{digest}.json"
        found = _load(path, key)
        if found is not None:
            return found
        value = function(*args, **kwargs)
        _store(path, key, value)
        return value

    return cast("F", cached)


def _load(path: Path, key: str) -> Any:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    value = record.get("value")
    if not _numbers(value):
        return None
    return tuple(value) if isinstance(value, list) and record.get("tuple") else value


def _numbers(value: Any) -> bool:
    """A finite number, or a list of them: all this cache keeps."""
    if isinstance(value, list):
        return all(_number(v) for v in value)
    return _number(value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _store(path: Path, key: str, value: Any) -> None:
    plain = list(value) if isinstance(value, tuple) else value
    if not _numbers(plain):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside it and renamed: a reader sees the old file or the whole new one.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"key": key, "value": plain, "tuple": isinstance(value, tuple)}, f)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only home: the calibration is recomputed next time
