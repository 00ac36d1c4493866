#!/usr/bin/env bash
# The paper's story on the built-in synthetic long-tailed set, offline, in a few minutes on 2 CPU cores:
# a toy CLIP pretrained contrastively on drawn image–caption pairs (cached in OUT/toy-clip), then
# images -> feature cache -> heads (linear, text-initialised, the decoder; CE vs Balanced Softmax; cRT,
# post-hoc LA) -> report (OUT/table.md, OUT/accuracy.png, OUT/accuracy_per_class.png).
# Usage: scripts/demo.sh LTCLIP_BIN OUT_DIR. MODEL and PRETRAINED replace the toy CLIP with another
# backbone (e.g. MODEL=ViT-B-16 PRETRAINED=openai, downloaded once).
set -euo pipefail
ltclip=${1:-ltclip}
out=${2:-demo}
start=$SECONDS
# The models are tiny: one thread per process beats two threads contending for 2 cores, and the two
# training lanes below run side by side.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
model=${MODEL:-ltclip-tiny-vit}
mkdir -p "$out/logs"

# One line saying what a step does, with the seconds since the start.
say() { echo "[$((SECONDS - start)) s] $*"; }
# The newest line of a log, without a progress bar's drawing.
last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | sed -E 's/(━)+ ?//' || true; }
# Wait for the background step $1, showing the newest line of its log $2 whenever it changes, and
# that it still runs after 30 s without one (a long step is never silent); a failed step shows its
# log's end and stops the demo.
follow() {
    local pid=$1 log=$2 shown="" line finished said=$SECONDS
    while :; do
        finished=0
        kill -0 "$pid" 2>/dev/null || finished=1
        line=$(last_line "$log")
        if [ -n "$line" ] && [ "$line" != "$shown" ]; then
            echo "    [$((SECONDS - start)) s] $line"
            shown=$line
            said=$SECONDS
        elif [ "$finished" = 0 ] && [ $((SECONDS - said)) -ge 30 ]; then
            echo "    [$((SECONDS - start)) s] still running (a busy CPU slows it; its log: $log)"
            said=$SECONDS
        fi
        [ "$finished" = 1 ] && break
        sleep 1
    done
    wait "$pid" || { echo "failed; the end of $log:"; tail -n 5 "$log"; exit 1; }
}

if [ -z "${PRETRAINED:-}" ]; then
    pretrained="$out/toy-clip/toy_clip.pt"
    say "pretraining the toy CLIP in the background (about a minute on 2 cores; cached in $out/toy-clip;" \
        "log: $out/logs/pretrain-toy.log)"
    # It runs (almost) alone: two threads, fixed so that the toy CLIP does not depend on the core count.
    OMP_NUM_THREADS=2 "$ltclip" pretrain-toy --out "$out/toy-clip" --model "$model" 2> "$out/logs/pretrain-toy.log" &
    pretraining=$!
else
    pretrained=$PRETRAINED
fi
say "drawing the synthetic long-tailed set"
"$ltclip" datasets make-synthetic "$out/synthetic" --classes 20 --imbalance 50 --max-per-class 300 \
    --test-per-class 50 --size 32
"$ltclip" datasets info synthetic --data-root "$out/synthetic"
if [ -n "${pretraining:-}" ]; then
    say "waiting for the toy CLIP's pretraining (its progress, from $out/logs/pretrain-toy.log):"
    follow "$pretraining" "$out/logs/pretrain-toy.log"
fi
say "extracting the features of every split into $out/features (log: $out/logs/extract.log)"
"$ltclip" extract --dataset synthetic --data-root "$out/synthetic" --model "$model" --pretrained "$pretrained" \
    --out "$out/features" --workers 1 --batch-size 256 2> "$out/logs/extract.log" > "$out/logs/extract.out" &
follow $! "$out/logs/extract.log"
tail -n 2 "$out/logs/extract.out"

rm -rf "$out/runs"
# One training run, its log in OUT/logs; prints the run's summary line. A wide COLUMNS keeps rich
# from wrapping a long line at 80 columns in the log, which would cut the `run:` line shown here.
train() {
    local name=$1
    shift
    COLUMNS=1000 "$ltclip" train-head --out "$out/runs/$name" "$@" > "$out/logs/$name.log" 2>&1 ||
        { tail -n 5 "$out/logs/$name.log"; return 1; }
    grep '^run: ' "$out/logs/$name.log"
}
heads_on_embeddings() {
    train linear-ce --features "$out/features" --head linear --loss ce --epochs 40
    train linear-ce-crt --from "$out/runs/linear-ce" --two-stage crt --epochs 30 --lr 1.0
    train linear-ce-posthoc-la --from "$out/runs/linear-ce" --posthoc-la
    train linear-balanced-softmax --features "$out/features" --head linear --loss balanced_softmax --epochs 40
    train text-init-balanced-softmax --features "$out/features" --head text-init --loss balanced_softmax --epochs 20
}
# The decoder with its own defaults (`ltclip list heads`); the linear heads above need more than their
# default 10 epochs on a cache this small (7 steps an epoch).
decoders() {
    train decoder-ce --features "$out/features" --head decoder --loss ce
    train decoder-balanced-softmax --features "$out/features" --head decoder --loss balanced_softmax
}
say "training 7 heads on the cached features, two at a time; each prints its run: line when done" \
    "(logs: $out/logs/NAME.log)"
heads_on_embeddings & lane_one=$!
decoders & lane_two=$!
wait "$lane_one"
wait "$lane_two"

say "evaluating the runs, zero-shot, kNN and NCM on the test split"
"$ltclip" eval "$out"/runs/* --zero-shot --knn 10 --ncm --features "$out/features" \
    --report "$out/table.md" --json "$out/results.json" --csv "$out/results.csv" --plot "$out/accuracy.png"
echo "report: $out/table.md; figures: $out/accuracy.png (shot groups), $out/accuracy_per_class.png (per class)"
echo "demo finished in $((SECONDS - start)) s (logs: $out/logs)"
