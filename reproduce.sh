#!/usr/bin/env bash
# Rerun every experiment of the paper in order: the SqueezeNet critic before SMAE, pre-training before
# fine-tuning and probing. A step whose results.json exists is skipped; one with only a ckpt.pt is resumed.
#
#   ./reproduce.sh             the full study on Tiny ImageNet + CUB (data/tiny-imagenet-200, data/CUB_200_2011)
#   ./reproduce.sh quick       the same path on the embedded demo data with a tiny schedule (a CPU, minutes)
#
# Environment: OUT (default out/study), LAUNCH (default "python3"; e.g. "torchrun --nproc_per_node=2"),
# RATIOS (the mask-ratio sweep, default "50 60 65 70 75 80 85 90"), DATA_DIR (default data), VARIANTS (the
# pre-training variants to run, default all: mae_random mae_block50 smae_random smae_block50 smae1_random smae1_block50
# dino).
# Every result lands in $OUT/<step>/results.json; the table beside the paper's numbers in $OUT/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-full}
OUT=${OUT:-out/study}
LAUNCH=${LAUNCH:-python3}
DATA_DIR=${DATA_DIR:-data}
VARIANTS=${VARIANTS:-"mae_random mae_block50 smae_random smae_block50 smae1_random smae1_block50 dino"}

if [ "$MODE" = quick ]; then
  TIN=(--dataset demo --data_dir "$DATA_DIR")
  CUB=(--dataset demo --data_dir "$DATA_DIR")
  TINY=(--subset 64 --batch_size 32 --log_every 1 --warmup_epochs 0 --epochs 1)
  SIZE=(--img_size 32 --patch_size 8)                # for runs that build a ViT (pre-training, from scratch)
  PRETRAIN=("${TINY[@]}" "${SIZE[@]}" --val_images 32)
  SWEEP_PRETRAIN=("${PRETRAIN[@]}")
  FINETUNE=("${TINY[@]}")
  SCRATCH=("${TINY[@]}" "${SIZE[@]}")
  CRITIC=("${TINY[@]}")
  PROBE=(--subset 64 --epochs 1 --warmup_epochs 0)
  RATIOS=${RATIOS:-"50 90"}
elif [ "$MODE" = full ]; then
  TIN=(--dataset tin --data_dir "$DATA_DIR")
  CUB=(--dataset cub --data_dir "$DATA_DIR")
  PRETRAIN=()                                        # the defaults are the paper's recipe: 400 epochs, 20 warm-up
  SWEEP_PRETRAIN=(--epochs 200)                      # the mask-ratio sweep: 200-epoch pre-training + 50-epoch probe
  FINETUNE=()                                        # 100 epochs, lr 1e-3 (5e-4 on CUB), RandAugment(2, 9)
  SCRATCH=(--epochs 400)                             # the supervised ViT-Lite baseline
  CRITIC=(--epochs 200 --warmup_epochs 10 --weight_decay 0.15)  # their Table 4
  PROBE=()                                           # 50 epochs, Adam lr 1e-3
  RATIOS=${RATIOS:-"50 60 65 70 75 80 85 90"}
else
  echo "usage: $0 [full|quick]" >&2
  exit 2
fi
mkdir -p "$OUT"
MANIFEST="$OUT/manifest.tsv"
: > "$MANIFEST"

# step NAME "WHAT" PAPER SCRIPT ARGS...: run SCRIPT into $OUT/NAME unless it has finished; record it for the table
step() {
  local name=$1 what=$2 paper=$3 script=$4
  shift 4
  local dir="$OUT/$name"
  printf '%s\t%s\t%s\n' "$name" "$what" "$paper" >> "$MANIFEST"
  if [ -f "$dir/results.json" ]; then
    echo "== $name: done, skipped"
    return
  fi
  local resume=()
  if [ -f "$dir/ckpt.pt" ]; then resume=(--resume true); fi
  echo "== $name: $script $*"
  $LAUNCH "$script" --out_dir "$dir" "${resume[@]}" "$@"
}

# the SqueezeNet critic (their Table 4), needed by every SMAE run
step critic "SqueezeNet 1.1 critic, TIN top-1" "-" finetune.py --arch squeezenet "${TIN[@]}" "${CRITIC[@]}"
CRITIC_CKPT="$OUT/critic/ckpt.pt"

# supervised ViT-Lite from scratch (Table 1)
step supervised_tin "ViT-Lite from scratch, TIN top-1" 48.58 finetune.py "${TIN[@]}" "${SCRATCH[@]}"
step supervised_cub "ViT-Lite from scratch, CUB top-1" 19.70 finetune.py "${CUB[@]}" "${SCRATCH[@]}"

