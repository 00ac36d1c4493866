#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic long-tailed set: images -> cache -> heads -> report.
# Usage: scripts/demo.sh LTCLIP_BIN OUT_DIR. MODEL / PRETRAINED override the backbone (default: the
# tiny open_clip config with random weights, which needs no download).
set -euo pipefail
ltclip=${1:-ltclip}
out=${2:-demo}
model=${MODEL:-ltclip-tiny-vit-64}
pretrained=${PRETRAINED:-none}

"$ltclip" datasets make-synthetic "$out/synthetic" --classes 20 --imbalance 50 --max-per-class 300 --size 64
"$ltclip" datasets info synthetic --data-root "$out/synthetic"
"$ltclip" extract --dataset synthetic --data-root "$out/synthetic" --model "$model" --pretrained "$pretrained" \
    --out "$out/features" --workers 2 --batch-size 128
"$ltclip" cache info "$out/features"

rm -rf "$out/runs"
train() { "$ltclip" train-head --features "$out/features" --out "$out/runs/$1" "${@:2}"; }
train linear-ce --head linear --loss ce --epochs 30 --lr 0.1
train linear-balanced-softmax --head linear --loss balanced_softmax --epochs 30 --lr 0.1
train cosine-ldam-drw --head cosine --head-opt init_scale=1 --head-opt learn_scale=false --loss ldam --loss-opt drw_epoch=20 --epochs 30 --lr 0.1
train decoder-ce --head decoder --loss ce --epochs 15 --lr 1e-3
train decoder-balanced-softmax --head decoder --loss balanced_softmax --epochs 15 --lr 1e-3
"$ltclip" train-head --from "$out/runs/linear-ce" --two-stage crt --epochs 30 --lr 1.0 --out "$out/runs/linear-ce-crt"
"$ltclip" train-head --from "$out/runs/linear-ce" --posthoc-la --out "$out/runs/linear-ce-posthoc-la"

"$ltclip" eval "$out"/runs/* --zero-shot --knn 10 --ncm --features "$out/features" \
    --report "$out/table.md" --json "$out/results.json" --csv "$out/results.csv" --plot "$out/per_class.png"
echo "report: $out/table.md, plot: $out/per_class.png"
