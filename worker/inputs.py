"""The served version's input contract, checked on every request before the model runs.

The contract comes from the registry hash (``input_spec``), which is untrusted:
it is validated once when a version loads, and a malformed one is a
``ConfigError`` for that version, never a crash.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol import codec
from protocol.errors import ConfigError, InvalidInput

MAX_INPUTS = 16


class FieldSpec(BaseModel):
    """One named input: wire dtype, per-sample shape, and whether NaN/±Inf may be sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str
    shape: list[int] = Field(max_length=codec.MAX_NDIM - 1)
    allow_non_finite: bool = False

    @field_validator("dtype")
    @classmethod
    def _wire_dtype(cls, value: str) -> str:
        try:
            return codec.dtype_name(np.dtype(value))
        except (TypeError, ValueError, InvalidInput) as e:
            raise ValueError(f"dtype {value[:32]!r} is not a supported wire dtype") from e

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < 1 for d in value):
            raise ValueError(f"shape {value} must hold positive ints")
        return value


class InputSpec:
    """The served version's inputs: name → (dtype, per-sample shape); ``ConfigError`` if malformed."""

    def __init__(self, spec: dict[str, dict[str, Any]]) -> None:
        if not isinstance(spec, dict) or not 1 <= len(spec) <= MAX_INPUTS:
            raise ConfigError(f"input_spec must map 1-{MAX_INPUTS} input names to specs")
        try:
            parsed = {str(name): FieldSpec.model_validate(s) for name, s in spec.items()}
        except ValidationError as e:
            raise ConfigError(f"input_spec is malformed: {' '.join(str(e).splitlines()[:3])[:300]}") from e
        self.fields = {name: (np.dtype(s.dtype), tuple(s.shape)) for name, s in parsed.items()}
        # Input bytes of one sample (one row of every input), what a batch grows by per row; computed
        # once: np.prod on every batch cost more than the rest of the check.
        self.sample_bytes = sum(dtype.itemsize * int(np.prod(shape, dtype=np.int64))
                                for dtype, shape in self.fields.values())
        # Only float inputs can hold NaN/Inf; integer and bool arrays never need the scan.
        self.finite_only = [name for name, s in parsed.items()
                            if not s.allow_non_finite and np.dtype(s.dtype).kind == "f"]

    def max_rows(self, budget_mb: float) -> int:
        """The rows whose stacked inputs fit ``budget_mb`` MiB (at least 1)."""
        return max(1, int(budget_mb * (1 << 20)) // max(1, self.sample_bytes))

    def check(self, inputs: dict[str, np.ndarray], max_rows: int) -> None:
        """Raise ``InvalidInput`` naming the first mismatch."""
        if inputs.keys() != self.fields.keys():
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
        for name in self.finite_only:
            # A model answers NaN with a confident label (all-NaN came out "down"); refuse instead.
            if not np.isfinite(inputs[name]).all():
                raise InvalidInput(f"input {name!r} holds NaN or ±Inf; this version's input spec "
                                   "does not allow non-finite values")
