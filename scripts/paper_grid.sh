#!/usr/bin/env bash
# The paper's experiment grid on one dataset: extract once, then every head x loss / sampler /
# second stage from the cache, then one report. Settings come from the environment (see Makefile):
#   DATASET DATA_ROOT [MANIFEST_DIR] [MODEL] [PRETRAINED] [OUT] [EPOCHS] [LTCLIP] [EXTRACT_ARGS]
set -euo pipefail
: "${DATASET:?set DATASET (imagenet_lt, places_lt, inat18, cifar100_lt, synthetic)}"
: "${DATA_ROOT:?set DATA_ROOT to the image folder of the dataset}"
ltclip=${LTCLIP:-ltclip}
model=${MODEL:-ViT-B-16}
pretrained=${PRETRAINED:-openai}
out=${OUT:-experiments/$DATASET-$model}
epochs=${EPOCHS:-10}
manifest=()
[ -n "${MANIFEST_DIR:-}" ] && manifest=(--manifest-dir "$MANIFEST_DIR")
# shellcheck disable=SC2086
"$ltclip" extract --dataset "$DATASET" --data-root "$DATA_ROOT" "${manifest[@]}" \
    --model "$model" --pretrained "$pretrained" --out "$out/features" ${EXTRACT_ARGS:-}

run() {  # run NAME ARGS...: train unless that run already finished
    [ -f "$out/runs/$1/run.json" ] && return 0
    rm -rf "$out/runs/$1"
    "$ltclip" train-head --out "$out/runs/$1" "${@:2}"
}
for head in linear decoder; do
    base=(--features "$out/features" --head "$head" --epochs "$epochs")
    # unit-norm embeddings (linear) need a larger second-stage step than the decoder's CLS features
    stage2_lr=0.1
    [ "$head" = linear ] && stage2_lr=1.0
    for loss in ce focal cbw cb balanced_softmax logit_adjusted lade; do
        run "$head-$loss" "${base[@]}" --loss "$loss"
    done
    run "$head-grw" "${base[@]}" --loss grw --loss-opt exponent=1.2  # the paper's GRW (exponent 1 is CBW)
    # LDAM on plain logits as in the paper's code (s = 1; its s = 30 assumes cosine logits): without DRW,
    # as the paper ran it, and LDAM-DRW as a row of its own
    run "$head-ldam" "${base[@]}" --loss ldam --loss-opt s=1
    run "$head-ldam-drw" "${base[@]}" --loss ldam --loss-opt s=1 --loss-opt "drw_epoch=$((epochs * 4 / 5))"
    for sampler in class-balanced sqrt progressive; do
        run "$head-ce-$sampler" "${base[@]}" --loss ce --sampler "$sampler"
    done
    for method in crt lws disalign marc; do
        run "$head-ce-$method" --from "$out/runs/$head-ce" --two-stage "$method" --epochs "$epochs" --lr "$stage2_lr"
    done
    for method in tau-norm ncm; do  # closed-form: nothing to train
        run "$head-ce-$method" --from "$out/runs/$head-ce" --two-stage "$method"
    done
    if [ -f "$out/features/val.h5" ]; then  # tau is chosen on val (CIFAR-100-LT has none)
        run "$head-ce-posthoc-la" --from "$out/runs/$head-ce" --posthoc-la
    fi
done

"$ltclip" eval "$out"/runs/* --zero-shot --knn 10 --ncm --features "$out/features" \
    --report "$out/table.md" --json "$out/results.json" --csv "$out/results.csv" --plot "$out/per_class.png"
echo "report: $out/table.md"
