"""Which models a worker process serves: a list, a pattern, or every model in Production.

``--models a,b`` names them; ``--models 'fx_*'`` (any of ``*?[``) and ``--all-models``
select, from the registry, the models with a Production version, so the set follows
the registry as models are promoted and retired (:meth:`ModelSelector.resolve`, called
at each reconcile). ``--model M`` is the one-model case: a list of one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from protocol import keys
from protocol.errors import ConfigError, InvalidInput
from protocol.values import text

PATTERN_CHARS = frozenset("*?[")
MAX_MODELS = 1000  # a process serving more than this is a configuration mistake, not a fleet


@dataclass(frozen=True)
class ModelSelector:
    """Named models (served whatever the registry says) and/or patterns (models in Production)."""

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, models: str | Sequence[str] | None, *, all_models: bool = False) -> ModelSelector:
        """From ``--models`` (comma-separated names and patterns) and ``--all-models``."""
        parts = [p.strip() for p in (models.split(",") if isinstance(models, str) else models or ())]
        parts = [p for p in parts if p]
        patterns = [p for p in parts if PATTERN_CHARS & set(p)]
        try:
            names = tuple(dict.fromkeys(keys.check_model_name(p) for p in parts if p not in patterns))
        except InvalidInput as e:
            raise ConfigError(f"--models: {e}") from e
        if all_models:
            patterns = ["*"]
        if not names and not patterns:
            raise ConfigError("no model to serve: give --model, --models or --all-models")
        return cls(names, tuple(dict.fromkeys(patterns)))

    @property
    def is_static(self) -> bool:
        """The set never changes (names only): no registry read is needed to know it."""
        return not self.patterns

    def matches(self, model: str) -> bool:
        """Whether ``model`` may be in the set (named, or matching a pattern)."""
        return model in self.names or any(fnmatch.fnmatchcase(model, p) for p in self.patterns)

    def resolve(self, client: redis.Redis) -> list[str]:
        """The models to serve now: the names, and the registered models in Production that match a
        pattern (one pipelined read). Names that are not valid model names are skipped: the
        registry's set is untrusted."""
        if self.is_static:
            return list(self.names)
        candidates = [m for m in (text(r) for r in client.smembers(keys.models_set()))
                      if m not in self.names and self.matches(m) and _valid(m)]
        candidates.sort()
        pipe = client.pipeline(transaction=False)
        for m in candidates:
            pipe.hget(keys.model_hash(m), "production_version")
        in_production = [m for m, v in zip(candidates, pipe.execute(), strict=True) if v]
        return [*self.names, *in_production][:MAX_MODELS]

    def describe(self) -> str:
        """For logs: ``a, b, fx_*``."""
        return ", ".join([*self.names, *self.patterns])


def _valid(model: str) -> bool:
    try:
        keys.check_model_name(model)
    except InvalidInput:
        return False
    return True
