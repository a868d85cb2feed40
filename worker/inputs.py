"""The served version's input contract, checked on every request before the model runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from protocol.errors import InvalidInput


class InputSpec:
    """The served version's inputs: name → (dtype, per-sample shape)."""

    def __init__(self, spec: dict[str, dict[str, Any]]) -> None:
        self.fields = {name: (np.dtype(s["dtype"]), tuple(s["shape"])) for name, s in spec.items()}

    def check(self, inputs: dict[str, np.ndarray], max_rows: int) -> None:
        """Raise ``InvalidInput`` naming the first mismatch."""
        if set(inputs) != set(self.fields):
            raise InvalidInput(f"inputs {sorted(inputs)} do not match the model's {sorted(self.fields)}")
        for name, array in inputs.items():
            dtype, shape = self.fields[name]
            if array.dtype != dtype:
                raise InvalidInput(f"input {name!r} has dtype {array.dtype.str}, expected {dtype.str}")
            if array.shape[1:] != shape:
                raise InvalidInput(
                    f"input {name!r} has per-sample shape {list(array.shape[1:])}, expected {list(shape)}"
                )
            if array.shape[0] > max_rows:
                raise InvalidInput(f"input {name!r} has {array.shape[0]} rows; limit is {max_rows}")
