#!/usr/bin/env bash
# Build everything against the GPU machine's PyTorch (CUDA), run every test, then the given steps.
# Usage on the GPU machine, from a source tree:  benchmarks/gpu_check.sh OUT_DIR [tests] [pack] [linear] [e2e] [breakdown] [breakdown-unchained] [input-splits] [tiles] [wo-dense] [wgmma-splits] [ncu] [install]
# nlohmann/CLI11 headers come from .deps/include when the machine has no packages for them.
set -uo pipefail
OUT=${1:?output folder}; shift
mkdir -p "$OUT"
P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P" -DPython3_EXECUTABLE="$(command -v python3)" \
  -DDUQUANT_EXTRA_INCLUDE="$PWD/.deps/include" -DDUQUANT_CUDA_ARCHITECTURES=90 >"$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; exit 1; }
ninja -C build-gpu -j16 >"$OUT/build.log" 2>&1 || { grep -E 'error|FAILED' "$OUT/build.log" | head -20; exit 1; }
export PYTHONPATH=$PWD/build-gpu/python
for step in "$@"; do
  case $step in
    tests) (cd build-gpu && ctest -j8 --output-on-failure >"$OUT/ctest.log" 2>&1); tail -4 "$OUT/ctest.log"
           grep -E 'passed|failed|skipped' "$OUT/ctest.log" | tail -3 ;;
    pack) python3 benchmarks/pack_speed.py --pack-bin build-gpu/tools/duquant-pack >"$OUT/pack_speed.txt" 2>&1; tail -25 "$OUT/pack_speed.txt" ;;
    linear) python3 benchmarks/linear_speed.py --out "$OUT/linear_speed.txt" >"$OUT/linear.log" 2>&1; tail -12 "$OUT/linear.log" ;;
    e2e) python3 benchmarks/action_expert_e2e.py --out "$OUT/action_expert_e2e.txt" >"$OUT/e2e.log" 2>&1; tail -12 "$OUT/e2e.log" ;;
    breakdown) python3 benchmarks/fast_path_breakdown.py >"$OUT/breakdown.txt" 2>&1; cat "$OUT/breakdown.txt" ;;
    tiles) python3 benchmarks/gemm_tile_sweep.py >"$OUT/gemm_tiles.txt" 2>&1; cat "$OUT/gemm_tiles.txt" ;;
    wo-dense) python3 benchmarks/wo_dense_sweep.py --out "$OUT/wo_dense_sweep.txt" >"$OUT/wo_dense.log" 2>&1; cat "$OUT/wo_dense.log" ;;
    input-splits)  # the tensor-core input kernel with each cluster size forced
      python3 benchmarks/fast_path_breakdown.py --m 64,256,1024,4096 --input-splits 1,2,4,8 >"$OUT/input_splits.txt" 2>&1
      cat "$OUT/input_splits.txt" ;;
    wgmma-splits)  # the 128-token wgmma tiles with each split forced, against the automatic choice
      python3 benchmarks/gemm_tile_sweep.py --tiles wgmma128 --splits 1,2,4,8 --m 32,64,128,256,512,1024 \
        >"$OUT/wgmma_splits.txt" 2>&1
      cat "$OUT/wgmma_splits.txt" ;;
    ncu)  # per-kernel profile of one layer call per shape (NCU_SHAPES="K,N,M[,input kernel] ..."): time, occupancy, stalls
      for shape in ${NCU_SHAPES:-2048,256,1024 1024,256,1024 2048,2048,256 1024,4096,64 2048,2048,1024}; do
        IFS=, read -r k n m kind <<<"$shape"
        /usr/local/cuda/bin/ncu -k regex:"rotate_|permute_|int_gem|wo_gemm|quantize_chunk" --launch-skip 4 --launch-count 3 --section SpeedOfLight --section Occupancy \
          --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
          ${NCU_ARGS:-} python3 benchmarks/profile_one.py "$k" "$n" "$m" 4 "${kind:-auto}" >/tmp/ncu_one.txt 2>&1
        { echo "=== K=$k N=$n M=$m"; cat /tmp/ncu_one.txt; } >>"$OUT/ncu.txt"
        grep -E '^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Grid Size|Issued Ipc|DRAM Through|L2 Cache Through' /tmp/ncu_one.txt | sed "s/^/$shape /"
      done ;;
    breakdown-unchained) DUQUANT_CHAIN_KERNELS=0 python3 benchmarks/fast_path_breakdown.py >"$OUT/breakdown_unchained.txt" 2>&1; cat "$OUT/breakdown_unchained.txt" ;;
    install)  # the installed C++ package and the pip package, as a user gets them
      SRC=$PWD
      cmake --install build-gpu --prefix /tmp/dq-prefix >"$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
      grep INTERFACE_ /tmp/dq-prefix/lib/cmake/duquant/duquantTargets.cmake
      cmake -S examples/cpp_app -B /tmp/dq-app -G Ninja -DCMAKE_PREFIX_PATH="/tmp/dq-prefix;$P" >>"$OUT/install.log" 2>&1 &&
        cmake --build /tmp/dq-app >>"$OUT/install.log" 2>&1 && /tmp/dq-app/duquant_cpp_app | tail -4
      /tmp/dq-prefix/bin/duquant-pack --help | head -2
      CMAKE_BUILD_PARALLEL_LEVEL=16 CMAKE_ARGS="-DDUQUANT_EXTRA_INCLUDE=$SRC/.deps/include -DDUQUANT_CUDA_ARCHITECTURES=90" \
        python3 -m pip install --no-build-isolation --no-index --no-deps --target /tmp/dq-site . >"$OUT/pip.log" 2>&1
      tail -1 "$OUT/pip.log"
      (cd /tmp && PYTHONPATH=/tmp/dq-site python3 -c 'import duquant_ext; print("installed copy:", duquant_ext.__file__)')
      PYTHONPATH=/tmp/dq-site /tmp/dq-site/bin/duquant-pack --help | head -2
      (cd /tmp && PYTHONPATH=/tmp/dq-site DUQUANT_BIN_DIR=/tmp/dq-site/duquant_ext/bin python3 -m pytest -q -p no:cacheprovider "$SRC/tests/python" >"$OUT/pytest_installed.log" 2>&1; tail -2 "$OUT/pytest_installed.log") ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
