"""Same numbers before and after a refactor: fixed CLI runs, their weights' sha256 and their metrics.

Writes a long-tailed Gaussian cache (embeddings and tokens) and a small synthetic image set, runs a
fixed list of ``ltclip`` commands on them (stage 1 on every head, second stages, a sweep, extract,
finetune with the tiny open_clip config), and prints one JSON object: per run, the sha256 of each
state dict in ``model.pt``, the selected validation metrics and the resolved options of
``config.json``. Run it on two commits and compare the outputs::

    python -m benchmarks.fixed_config --out /tmp/fixed-a > a.json   # (on the other commit: b.json)
    python -m benchmarks.fixed_config --compare a.json b.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

# name -> ltclip arguments ({F}: the Gaussian cache, {R}: the runs folder, {S}: the image set, {X}: extract's folder)
RUNS = {
    "linear_ce": "train-head -f {F} --head linear --loss ce --epochs 3",
    "linear_defaults": "train-head -f {F} --head linear --loss balanced_softmax",
    "cosine_bs_cbs_warm": "train-head -f {F} --head cosine --loss balanced_softmax --sampler class-balanced --warmup 1 --epochs 4",
    "mlp_focal_prog_sgd": "train-head -f {F} --head mlp --loss focal --sampler progressive --optimizer sgd --lr 0.05 --epochs 3 --head-opt hidden=16",
    "decoder_ldam_steps": "train-head -f {F} --head decoder --loss ldam --steps 12 --head-opt depth=1 --loss-opt drw_at=0.5",
    "linear_la_recipe": "train-head -f {F} --head linear --loss logit_adjusted --recipe imbalance-vlm --steps 10 --warmup-steps 2 --batch-size 64",
    "text_init_grw": "train-head -f {F} --head text-init --loss grw --epochs 2 --no-decay-1d",
    "crt": "train-head --from {R}/linear_ce --two-stage crt --epochs 3",
    "lws": "train-head --from {R}/decoder_ldam_steps --two-stage lws --epochs 2",
    "tau_norm": "train-head --from {R}/linear_ce --two-stage tau-norm",
    "disalign": "train-head --from {R}/mlp_focal_prog_sgd --two-stage disalign --epochs 2 --lr 0.5",
    "posthoc_la": "train-head --from {R}/linear_ce --posthoc-la",
    "sweep": "sweep -f {F} --head linear --loss balanced_softmax --epochs 2 --grid lr=0.03,0.3 --grid sampler=instance,sqrt",
    "extract": "extract --dataset synthetic --data-root {S} --model ltclip-tiny-vit --pretrained none --workers 0 --batch-size 64 --block-size 64",
    "finetune_lora": "finetune --dataset synthetic --data-root {S} --model ltclip-tiny-vit --pretrained none --tune lora --head linear --epochs 1 --batch-size 32 --workers 0",
    "finetune_recipe_lift": "finetune --dataset synthetic --data-root {S} --model ltclip-tiny-vit --pretrained none --recipe lift --epochs 1 --batch-size 32 --workers 0",
}


def gaussian_cache(folder: Path) -> None:
    """8 classes (150 … 3 train rows), 16-d embeddings, 5 × 16 tokens, a text.h5; val and test balanced."""
    from ltclip.artifacts.store import save_text_embeddings, write_arrays

    rng = np.random.default_rng(0)
    counts = [150, 90, 55, 33, 20, 12, 6, 3]
    means = rng.standard_normal((8, 16)).astype(np.float32) * 1.5
    names = [f"class {i}" for i in range(8)]
    for split, per_class in (("train", counts), ("val", [12] * 8), ("test", [15] * 8)):
        y = np.repeat(np.arange(8), per_class)
        tokens = rng.standard_normal((len(y), 5, 16)).astype(np.float32)
        tokens[:, 0] += means[y]
        write_arrays(folder / f"{split}.h5", tokens[:, 0], y, names, {"dataset": "gaussian", "split": split, "model": "gaussian"}, tokens)
    save_text_embeddings(folder / "text.h5", means / np.linalg.norm(means, axis=1, keepdims=True), names, ["a photo of a {}."],
                          {"dataset": "gaussian", "model": "gaussian"})


def ltclip(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ltclip", *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"ltclip {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def digest(obj) -> object:
    """sha256 of every tensor of a (nested) state dict, keyed by path."""
    import torch

    if isinstance(obj, torch.Tensor):
        return hashlib.sha256(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    if isinstance(obj, dict):
        return {k: digest(v) for k, v in obj.items() if isinstance(v, (dict, torch.Tensor))}
    return None


def describe(run: Path) -> dict:
    import torch

    if (run / "model.pt").is_file():
        info = json.loads((run / "run.json").read_text())
        config = json.loads((run / "config.json").read_text())
        flat = {}
        for k, v in config.items():
            flat.update(v if k in ("data", "optim", "method", "tuning") else {k: v})
        return {"weights": digest(torch.load(run / "model.pt", weights_only=True)),
                "best": info.get("best"), "config": {k: v for k, v in flat.items() if k not in ("out", "features", "from_run", "data_root")}}
    if (run / "sweep.json").is_file():
        sweep = json.loads((run / "sweep.json").read_text())
        return {"points": [(p["name"], p["best"]) for p in sweep["points"]], "best": describe(run / "best")}
    import h5py

    out = {}
    for split in sorted(run.glob("*.h5")):
        with h5py.File(split, "r") as f:
            out[split.name] = {k: _array_digest(f[k][()]) for k in f if hasattr(f[k], "shape")}
    return out


def _array_digest(a: np.ndarray) -> str:
    data = json.dumps(a.tolist(), default=str).encode() if a.dtype == object else np.ascontiguousarray(a).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/fixed_config"))
    parser.add_argument("--only", nargs="*", help="run only these (and what they need)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        for name in sorted(set(a) | set(b)):
            print(f"{name:24s} {'missing' if name not in a or name not in b else 'same' if a[name] == b[name] else 'DIFFERS'}")
        return
    shutil.rmtree(args.out, ignore_errors=True)
    F, R, S = args.out / "features", args.out / "runs", args.out / "synthetic"
    F.mkdir(parents=True)
    gaussian_cache(F)
    ltclip(["datasets", "make-synthetic", str(S), "--classes", "6", "--max-per-class", "40", "--imbalance", "10",
            "--test-per-class", "8", "--size", "32"], args.out)
    results = {}
    for name, command in RUNS.items():
        if args.only and name not in args.only:
            continue
        out = args.out / "extract" if name == "extract" else R / name
        words = command.format(F=F.resolve(), R=R.resolve(), S=S.resolve()).split()
        ltclip([*words, "--out", str(out.resolve())], args.out)
        results[name] = describe(out)
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
