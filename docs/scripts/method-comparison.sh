#!/usr/bin/env bash
# The method comparison of docs/method-comparison.md, on the embedded model with the main
# job's settings (colorfulness reward, shapes prompts, batch 2, 50 DDIM steps, guidance 7.5,
# lr 3e-3, seed 0), 30 updates each, the fixed evaluation set (8 images) every 10 updates.
# Run from the repository root after `cargo build --release`.
set -euo pipefail
draft=./target/release/draft
out=runs/compare
mkdir -p "$out"
common=(--train-steps 30 --eval-every 10 --seed 0 --device cpu)
run() { # name, flags…
    local name=$1; shift
    [ -f "$out/$name/pytorch_lora_weights.safetensors" ] && return
    rm -rf "${out:?}/$name"
    "$draft" train "${common[@]}" --out-dir "$out/$name" "$@" 2> "$out/$name.log"
}
run draft-1 --method draft-k --k 1
run draft-lv --method draft-lv --lv-samples 2
run refl --method refl
run alignprop --method alignprop --k-min 1 --k-max 10
run draft-full --method draft
run draft-5 --method draft-k --k 5
run draft-10 --method draft-k --k 10
# A second reward for LoRA mixing: pull towards blue.
run target-blue --method draft-lv --reward target-color --target-color 0.15,0.25,0.9
