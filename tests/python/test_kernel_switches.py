"""_C.set_input_kernel and _C.set_gemm_tile: the switches benchmarks and the fast-path tests use to
compare kernels. Run without a GPU (the switches are process state)."""
import subprocess
import sys

import pytest

import duquant_ext as dq

SWITCHES = [
    (dq._C.set_input_kernel, dq._C.input_kernel, ("rows", "split", "mma", "slices", "auto")),
    (dq._C.set_gemm_tile, dq._C.gemm_tile, ("stream", "32x32", "64x64", "128x128", "wgmma128", "wgmma256", "gemv",
                                                  "gemv-direct", "auto")),
    (dq._C.set_weight_only_path, dq._C.weight_only_path, ("fused", "dense", "auto")),
]


@pytest.mark.parametrize("setter,getter,names", SWITCHES, ids=["input_kernel", "gemm_tile", "weight_only_path"])
def test_round_trips_and_defaults_to_auto(setter, getter, names):
    assert getter() == "auto"
    try:
        for which in names:
            setter(which)
            assert getter() == which
    finally:
        setter("auto")


def test_unknown_input_kernel_is_refused_and_changes_nothing():
    with pytest.raises(RuntimeError, match=r'input kernel must be "auto", "split", "rows", "mma" or "slices", got "fused"'):
        dq._C.set_input_kernel("fused")
    assert dq._C.input_kernel() == "auto"


def test_unknown_gemm_tile_is_refused_and_changes_nothing():
    dq._C.set_gemm_tile("64x64")
    try:
        with pytest.raises(RuntimeError, match=r'GEMM tile must be "auto", "stream", "32x32", "64x64", "128x128", '
                                               r'"wgmma128", "wgmma256", "gemv" or "gemv-direct", got "256x128"'):
            dq._C.set_gemm_tile("256x128")
        assert dq._C.gemm_tile() == "64x64"
    finally:
        dq._C.set_gemm_tile("auto")


def test_unknown_weight_only_path_is_refused_and_changes_nothing():
    dq._C.set_weight_only_path("dense")
    try:
        with pytest.raises(RuntimeError, match=r'weight-only path must be "auto", "fused" or "dense", got "cublas"'):
            dq._C.set_weight_only_path("cublas")
        assert dq._C.weight_only_path() == "dense"
    finally:
        dq._C.set_weight_only_path("auto")


@pytest.mark.parametrize("what,setter,getter,most", [
    ("GEMM splits", dq._C.set_gemm_splits, dq._C.gemm_splits, 64),
    ("input splits", dq._C.set_input_splits, dq._C.input_splits, 8),
], ids=["gemm", "input"])
def test_split_counts_round_trip_and_range(what, setter, getter, most):
    assert getter() == 0
    try:
        setter(most)
        assert getter() == most
        for bad in (-1, most + 1):
            with pytest.raises(RuntimeError, match=rf"{what} must be 0 \(picked by size\) or 1\.\.{most}, got {bad}"):
                setter(bad)
        assert getter() == most
    finally:
        setter(0)


def test_last_gemm_tile_and_input_kernel_are_empty_before_any_forward():
    """In a fresh process nothing has launched a GEMM yet (test_fast_path.py checks what it names
    after a forward)."""
    code = ("import duquant_ext as dq; "
            "print(repr((dq._C.last_gemm_tile(), dq._C.last_gemm_splits(), dq._C.last_input_splits(), "
            "dq._C.last_input_kernel(), dq._C.last_weight_only_path())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "('', 0, 0, '', '')", out.stdout + out.stderr