# pre-training variants, each fine-tuned on TIN and transferred to CUB
pretrain_and_finetune() {  # NAME LABEL PAPER_TIN PAPER_CUB PRETRAIN_ARGS...
  local name=$1 label=$2 paper_tin=$3 paper_cub=$4
  shift 4
  step "$name" "$label: pre-training (val masked-patch loss)" "-" pretrain.py "${TIN[@]}" "${PRETRAIN[@]}" "$@"
  step "${name}_ft_tin" "$label: fine-tune, TIN top-1" "$paper_tin" finetune.py --ckpt "$OUT/$name/ckpt.pt" "${TIN[@]}" "${FINETUNE[@]}"
  step "${name}_ft_cub" "$label: transfer, CUB top-1" "$paper_cub" finetune.py --ckpt "$OUT/$name/ckpt.pt" "${CUB[@]}" "${FINETUNE[@]}"
}
variant() {  # run a pre-training variant if VARIANTS names it
  if [[ " $VARIANTS " == *" $1 "* ]]; then pretrain_and_finetune "$@"; fi
}
variant mae_random "MAE random 75%" 55.00 42.54
variant mae_block50 "MAE block 50%" 48.77 33.50 --masking block --mask 0.5
variant smae_random "SMAE a=0.5 random 75%" 54.40 41.50 --alpha 0.5 --critic "$CRITIC_CKPT"
variant smae_block50 "SMAE a=0.5 block 50%" 53.90 47.50 --alpha 0.5 --critic "$CRITIC_CKPT" --masking block --mask 0.5
variant smae1_random "SMAE a=1 random 75%" 52.70 39.67 --alpha 1 --critic "$CRITIC_CKPT"
variant smae1_block50 "SMAE a=1 block 50%" 51.05 42.90 --alpha 1 --critic "$CRITIC_CKPT" --masking block --mask 0.5

# the DINO baseline (Table 1): dino.py's defaults are the study's DINO recipe; then the same two fine-tunes
if [[ " $VARIANTS " == *" dino "* ]]; then
  step dino "DINO: pre-training (kNN top-1 in its results.json)" "-" dino.py "${TIN[@]}" "${PRETRAIN[@]}"
  step dino_ft_tin "DINO: fine-tune, TIN top-1" 41.72 finetune.py --ckpt "$OUT/dino/ckpt.pt" "${TIN[@]}" "${FINETUNE[@]}"
  step dino_ft_cub "DINO: transfer, CUB top-1" 24.09 finetune.py --ckpt "$OUT/dino/ckpt.pt" "${CUB[@]}" "${FINETUNE[@]}"
fi

# the mask-ratio sweep: linear probe accuracy on TIN
paper_probe() {
  case $1 in 50) echo 31.32;; 60) echo 32.03;; 65) echo 32.32;; 70) echo 30.58;; 75) echo 32.04;;
             80) echo 31.66;; 85) echo 29.61;; 90) echo 28.14;; *) echo "-";; esac
}
for r in $RATIOS; do
  step "sweep_mask$r" "mask $r%: pre-training (val masked-patch loss)" "-" pretrain.py "${TIN[@]}" "${SWEEP_PRETRAIN[@]}" --mask "0.$r"
  step "sweep_mask${r}_probe" "mask $r%: linear probe, TIN top-1" "$(paper_probe "$r")" probe.py --ckpt "$OUT/sweep_mask$r/ckpt.pt" "${TIN[@]}" "${PROBE[@]}"
done

# one table beside the paper's numbers
python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
lines = ["| step | experiment | paper | ours | wall clock |", "|---|---|---|---|---|"]
for name, what, paper in (l.rstrip('\n').split('\t') for l in open(os.path.join(out, 'manifest.tsv'))):
    r = json.load(open(os.path.join(out, name, 'results.json')))
    if 'top1' in r:
        ours = f"{r['top1']:.2f}"
    else:
        ours = f"{r['val_loss']:.4f}" if r.get('val_loss') is not None else "-"
    wall = f"{r['wall_s'] / 60:.1f} min" if r.get('wall_s') is not None else "-"
    lines.append(f"| {name} | {what} | {paper} | {ours} | {wall} |")
table = "\n".join(lines) + "\n"
open(os.path.join(out, 'RESULTS.md'), 'w').write(table)
print(table)
EOF
echo "results: $OUT/RESULTS.md"
