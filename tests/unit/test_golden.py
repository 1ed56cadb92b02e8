"""Golden samples: what export records and what a rollout compares."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.errors import ToolkitError
from toolkit.lifecycle.golden import compare_golden, read_golden, write_golden


def test_golden_round_trips_and_passes_within_tolerance(tmp_path):
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    y = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    write_golden(tmp_path / "g.npz", {"ids": x}, {"y": y}, 1e-4, 1e-3)
    golden = read_golden(tmp_path / "g.npz")
    np.testing.assert_array_equal(golden.inputs["ids"], x)
    assert (golden.tolerance, golden.rel_tolerance) == (1e-4, 1e-3)
    assert compare_golden(golden, {"y": y + 5e-5}) == []


@pytest.mark.parametrize(("actual", "problem"), [
    ({"y": np.full((2, 3), 0.5, np.float32)}, "y: max abs diff"),
    ({"y": np.zeros((3, 3), np.float32)}, "y: shape [3, 3], recorded [2, 3]"),
    ({}, "y: missing from the served outputs"),
    ({"y": np.full((2, 3), np.nan, np.float32)}, "y: max abs diff nan"),
])
def test_golden_names_every_disagreement(tmp_path, actual, problem):
    write_golden(tmp_path / "g.npz", {"x": np.ones((2, 1))}, {"y": np.zeros((2, 3), np.float32)}, 1e-4, 1e-3)
    problems = compare_golden(read_golden(tmp_path / "g.npz"), actual)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_tiny_relative_change_fails_even_under_the_absolute_tolerance(tmp_path):
    """An untrained CNN's outputs are ~1e-11: the relative rule catches what 1e-4 absolute cannot."""
    y = np.full((1, 4), 1e-11, np.float32)
    write_golden(tmp_path / "g.npz", {"x": np.ones((1, 1))}, {"y": y}, 1e-4, 1e-3)
    assert compare_golden(read_golden(tmp_path / "g.npz"), {"y": y * 2})


def test_unreadable_golden_file_is_a_clear_error(tmp_path):
    (tmp_path / "g.npz").write_bytes(b"not a zip")
    with pytest.raises(ToolkitError, match="not a readable golden file"):
        read_golden(tmp_path / "g.npz")
