#!/usr/bin/env bash
# fastrnn's GPU check: build, GPU tests, benchmark against PyTorch/cuDNN; one table at the end.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from the repository root
#
# Needs: an NVIDIA GPU, Python with numpy, scipy, cupy, torch (CUDA), Cython, setuptools,
# pytest; no network. Everything it prints, and every stage's full log, goes to $OUT
# (default: ./gpu_check_out). Each stage runs under `timeout`, so a hang cannot take the
# whole budget (the stages' limits add up to under 5 minutes), and a failing stage does not
# stop the next ones: the benchmark always runs. The exit status is 0 only when every stage
# passed.
set -u

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# TF32 off for CuPy's own GEMMs and for every cuBLAS/cuDNN call of the process (PyTorch's
# flags are also set by the benchmark).
export CUPY_TF32=0
export NVIDIA_TF32_OVERRIDE=0

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
STATUS=0

# stage NAME SECONDS COMMAND...: run with a time limit, full log in $OUT/NAME.log
stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict=FAILED; fi
    [ $rc -ne 0 ] && STATUS=1
    printf '%-10s %-9s rc=%-3s %4ss  log: %s\n' "$name" "$verdict" "$rc" "$(( $(date +%s) - t0 ))" \
        "$OUT/$name.log" | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    | /'
}

# 1. the machine
stage versions 25 bash -c "
    nvidia-smi; echo;
    $PY -c 'import sys, numpy, scipy; print(\"python\", sys.version.split()[0], \"numpy\", numpy.__version__, \"scipy\", scipy.__version__)';
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), torch.cuda.get_device_name(0))';
    $PY -c 'import json; from fastrnn._cuda.info import gpu_info; print(json.dumps(gpu_info(), indent=1))';
    (command -v nvcc && nvcc --version) || true; (command -v g++ && g++ --version | head -1) || true"

# 2. the build (the Cython CPU kernels), in the background: the GPU tests do not need it
#    (CUDA kernels compile at run time), so they run meanwhile.
( stage build 120 $PY setup.py build_ext --inplace ) &
BUILD_PID=$!

# 3. the GPU tests: NVRTC compile test, host execution tests, launch tests on the GPU
stage tests 90 $PY -m pytest -q -rs -p no:cacheprovider \
    tests/test_cuda_compile.py tests/test_cuda_host.py \
    tests/test_cuda_recurrent.py tests/test_cuda_conv.py \
    --junitxml="$OUT/tests-junit.xml"

# the build must not compete with the benchmark for the CPU (small problems are host-bound)
wait "$BUILD_PID" || STATUS=1
grep -q '^build .*ok' "$SUMMARY" || STATUS=1

# 4. the benchmark (fastrnn vs torch.nn.LSTM/GRU/RNN and torch.nn.functional, cuDNN, fp32)
stage bench 100 $PY benchmarks/bench_gpu.py --out "$OUT"

# 4b. host and GPU time per time step of the recurrent loops, graphs off (eager) and on: whether
#     a loop is host-bound, and the last graph capture error if any
stage steps 20 $PY benchmarks/gpu_steps.py

# 5. the CUDA cases of the shared test files (after the build: some compare with the CPU
#    kernels): the backend-parametrised op tests, the layer API and the PyTorch bindings on CuPy
#    arrays (test_recurrent.py needs hypothesis; a missing module fails only its own file)
stage shared 30 $PY -m pytest -q -rs -p no:cacheprovider -k cuda --continue-on-collection-errors \
    tests/test_recurrent.py tests/test_conv2d.py tests/test_pool2d.py tests/test_nn_cuda.py \
    tests/test_torch_bindings.py

echo
echo "== summary ($(( $(date +%s) - START ))s in all)"
cat "$SUMMARY"
echo
echo "== fastrnn vs PyTorch on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), float32, TF32 off, forward+backward, median ms"
if [ -s "$OUT/bench_table.txt" ]; then
    tee "$OUT/gpu_check_table.txt" < "$OUT/bench_table.txt"
else
    echo "(no benchmark table: see $OUT/bench.log)" | tee "$OUT/gpu_check_table.txt"
fi
echo
echo "== time per step of the recurrent loops (benchmarks/gpu_steps.py)"
cat "$OUT/steps.log" 2>/dev/null || echo "(no log)"
exit $STATUS
