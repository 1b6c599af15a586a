#!/usr/bin/env bash
# The checks that need a CUDA device, as one prepared run for a machine lent with a GPU
# (the device image's python3 holds torch with CUDA, numpy, scipy, scikit-learn,
# statsmodels, peft and safetensors: nothing is installed there, the package is read
# from this checkout through PYTHONPATH). Writes every log and table under $OUT:
#
#     OUT=DIR bash benchmarks/device_check.sh        # about 5-8 minutes on one H200
#
# 1. which torch and device; 2. the tests marked cuda, with the torch solver's and the
# LoRA torch path's tests (the same code on the CPU and on the device); 3. part 3 of
# benchmarks/lora_benchmark.py (numpy against torch on the CPU and on CUDA, float64 and
# float32: the speed-up on the device is the ratio of the "torch cuda" rows to the
# numpy row); 4. benchmarks/whole_model_benchmark.py on 4 layers (28 modules, 50
# clients of rank 16), on the host and then with --device cuda --dtype float32.
# A step that fails is reported and the next one still runs; the exit status is that of
# the first failure. QUICK=1 shrinks steps 3 and 4 to seconds (a try of the script
# anywhere, the CPU included: the cuda rows and tests then need a CUDA device).
set -u -o pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() {  # step NAME COMMAND...: run, keep its log, remember the first failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
step device "$PY" -c "import clairstat, torch; print('clairstat', clairstat.__version__, \
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
step pytest_cuda "$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/test_lora_torch.py tests/test_solvers.py
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick); size=(--layers 1 --clients 8 --rank 4)
else quick=(); size=(--layers 4 --clients 50); fi
step lora_torch "$PY" benchmarks/lora_benchmark.py --torch-only "${quick[@]}" \
    --markdown "$OUT/lora_torch.md"
step whole_model_host "$PY" benchmarks/whole_model_benchmark.py "${size[@]}"
step whole_model_cuda "$PY" benchmarks/whole_model_benchmark.py "${size[@]}" \
    --device cuda --dtype float32
exit "$status"
