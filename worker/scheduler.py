"""Which model's buffered work the next batch takes: deficit round-robin by rows, live lane first.

One worker process serves several models and a batch never mixes models, so before each batch
the loop asks :class:`DeficitScheduler` which model goes. Models are visited in a ring; a model
visited gets a quantum of rows (``max_batch``) as credit, capped at one quantum, and, while its
credit is positive, one batch: the turn then passes. Each batch is charged the rows it actually
computed. A model whose batches are larger than its credit runs into debt and skips turns until
it has paid it off, so rows served, not batches, come out equal between models whose batches are
full; a model whose batches are small (a closed loop of a few bots) still gets one batch a turn,
not a quantum's worth of small batches while the others wait.

Lane classes are strict: a model with live entries buffered (class 0) always goes before one
that has only backfill (class 1); backfill is served when no live work is buffered anywhere.

Why deficit round-robin and not earliest-deadline-first:

- Under a flood the flooder's heads are the oldest entries, so they carry the earliest
  deadlines; EDF keeps picking the flooder, and a trickle model's request waits behind the
  flooder's whole backlog.
- Under overload EDF misses every deadline together: it spends the machine on requests that are
  already nearly late, and the ones behind them become late in turn.
- Deadlines are the clients' numbers; a client that asks for shorter ones would take the machine.
- Round-robin with one batch a turn bounds a quiet model's wait to one batch per other active
  model, whatever the others send.

Pure bookkeeping: no Redis, no clock. Each pick costs a pass over ``ready`` (dict look-ups, no
sorting) plus ring steps that are amortised O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping


class DeficitScheduler:
    """Deficit round-robin by rows between models, the lowest lane class present going first.

    ``pick(ready)`` names the model whose buffered work the next batch takes; after the batch,
    ``charge(model, rows)`` subtracts the rows computed from that model's credit.
    """

    def __init__(self, quantum_rows: int) -> None:
        if quantum_rows < 1:
            raise ValueError(f"quantum_rows must be at least 1, not {quantum_rows}")
        self.quantum_rows = quantum_rows
        # One ring per lane class, in join order; a ring's first model is the one whose turn it is.
        # An OrderedDict rather than a deque: a model leaves from the middle in O(1).
        self._rings: dict[int, OrderedDict[str, None]] = {}
        self._turn: dict[int, str] = {}  # class → the head that has had its quantum for this visit
        self._class: dict[str, int] = {}  # models with work buffered → their lane class
        self._deficit: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"DeficitScheduler(quantum_rows={self.quantum_rows}, ready={self._class!r})"

    def pick(self, ready: Mapping[str, int]) -> str | None:
        """The model the next batch serves, or ``None`` when nothing is buffered.

        ``ready`` maps each model with buffered work to the lane class of its best entry
        (0 = live entries, 1 = backfill only); a model absent from it has nothing buffered.
        """
        self._sync(ready)
        if not self._class:
            return None
        lane = min(self._rings)
        return self._next_in(lane, self._rings[lane])

    def charge(self, model: str, rows: int) -> None:
        """Subtract the rows a batch of ``model`` actually computed from its credit; if it was
        ``model``'s turn, the turn passes to the next model with work."""
        if model not in self._deficit:
            return
        self._deficit[model] -= rows
        lane = self._class.get(model)
        if lane is not None and self._turn.get(lane) == model:
            self._rings[lane].move_to_end(model)
            del self._turn[lane]

    def forget(self, model: str) -> None:
        """Drop every trace of ``model``: it is no longer served."""
        self._leave(model)
        self._deficit.pop(model, None)

    def deficit(self, model: str) -> int:
        """``model``'s credit in rows now (negative: a debt it pays off by skipping turns)."""
        return self._deficit.get(model, 0)

    def _sync(self, ready: Mapping[str, int]) -> None:
        """Bring the rings in line with ``ready``: leavers out, joiners and class changes at the tail."""
        for model in [m for m in self._class if m not in ready]:
            self._leave(model)
        for model, lane in ready.items():
            if self._class.get(model) != lane:
                self._leave(model)
                self._class[model] = lane
                self._rings.setdefault(lane, OrderedDict())[model] = None
                self._deficit.setdefault(model, 0)

    def _leave(self, model: str) -> None:
        """Take ``model`` out of its ring; unused credit is dropped, as DRR requires.

        A debt is kept: a model whose batch outgrew its credit and then emptied its buffer would
        otherwise come back with a clean slate each time and take more than its share.
        """
        lane = self._class.pop(model, None)
        if lane is None:
            return
        ring = self._rings[lane]
        del ring[model]
        if not ring:
            del self._rings[lane]
        if self._turn.get(lane) == model:
            del self._turn[lane]
        self._deficit[model] = min(self._deficit[model], 0)

    def _next_in(self, lane: int, ring: OrderedDict[str, None]) -> str:
        """Walk ``ring`` from its head: a model newly visited gains a quantum; the first in credit goes."""
        steps = 0
        while True:
            model = next(iter(ring))
            if self._turn.get(lane) != model:
                self._turn[lane] = model
                self._deficit[model] = min(self._deficit[model] + self.quantum_rows, self.quantum_rows)
            if self._deficit[model] > 0:
                return model
            ring.move_to_end(model)
            del self._turn[lane]
            steps += 1
            if steps == len(ring):  # a whole pass and everyone still in debt
                self._skip_passes(ring)
                steps = 0

    def _skip_passes(self, ring: OrderedDict[str, None]) -> None:
        """Credit at once the passes in which nobody in ``ring`` would come out of debt."""
        passes = min(-self._deficit[m] // self.quantum_rows for m in ring)
        for model in ring:
            self._deficit[model] += passes * self.quantum_rows
