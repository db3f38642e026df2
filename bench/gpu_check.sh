#!/usr/bin/env bash
# The GPU device check of issue 19, as one command on a device machine (its python3 holds torch, timm, pyarrow,
# pillow; nothing can be fetched there). Installs this checkout beside that torch (no dependencies: the image's
# own), plus the wheels carried in .whl/ (open_clip and its two small needs, for the ViT), then runs
# bench/gpu_throughput.py and keeps its JSON in $OUT.
#
# Once, on the development machine, in the repo's root (the device runs Python 3.12):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# Then, as the device tool's command (carry: [".whl"]), with a timeout that leaves time to rerun:
#   bash bench/gpu_check.sh
# Extra arguments go to the bench (e.g. --n 1000 --encoders 'timm:resnet50?weights=random').
set -euo pipefail
OUT=${OUT:-/tmp/t2c-gpu}
mkdir -p "$OUT" /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt" || true
cd /tmp  # the installed package, not this checkout's folders
python3 "$OLDPWD/bench/gpu_throughput.py" "$@" | tee "$OUT/gpu_throughput.json"
