#!/usr/bin/env bash
# GeoRSCLIP training on one GPU: ViT-B/32 (random init), batch 256, bf16, generated shards.
# Prints samples/s, data-wait fraction and peak GPU memory (< 10 minutes on one H100/H200).
#   bash benchmarks/gpu_train_check.sh [--steps 60] [--cpus N]
# Through `rs5m train-clip` when Ray is installed; otherwise the same training step and data
# stream without Ray (the output's "mode" says which). Needs torch with CUDA, torchvision, and:
# open_clip_torch, ftfy, wcwidth, braceexpand, simplejpeg, fsspec, pyarrow, PyYAML; WHEELS=<dir>
# installs any of them from local wheel files first (no index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PYTHON" benchmarks/gpu_train_check.py --out "$OUT" "$@"
