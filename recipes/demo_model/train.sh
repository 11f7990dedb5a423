#!/usr/bin/env bash
# Train the package's demo model (qwen_vl/demo_model) from scratch on synthetic
# shapes-world data, evaluate it on held-out scenes and export it into the package.
#
#   bash recipes/demo_model/train.sh [WORK_DIR]      (default: work/demo_model)
#
# Every step is skipped when its output exists, and training resumes from its last
# checkpoint, so rerunning the same command after an interruption continues the run.
# Sizes, seeds and hyperparameters: recipes/demo_model/settings.env.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${1:-$repo/work/demo_model}
base=$repo/qwen_vl/demo_model
# shellcheck source=settings.env
source "$here/settings.env"
mkdir -p "$work/data"

version=$(python -c "from qwen_vl.data import GENERATOR_VERSION; print(GENERATOR_VERSION)")
synth() {  # synth NAME N SEED [extra qwen-vl synth options]
    local name=$1 n=$2 seed=$3
    shift 3
    # data from another version of the generator is made again, and what was trained on it goes
    grep -qs "\"version\": $version," "$work/data/$name/manifest.json" && return
    rm -rf "$work/vision" "$work/run" "$work/eval"
    qwen-vl synth --out "$work/data/$name" --n "$n" --seed "$seed" "$@"
}
synth multiturn "$N_MULTITURN" "$SEED_MULTITURN" --kinds multiturn --turns "$TURNS"
synth single "$N_SINGLE" "$SEED_SINGLE" --kinds "$SINGLE_KINDS"
synth heldout "$N_HELDOUT" "$SEED_HELDOUT"

[ -d "$work/init" ] || qwen-vl init --like "$base" --out "$work/init" --seed "$SEED_INIT" --resampler local

[ -d "$work/vision/final" ] || qwen-vl pretrain-vision --model "$work/init" --output-dir "$work/vision" \
    --data "$work/data/multiturn" "$work/data/single" --eval-data "$work/data/heldout" \
    --steps "$VISION_STEPS" --batch-size "$VISION_BATCH_SIZE" --learning-rate "$VISION_LEARNING_RATE" --box-weight "$VISION_BOX_WEIGHT" \
    --seed "$SEED_INIT" --save-steps 100

resume=()
if compgen -G "$work/run/checkpoint-*" >/dev/null; then resume=(--resume); fi
qwen-vl finetune --model "$work/vision/final" --output-dir "$work/run" \
    --data "$work/data/multiturn/data.json" "$work/data/single/data.json" \
    --fix-vit --fix-resampler --dtype float32 --seed "$SEED_TRAIN" --loss-vocab data \
    --batch-size "$BATCH_SIZE" --gradient-accumulation-steps 1 --epochs "$EPOCHS" \
    --learning-rate "$LEARNING_RATE" --lr-scheduler cosine --warmup-ratio "$WARMUP_RATIO" \
    --weight-decay "$WEIGHT_DECAY" --max-grad-norm 1.0 --model-max-length 1024 \
    --look-loss-weight "$LOOK_LOSS_WEIGHT" --look-loss-layer "$LOOK_LOSS_LAYER" --look-loss-heads "$LOOK_LOSS_HEADS" \
    --save-steps "$SAVE_STEPS" --save-total-limit 2 --logging-steps 10 "${resume[@]}"

qwen-vl eval --task synthetic --data "$work/data/heldout" --model "$work/run/final" --out "$work/eval" \
    --style chat --batch-size 16
python "$here/export.py" "$work/run/final" "$base" "$work/eval"
