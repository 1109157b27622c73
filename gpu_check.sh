#!/usr/bin/env bash
# The prepared GPU check: one command, about 8 minutes at most on one H100/H200. Every result lands in OUT_DIR as it
# comes, so a check cut short still leaves what it measured:
#   env.json      the GPU, torch and CUDA versions
#   tests.jsonl   one line per CUDA test of tests/test_gpu.py (each under a 120 s timeout, 180 s in all); tests.txt is pytest's output
#   bench.json    bench.py's figures, rewritten after every configuration (each timed in a fresh process);
#                 bench.txt is its output (the Markdown table at the end)
#   profile.txt   torch.profiler's table of the MAE step at batch 128 (profile.log: its output)
#
#   ./gpu_check.sh OUT_DIR
#
# Without a CUDA device it is a dry run at small sizes (32 px demo images, 2 timed steps): every stage runs its
# success path and writes its file in about 80 s on 2 CPU cores, so a GPU session never meets a check that does not start.
set -u
OUT=${1:?usage: ./gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
python3 - "$OUT" <<'PY'
import json, sys, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
json.dump(dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0]),
          open(sys.argv[1] + '/env.json', 'w'), indent=1)
print('gpu check on', gpu, 'torch', torch.__version__)
PY
if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  BENCH=(--batch_sizes 128,1024 --steps 50 --warmup 20 --process_timeout 80)
  PROFILE=(--batch_sizes 128 --steps 20 --warmup 10)
else
  echo "no CUDA device: a dry run at small sizes, to check that every stage starts and writes its file"
  SMALL=(--device cpu --dataset demo --img_size 32 --patch_size 8 --steps 2 --warmup 1)
  BENCH=("${SMALL[@]}" --batch_sizes 32,64 --process_timeout 80)
  PROFILE=("${SMALL[@]}" --batch_sizes 32)
fi
# 1. the CUDA tests (tests/conftest.py writes a line per test to $GPU_CHECK_OUT/tests.jsonl as it finishes)
GPU_CHECK_OUT="$OUT" timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt"
# 2. the benchmark: MAE at batch 128 and 1024; SMAE, fine-tuning and the loader at 128; transformers' ViTMAE at both
timeout 240 python3 bench.py --out_dir "$OUT" "${BENCH[@]}" 2>&1 | tee "$OUT/bench.txt"
# 3. where the MAE step's time goes at batch 128: torch.profiler's operators and kernels by device time
timeout 60 python3 bench.py --out_dir "$OUT" --only profile "${PROFILE[@]}" > "$OUT/profile.log" 2>&1
echo "gpu check done: $OUT"
