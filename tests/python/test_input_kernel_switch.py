"""_C.set_input_kernel: the switch benchmarks and the fast-path tests use to compare the input
kernels. Runs without a GPU (the switch is process state)."""
import pytest

import duquant_ext as dq


def test_round_trips_and_defaults_to_auto():
    assert dq._C.input_kernel() == "auto"
    try:
        for which in ("rows", "split", "auto"):
            dq._C.set_input_kernel(which)
            assert dq._C.input_kernel() == which
    finally:
        dq._C.set_input_kernel("auto")


def test_unknown_name_is_refused_and_changes_nothing():
    with pytest.raises(RuntimeError, match=r'"auto", "rows" or "split", got "fused"'):
        dq._C.set_input_kernel("fused")
    assert dq._C.input_kernel() == "auto"
