"""The model slot: which version the registry wants served, what is loaded, and the swap between them.

At start-up the target loads in line (a pinned model) or on the first request,
in the background (a model of a multi-model worker's cache); afterwards a new
target loads in a background thread beside the served version and is swapped in
between two batches. A version that cannot load (sha256 mismatch, bad file,
golden check) is reported and the one already loaded keeps serving. Every load is
measured: its duration and the resident memory it added (``size_bytes``).
"""

from __future__ import annotations

import logging

from protocol.errors import StreamserveError
from protocol.settings import Settings
from registry import ModelVersion, Registry
from worker.loader import LoadedModel, Reloader, load_version, measured

log = logging.getLogger(__name__)


class ModelSlot:
    """The Production version of one model, as one worker serves it."""

    def __init__(self, registry: Registry, model: str, settings: Settings) -> None:
        self.registry, self.model, self.settings = registry, model, settings
        self.loaded: LoadedModel | None = None
        self.load_error = "not loaded yet"
        self.registry_error = ""  # the registry could not be read or parsed at the last reconcile
        self.target_version: int | None = None
        self.target: ModelVersion | None = None  # the record of target_version, as last read
        self.target_variant = ""
        self.reloader = Reloader(lambda mv: load_version(registry, mv, settings))
        self.size_bytes, self.load_ms = 0, 0.0  # of the version loaded (measured)

    @property
    def loading(self) -> bool:
        """A version is loading in the background."""
        return self.reloader.loading is not None

    def reconcile(self, *, in_line: bool = True) -> None:
        """Converge on the registry's Production version: in line when nothing is loaded and
        ``in_line``; otherwise a loaded model reloads in the background, and an unloaded one
        only learns its target (:meth:`request_load` loads it)."""
        try:
            target = self.registry.production(self.model)
        except StreamserveError as e:
            # A malformed or missing record: keep serving what is loaded, say why it is not updated.
            if str(e) != self.registry_error:
                log.error("registry unusable for %s (%s); %s keeps serving", self.model, e, self.describe())
            self.registry_error = str(e)[:300]
            if self.loaded is None:
                self.load_error = self.registry_error
            return
        self.registry_error = ""
        self.target_version, self.target_variant = target.version, target.serving_variant
        self.target = target
        if self.loaded is not None:
            if not self._is_target(self.loaded):
                self.reloader.request(target)
            return
        if not in_line:
            return
        try:
            self.loaded, self.size_bytes, self.load_ms = measured(
                lambda: load_version(self.registry, target, self.settings))
            self.load_error = ""
        except StreamserveError as e:
            self.load_error = f"v{target.version}: {e}"
            log.error("cannot load %s v%s: %s", self.model, target.version, e)

    @property
    def can_load(self) -> bool:
        """Unloaded, with a target that is not known to fail: :meth:`request_load` would load it."""
        return self.loaded is None and self.target_version is not None and not self.registry_error \
            and not self.target_failed()

    def request_load(self) -> None:
        """Load the target in the background (a cold or evicted model's first request)."""
        if self.can_load and not self.loading and self.target is not None:
            self.reloader.request(self.target)

    def forget_failure(self) -> None:
        """Let :meth:`request_load` try the target again after its load failed."""
        if self.target_version is not None:
            self.reloader.failures.pop(self.target_version, None)

    def unload(self, why: str) -> None:
        """Drop the loaded version (evicted); the next :meth:`request_load` loads it again."""
        self.reloader.discard()
        self.loaded, self.load_error, self.size_bytes = None, why, 0

    def swap_if_ready(self) -> bool:
        """Swap in a version loaded in the background; True when what to report changed."""
        ready = self.reloader.take_ready()
        if ready is not None and self._is_target(ready):
            previous = self.loaded.version.version if self.loaded else None
            self.loaded, self.load_error = ready, ""
            self.size_bytes, self.load_ms = self.reloader.last_size_bytes, self.reloader.last_load_ms
            log.info("swapped %s v%s → v%s", self.model, previous, ready.version.version)
            return True
        if self.target_failed() and self.problem() != self.load_error:
            self.load_error = self.problem()
            return True
        return False

    def _is_target(self, loaded: LoadedModel) -> bool:
        mv = loaded.version
        return (mv.version, mv.serving_variant) == (self.target_version, self.target_variant)

    def target_failed(self) -> bool:
        """The version the registry wants could not be loaded."""
        return self.target_version in self.reloader.failures

    def problem(self) -> str:
        """What to report: the target's load failure, else the last start-up error."""
        if self.registry_error:
            return f"registry: {self.registry_error}"
        if self.target_version is not None and self.target_failed():
            return f"v{self.target_version}: {self.reloader.failures[self.target_version]}"
        return self.load_error

    def describe(self) -> str:
        """``v3``, or ``nothing: <why>``."""
        return f"v{self.loaded.version.version}" if self.loaded else f"nothing: {self.load_error}"
