#!/usr/bin/env bash
# Regenerates the application's lock files (requirements/*.txt) from pyproject.toml's ranges with
# uv, for CPython 3.11 on x86-64 Linux (the images' and CI's platform). pyproject.toml keeps
# compatible ranges for anyone who imports recsys as a library; make, CI and the images install
# these exact sets. Run after changing a dependency:   bash scripts/lock.sh   (UV=path/to/uv)
#
#   requirements/gateway.txt      the gateway image: the core only (no Faiss, ONNX Runtime, torch)
#   requirements/serving-cpu.txt  the recall/rank CPU image: core + cpu + stores
#   requirements/serving-gpu.txt  the recall/rank GPU image: core + gpu + stores (CUDA 13 only)
#   requirements/dev.txt          make install / make test / CI: core + cpu + stores + train +
#                                 dev + deploy + bench (the tests train tiny models and plot)
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
# torch's CPU build lives in PyTorch's own index (PyPI's Linux torch is the multi-GB CUDA build);
# a local wheel folder (PIP_FIND_LINKS) may hold the same file.
# TORCH_INDEX= (empty) skips the index where it cannot be reached.
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
torch_sources=()
[ -n "$TORCH_INDEX" ] && torch_sources+=(--extra-index-url "$TORCH_INDEX")
for folder in ${PIP_FIND_LINKS:-}; do torch_sources+=(--find-links "$folder"); done

compile() {
  local out=$1
  shift
  "$UV" pip compile pyproject.toml --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --annotation-style line --custom-compile-command "bash scripts/lock.sh" \
    --output-file "$out" "$@"
}

compile requirements/gateway.txt --generate-hashes
compile requirements/serving-cpu.txt --generate-hashes --extra cpu --extra stores
compile requirements/serving-gpu.txt --generate-hashes --extra gpu --extra stores
# torch==2.13.0+cpu: the CPU build, from PyTorch's CPU index or a local wheel folder.
compile requirements/dev.txt --extra cpu --extra stores --extra train --extra dev --extra deploy --extra bench \
  --override requirements/torch-cpu.txt --index-strategy unsafe-best-match \
  "${torch_sources[@]}"
echo "wrote requirements/{gateway,serving-cpu,serving-gpu,dev}.txt"
