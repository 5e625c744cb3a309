#!/usr/bin/env bash
# The whole GPU benchmark, one command: lorafit vs the original pipeline on quotes (2,000 examples;
# TRL's SFTTrainer beside them when installed: pip install -e ".[bench-gpu]" adds Liger), the
# mixture8 shape (32 x 512 tokens a step) and a full 5-epoch quotes run. Writes
# bench/results/<date>-<gpu>.json. Usage: bash bench/gpu.sh [SHARED_DIR]   (default ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${1:-../shared}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m lorafit.bench.suite --shared "$SHARED"
