#!/usr/bin/env bash
# LoRA-scale sweep and LoRA mixing of docs/method-comparison.md, after method-comparison.sh.
set -euo pipefail
draft=./target/release/draft
lv=runs/compare/draft-lv/pytorch_lora_weights.safetensors
blue=runs/compare/target-blue/pytorch_lora_weights.safetensors
prompts=(--prompt "a large red circle on a white background" --prompt "a small blue square on a yellow background"
         --prompt "a large yellow triangle on a purple background" --prompt "a small purple circle on a black background")
for s in 0 0.5 1 1.5; do
    "$draft" sample "${prompts[@]}" --batch 8 --seed 0 --device cpu --lora "$lv:$s" --out "docs/img/lora-scale-$s.png"
    echo "### colourfulness LoRA at scale $s"
    "$draft" score --sample 8 --seed 0 --device cpu "${prompts[@]}" --lora "$lv:$s" \
        --reward colorfulness --reward target-color --target-color 0.15,0.25,0.9
done
# Two LoRAs trained on different rewards (colourfulness; closeness to blue), mixed.
for mix in "1 0" "0 1" "0.5 0.5" "1 1"; do
    set -- $mix
    "$draft" sample "${prompts[@]}" --batch 8 --seed 0 --device cpu --lora "$lv:$1" --lora "$blue:$2" \
        --out "docs/img/lora-mix-$1-$2.png"
    echo "### colourfulness LoRA × $1 + blue LoRA × $2"
    "$draft" score --sample 8 --seed 0 --device cpu "${prompts[@]}" --lora "$lv:$1" --lora "$blue:$2" \
        --reward colorfulness --reward target-color --target-color 0.15,0.25,0.9
done
