#!/usr/bin/env bash
# distil_core on real SST-2 (CPU): the packaged MiniLM-L6 teacher fine-tuned on a seeded 8,000-example
# train subset, then a 3-layer teacher-layers student distilled on the same subset (configs/sst2-8k.yaml).
# A fresh cache, so the teacher's fine-tuning is timed too. Prints the numbers bench/RESULTS.md records.
set -euo pipefail
cd "$(dirname "$0")/.."
export GLUE_DIR="${GLUE_DIR:-../shared/data/glue}" HF_HUB_OFFLINE=1
work="${BENCH_DIR:-$(mktemp -d)}"
distil-search train configs/sst2-8k.yaml --set "output.dir=$work/run" --set "cache_dir=$work/cache" --no-progress
python bench/run_report.py "$work/run/metrics.json"
