"""The golden check's tolerance scales with the outputs, and a NaN output never passes it."""

import numpy as np
import pytest

from worker.loader import GoldenCheckFailed, check_golden


class Fixed:
    """A backend that answers the same outputs whatever it is given."""

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def run(self, inputs):
        return self.outputs


GOLDEN = {"input:x": np.zeros((2, 3), np.float32), "output:y": np.array([700.0, 0.5], np.float32)}


def test_a_large_output_moved_by_summation_order_passes():
    check_golden(Fixed({"y": np.array([700.05, 0.5], np.float32)}), GOLDEN, atol=1e-4)  # 7e-5 relative


@pytest.mark.parametrize("y", [[701.0, 0.5], [700.0, 0.51], [np.nan, 0.5]])
def test_a_real_difference_or_nan_fails(y):
    with pytest.raises(GoldenCheckFailed, match="golden output 'y' differs by"):
        check_golden(Fixed({"y": np.array(y, np.float32)}), GOLDEN, atol=1e-4)
