#!/usr/bin/env bash
# One call on the lent GPU machine: build evofast there, then run the named stages.
#   bash benchmarks/gpu/session.sh STAGE...   (stages: info build cuda sanitize kernels kernels-table suite ops
#   generate cts eval ncu ncu-row diag toolchain); BUILD_CXX=/usr/bin/g++ builds with that compiler
# Logs and JSON go to $OUT (what comes back); the built extensions are saved to
# $OUT/build.tgz so a later call can carry them (.gpu-build/) instead of rebuilding.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 EVOFAST_CUDA_ARCHS="9.0a" MAX_JOBS=16
PY=python3
stage() { echo; echo "=== $1 ($(date +%T))"; }

build() {
  if [ -z "${BUILD_CXX:-}" ] && [ -f .gpu-build/build.tgz ] && [ -z "$(find csrc setup.py -newer .gpu-build/build.tgz)" ]; then
    stage "unpack carried build"; tar xzf .gpu-build/build.tgz && $PY -c "import evofast._C, evofast._C_cuda" && return 0
  fi
  stage "build${BUILD_CXX:+ with $BUILD_CXX}"
  ${BUILD_CXX:+env CXX=$BUILD_CXX CC=${BUILD_CXX%++}cc LDSHARED="$BUILD_CXX -shared"} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
  grep -iE "warning|registers|spill" "$OUT/build.log" | head -20
  tar czf "$OUT/build.tgz" evofast/*.so
  $PY -c "import evofast, evofast.ops as o; print('backends', o.backends())"
}

for s in "$@"; do case $s in
  info) stage info; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
        $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); p=torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs', p.L2_cache_size>>20, 'MB L2')"
        $PY -c "import peft, accelerate; print('peft', peft.__version__, 'accelerate', accelerate.__version__)" ;;
  build) build || exit 1 ;;
  diag) stage diag; for w in cpu cuda; do timeout 60 $PY benchmarks/gpu/diag_errors.py $w 2>&1 | tail -3; done
        timeout 120 cuda-gdb -batch -ex run -ex bt --args $PY benchmarks/gpu/diag_errors.py cpu >"$OUT/gdb.log" 2>&1; grep -E "^#|signal|SIG" "$OUT/gdb.log" | head -30 ;;
  cuda) stage "cuda tests"; timeout ${CUDA_T:-240} $PY -m pytest -q -x tests/test_cuda.py -p no:cacheprovider -p faulthandler 2>&1 | tee "$OUT/test_cuda.log" | tail -25 ;;
  sanitize) stage sanitize
        for tool in memcheck racecheck synccheck initcheck; do
          timeout ${SAN_T:-90} compute-sanitizer --tool $tool --error-exitcode 9 $PY benchmarks/gpu/sanitize_case.py >"$OUT/sanitize-$tool.log" 2>&1
          echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize-$tool.log" | tail -1)"; done ;;
  suite) stage "whole suite"; timeout ${SUITE_T:-420} $PY -m pytest -q tests -p no:cacheprovider -x --durations=15 2>&1 | tee "$OUT/suite.log" | tail -40 ;;
  ops) stage "bench ops llada-8b"; timeout ${OPS_T:-300} $PY -m evofast.cli bench ops --shape llada-8b --json "$OUT/ops-h100.json" 2>&1 | tee "$OUT/bench-ops.log" | tail -45 ;;
  generate) stage "bench generate llada-8b"; timeout ${GEN_T:-400} $PY -m evofast.cli bench generate --shape llada-8b --json "$OUT/generate-h100.json" --plot "$OUT/generate-h100.png" ${GEN_ARGS:-} 2>&1 | tee "$OUT/bench-generate.log" | tail -40 ;;
  cts) stage "bench cts llada-8b"; timeout ${CTS_T:-400} $PY -m evofast.cli bench cts --shape llada-8b --json "$OUT/cts-h100.json" ${CTS_ARGS:-} 2>&1 | tee "$OUT/bench-cts.log" | tail -30 ;;
  eval) stage "bench eval llada-8b"; timeout ${EVAL_T:-400} $PY -m evofast.cli bench eval --shape llada-8b --json "$OUT/eval-h100.json" ${EVAL_ARGS:-} 2>&1 | tee "$OUT/bench-eval.log" | tail -12 ;;
  kernels) stage "kernel grid"; timeout ${KER_T:-200} $PY benchmarks/gpu/kernels.py --json "$OUT/kernels-h100.json" 2>&1 | tee "$OUT/kernels.log" | tail -30 ;;
  ncu) stage ncu; timeout ${NCU_T:-240} ncu --clock-control none --target-processes all -k regex:evo --launch-count ${NCU_N:-6} --section SpeedOfLight --section Occupancy --section LaunchStats $PY benchmarks/gpu/profile_case.py >"$OUT/ncu.log" 2>&1; echo "ncu rc=$?"; grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size|Block Size|Compute \(SM\)" "$OUT/ncu.log" | head -80 ;;
  kernels-table) stage "kernel grid, EVOFAST_CUDA_VALUE_TABLE=1"; EVOFAST_CUDA_VALUE_TABLE=1 timeout ${KER_T:-200} $PY benchmarks/gpu/kernels.py --json "$OUT/kernels-table-h100.json" 2>&1 | tail -22 ;;
  ncu-row) stage "ncu row kernel B=32 R=288 (value table)"; EVOFAST_CUDA_VALUE_TABLE=1 timeout ${NCU_T:-240} ncu --clock-control none -k regex:evo_row --launch-skip 4 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy $PY benchmarks/gpu/profile_case.py >"$OUT/ncu-row.log" 2>&1; echo "ncu rc=$?"
        grep -E "Duration|Throughput|Pipe|Executed Ipc|Issue Slots|Stall|Achieved Occupancy|SM Frequency|Warp Cycles|One or More|Instructions" "$OUT/ncu-row.log" | head -40 ;;
  toolchain) stage toolchain; ls -la /usr/bin/g++* /opt/gcc/bin/g++ 2>&1 | head; /opt/gcc/bin/g++ --version | head -1; /opt/gcc/bin/g++ -print-file-name=libstdc++.so; /opt/gcc/bin/g++ -dumpspecs | grep -i -A1 "static-libstdc\|^\*link:" | head -6; nm -D --defined-only evofast/_C*.so 2>/dev/null | grep -c "_ZNSo" ;;
  *) echo "unknown stage $s"; exit 2 ;;
esac; done
