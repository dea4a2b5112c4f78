#!/usr/bin/env bash
# The GPU check, for a host with an NVIDIA GPU (`make gpu-check`): what the CPU-only CI cannot run.
#
#   1. installs carried packages when present: $CARRIED/wheels/*.whl (pip --no-deps) and
#      $CARRIED/ort-gpu.tar.xz (an onnxruntime-gpu package tree made by scripts/repack_ort_gpu.py)
#      into $RECSYS_GPU_SITE;
#   2. records the host (GPU, onnxruntime providers, CUDA devices, CuPy) in env.json;
#   3. runs the GPU tests (`pytest -m gpu`) and the rank + recall suites on this host;
#   4. runs `recsys bench gpu` (ORT CUDA vs torch eager GPU vs CPU paths; CuPy exact vs Faiss);
#   5. trains Beauty recall and rank with default settings on the GPU (found automatically, bf16
#      autocast) and records the time and each bundle's training record in train-gpu.json
#      (skipped without the data: $BEAUTY, default ../shared/data/amazon-beauty).
# Everything lands in $OUT (default artifacts/gpu-check); a failing step is logged, the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu-check}
SITE=${RECSYS_GPU_SITE:-/root/recsys-site}
PYTHON=${PYTHON:-python3}
CARRIED=${RECSYS_GPU_CARRIED:-.device}
mkdir -p "$OUT" "$SITE"
status=0

if compgen -G "$CARRIED/wheels/*.whl" >/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    $CARRIED/wheels/*.whl || status=1
fi
if [ -f $CARRIED/ort-gpu.tar.xz ]; then
  rm -rf "$SITE/onnxruntime" "$SITE"/onnxruntime*.dist-info
  tar xJf $CARRIED/ort-gpu.tar.xz -C "$SITE" || status=1
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

$PYTHON - >"$OUT/env.json" 2>"$OUT/env.err" <<'EOF' || status=1
import json, subprocess
info = {}
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30).stdout.strip()
except Exception as error:
    info["nvidia_smi"] = repr(error)
import onnxruntime as ort
from rank_service.runtime import cuda_device_count, gpu_available, tensorrt_usable
info["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__,
                       "providers": ort.get_available_providers()}
info["cuda_devices"] = cuda_device_count()
info["rank_gpu_available"] = gpu_available()
info["tensorrt_usable"] = tensorrt_usable()
from recall_service.index import cupy_gpu_available, faiss_gpu_available
info["cupy_gpu"] = cupy_gpu_available()
info["faiss_gpu"] = faiss_gpu_available()
import faiss, grpc, google.protobuf, numpy, torch
info["versions"] = {"faiss": faiss.__version__, "grpcio": grpc.__version__, "numpy": numpy.__version__,
                    "protobuf": google.protobuf.__version__, "torch": torch.__version__,
                    "torch_cuda": torch.cuda.is_available()}
print(json.dumps(info, indent=2))
EOF

timeout 240 $PYTHON -m pytest -p no:cacheprovider -m gpu -v -rs tests/rank tests/recall \
  >"$OUT/pytest-gpu.log" 2>&1 || status=1
timeout 300 $PYTHON -m pytest -p no:cacheprovider -m "not slow and not gpu" -q -rs -x tests/rank tests/recall \
  >"$OUT/pytest-suites.log" 2>&1 || status=1
timeout 300 $PYTHON -m recsys.app.cli bench gpu --out "$OUT/bench-gpu.json" >"$OUT/bench-gpu.log" 2>&1 || status=1
BEAUTY=${BEAUTY:-../shared/data/amazon-beauty}
if [ -f "$BEAUTY/Beauty.txt" ]; then
  TRAIN_ROOT=$(mktemp -d)
  started=$(date +%s)
  timeout 1800 $PYTHON -m recsys.app.cli train recall --data "$BEAUTY" --artifacts "$TRAIN_ROOT" \
    >"$OUT/train-recall.log" 2>&1 || status=1
  recall_done=$(date +%s)
  timeout 1800 $PYTHON -m recsys.app.cli train rank --data "$BEAUTY" --artifacts "$TRAIN_ROOT" \
    >"$OUT/train-rank.log" 2>&1 || status=1
  finished=$(date +%s)
  $PYTHON - "$TRAIN_ROOT" $((recall_done - started)) $((finished - recall_done)) >"$OUT/train-gpu.json" <<'EOF' || status=1
import json, sys
from pathlib import Path
root, recall_s, rank_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def train(kind):
    manifests = sorted(root.glob(f"*/{kind}/manifest.json"))
    return json.loads(manifests[0].read_text()).get("train", {}) if manifests else None
rank = train("rank") or {}
print(json.dumps({
    "recall_seconds": recall_s, "rank_seconds_with_holdout_recall": rank_s,
    "recall": train("recall"), "rank": {k: v for k, v in rank.items() if k != "config"},
}, indent=2))
EOF
  rm -rf "$TRAIN_ROOT"
else
  echo "no Beauty data at $BEAUTY: GPU training step skipped" >"$OUT/train-gpu.log"
fi
echo "gpu-check finished with status $status; results in $OUT"
exit $status
