"""Fine-tuning cost: images/s and peak memory of every ``--tune`` mode, and of every head against the class count.

Run as ``python -m benchmarks.bench_finetune [--quick] [--model M] [--out DIR]``; prints Markdown tables
and writes DIR/finetune.json (default bench_out/). Weights are random (``--pretrained none``): speed does
not depend on them. Full: the tuning modes on ``bench_train_head``'s bench ViT (``ltclip-bench-vit-w384``:
128 px, 65 tokens × 384, 8 blocks), batch 16, the largest model whose run fits in about 15 minutes on 2
CPU cores (one ViT-B-32 step, batch 16, ``--tune full``, took 29-39 s there on a busy machine); the heads
against the class count on ``ltclip-tiny-vit`` (text tower 2 blocks × 64), whose 8,142-class exact prompt
step already lasts one to two minutes there. ``--model`` / ``--class-model`` (any open_clip name, e.g.
``ViT-B-32``) measure others. Quick: ``ltclip-tiny-vit`` for both, fewer steps.

Every measurement runs in its own process (started through a forking shell, as in
``bench_streaming``, so ``ru_maxrss`` is its own), which builds the model the way ``ltclip finetune``
does (``new_encoder_classifier``: ``load_backbone``, ``apply_tuning``, grad checkpointing, the head,
``EncoderClassifier``) and trains it with the engine's ``fit`` exactly as ``run_finetune`` calls it
(its ``Task``, per-submodule learning rates and no-decay names, ``FINETUNE_OPTIM`` with the batch size
and step count changed, fp32, the instance sampler). The only difference from ``run_finetune``: the
training source yields images already in RAM (random tensors of the model's input size, indexed per
batch), so neither PNG decoding nor augmentation is timed. Timed: the wall time of each optimizer step
(batch indexing → forward → loss → backward → AdamW → schedule step), from the engine's progress
callbacks; the first ``warmup`` steps of each process are dropped and the median over the remaining
steps of all quiet runs is reported (and the best round's median). Rounds interleave: round r runs every
configuration once, in order, before round r + 1 starts; a run during which other processes kept more
than 0.5 cores busy is repeated once (``--retries``) and left out of the medians if a quiet run exists.
The encoder's forward time is taken around ``EncoderClassifier.encode``.

1. **Tuning modes** (each with its default options, ``last-k`` with ``k=2``, and ``full`` once more with
   ``--grad-checkpointing``) with a linear head on the pooled embedding (full size; quick: also the
   decoder head on the tokens), 100 classes: images/s relative to ``frozen`` with the same head, peak
   RSS (ru_maxrss) and the RSS after the model is built, trainable encoder parameters (``count_trainable``).
2. **Heads against the class count** (100, 1,000, 8,142) on the frozen encoder: linear, cosine, decoder,
   and the CoOp prompt head (text prompt tuning) exact (``classes_per_step=0``: every class through the
   text tower at every step, chunked and checkpointed) and sampled (``classes_per_step=256``): step
   time, the part of it that is not the encoder's forward, and peak RSS. The *naive* row is this
   benchmark's own CoOp-style module, not a registered head: 4 learned context vectors in
   ``"X X X X <class>."``, all C prompts through the frozen text tower with autograd at every step
   (up to 1,000 classes: at 8,142 it needs several GiB). The exact prompt head above 1,000 classes runs
   one step without warm-up (``long_steps``). The first step of each process is reported too: for the
   sampled prompt head it includes the exact no-grad encoding of every class, which recurs every
   ``refresh_every`` (10) steps.

Timings need a quiet machine (torch's intra-op threads slow down badly on busy cores): each row shows
how many cores other processes kept busy during the runs it uses (from /proc/stat), and the output warns
above 0.5.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_eval import PeakRSS, machine_info
from benchmarks.bench_train_head import BENCH_MODEL, ImageSource, register_bench_model
from benchmarks.timing import OtherLoad, StepTimer, add_child_options, loadavg, median, run_child, serve_child

MODES = (  # (tune, tune_opts, grad_checkpointing)
    ("frozen", (), False), ("full", (), False), ("full", (), True), ("last-k", ("k=2",), False),
    ("bitfit", (), False), ("ln", (), False), ("lora", (), False), ("adapter", (), False),
    ("adaptformer", (), False), ("vpt-shallow", (), False), ("vpt-deep", (), False),
)
CLASS_HEADS = (("linear", ()), ("cosine", ()), ("decoder", ()), ("prompt", ("classes_per_step=0",)),
               ("prompt", ("classes_per_step=256",)), ("naive", ()))
FULL = {"model": BENCH_MODEL, "class_model": "ltclip-tiny-vit", "batch_size": 16, "warmup": 1, "steps": 2,
        "rounds": 1, "mode_heads": ("linear",), "mode_classes": 100, "classes": (100, 1000, 8142), "class_rounds": 1,
        "naive_classes": (100, 1000), "long_steps": {"warmup": 0, "steps": 1}}
QUICK = {"model": "ltclip-tiny-vit", "class_model": "ltclip-tiny-vit", "batch_size": 16, "warmup": 1, "steps": 2,
         "rounds": 1, "mode_heads": ("linear", "decoder"), "mode_classes": 100, "classes": (100, 1000, 8142),
         "class_rounds": 1, "naive_classes": (100,), "long_steps": {"warmup": 0, "steps": 1}}
MiB = 2**20


class Classes:
    """What ``new_encoder_classifier`` reads of a dataset: C class names."""

    def __init__(self, num_classes: int):
        self.num_classes, self.name = num_classes, f"bench-{num_classes}"
        self.classnames = [f"class {i}" for i in range(num_classes)]


class NaivePromptHead(torch.nn.Module):
    """CoOp-style text prompt tuning done naively: all C prompts through the text tower, with gradients, every step."""

    input = "embeds"

    def __init__(self, backbone, classnames: list[str], n_ctx: int = 4):
        super().__init__()
        self._clip = (backbone.model,)  # not a submodule: the frozen text tower stays the encoder's
        self.n_ctx = n_ctx
        self.register_buffer("text", backbone.tokenizer([" ".join(["X"] * n_ctx) + f" {c}." for c in classnames]),
                             persistent=False)
        with torch.no_grad():
            self.ctx = torch.nn.Parameter(backbone.model.token_embedding(self.text[0, 1 : 1 + n_ctx]).clone())

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        clip = self._clip[0]
        x = clip.token_embedding(self.text)
        x = torch.cat([x[:, :1], self.ctx.expand(len(x), -1, -1), x[:, 1 + self.n_ctx :]], dim=1)
        x = clip.ln_final(clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask))
        x = x[torch.arange(len(x)), self.text.argmax(dim=-1)]
        x = clip.text_projection(x) if isinstance(clip.text_projection, torch.nn.Module) else x @ clip.text_projection
        return 100.0 * F.normalize(embeds, dim=-1) @ F.normalize(x, dim=-1).T


# ------------------------------------------------------------------ one measurement, in its own process


def child_main(spec: dict) -> dict:
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(spec["threads"])
    import psutil

    import ltclip.stages.finetune as stage
    from ltclip.config import FinetuneConfig, from_flat
    from ltclip.engine import ParamGroups, RunEnv, fit
    from ltclip.methods.task import Task
    from ltclip.models.backbone import register_tiny_configs
    from ltclip.models.encoder_classifier import EncoderClassifier
    from ltclip.models.cost import count_params
    from ltclip.models.tuning import count_trainable, no_weight_decay_names

    register_tiny_configs()
    if spec["model"] == BENCH_MODEL:
        register_bench_model(Path(spec["config_dir"]))
    classes, batch, steps = spec["classes"], spec["batch_size"], spec["warmup"] + spec["steps"]
    naive = spec["head"] == "naive"
    cfg = from_flat(FinetuneConfig, {
        "out": "unused", "model": spec["model"], "pretrained": "none", "tune": spec["tune"],
        "tune_opts": tuple(spec["tune_opts"]), "grad_checkpointing": spec["grad_checkpointing"],
        "head": "linear" if naive else spec["head"], "head_opts": tuple(spec["head_opts"]), "loss": "ce",
        "batch_size": batch, "steps": steps, "epochs": 1, "device": "cpu", "seed": 0, "workers": 0,
    }, owner="bench_finetune")
    dataset = Classes(classes)
    t = time.perf_counter()
    backbone, model = stage.new_encoder_classifier(cfg, dataset, torch.device("cpu"))
    if naive:
        model = EncoderClassifier(backbone, NaivePromptHead(backbone, dataset.classnames))
    build_s = time.perf_counter() - t
    forward_s: list[float] = []
    encode = model.encode

    def timed_encode(*args, **kwargs):
        t0 = time.perf_counter()
        out = encode(*args, **kwargs)
        forward_s.append(time.perf_counter() - t0)
        return out

    model.encode = timed_encode
    px = backbone.preprocess_cfg["size"]
    px = px[0] if isinstance(px, (tuple, list)) else px
    labels = np.arange(batch * steps) % classes
    source = ImageSource(torch.randn(batch * steps, 3, px, px, generator=torch.Generator().manual_seed(0)), labels)
    trainable = count_trainable(backbone.model)
    lrs = {"head": cfg.optim.lr, **({"backbone": cfg.tuning.backbone_lr or cfg.optim.lr} if trainable else {})}
    rss_built = psutil.Process().memory_info().rss / MiB
    timer = StepTimer()
    with PeakRSS() as mem:
        fit(model, Task("ce", {}, np.bincount(labels, minlength=classes)), source, cfg.optim, sampler="instance",
            num_classes=classes, env=RunEnv(device="cpu", progress=timer),
            groups=ParamGroups(lrs=lrs, no_decay=tuple(f"backbone.{n}" for n in no_weight_decay_names(backbone.model))))
    (epoch,) = timer.epochs
    ends = [0.0, *epoch["step_ends_s"]]
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    w = spec["warmup"]
    return {"step_s": step_s[w:], "warmup_step_s": step_s[:w], "encoder_forward_s": forward_s[w:],
            "build_s": build_s, "encoder_trainable": trainable,
            "head_trainable": count_params(model.head, trainable_only=True), "rss_built_mib": rss_built,
            "peak_rss_mib": mem.peak_mib, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


QUIET = 0.5  # cores other processes may keep busy during a run that counts as quiet


def run_rounds(specs: list[dict], rounds: int, shared: bool, retries: int) -> dict:
    """Every spec once per round, rounds one after another, each in its own process (``shared``: all of
    a round in one process, so its peak RSS is not per spec). A run during which other processes kept
    more than QUIET cores busy is repeated (at most ``retries`` times per spec and round); the statistics
    pool the step times of the quiet runs, or of all runs when none was quiet; the JSON keeps every run."""
    results: dict = {}
    groups = [specs] if shared else [[s] for s in specs]
    for r in range(rounds):
        for group in groups:
            for attempt in range(1 + (0 if shared else retries)):
                load = loadavg()
                with OtherLoad() as other:
                    outs = run_child("benchmarks.bench_finetune", group, group[0]["label"])
                for spec, out in zip(group, outs):
                    res = results.setdefault(spec["label"], {"spec": spec, "runs": []})
                    res["runs"].append({**out, "other_cores": other.cores, "loadavg_before": load, "round": r,
                                        "attempt": attempt})
                if other.cores <= QUIET:
                    break
    results = {s["label"]: results[s["label"]] for s in specs}  # the specs' order
    for res in results.values():
        runs = [run for run in res["runs"] if run["other_cores"] <= QUIET] or res["runs"]
        step = median([s for run in runs for s in run["step_s"]])
        fwd = [s for run in runs for s in run["encoder_forward_s"]]
        res.update({
            "step_s": step, "images_per_s": res["spec"]["batch_size"] / step, "runs_used": len(runs),
            "best_step_s": min(median(run["step_s"]) for run in res["runs"]),
            "encoder_forward_s": median(fwd) if fwd else None,
            # the kernel's high-water mark of the spec's own process; sampled (5 ms) when processes are shared
            "peak_rss_mib": max(run["peak_rss_mib" if shared else "ru_maxrss_mib"] for run in res["runs"]),
            "rss_built_mib": median([run["rss_built_mib"] for run in res["runs"]]),
            "other_cores": max(run["other_cores"] for run in runs),
            **{k: runs[0][k] for k in ("encoder_trainable", "head_trainable", "build_s")},
        })
    return results


def base_spec(size: dict, threads: int, config_dir: Path, **kw) -> dict:
    spec = {"model": size["model"], "batch_size": size["batch_size"], "warmup": size["warmup"], "steps": size["steps"],
            "config_dir": str(config_dir), "threads": threads, "tune": "frozen", "tune_opts": [],
            "grad_checkpointing": False, "head_opts": [], **kw}
    opts = " ".join([*spec["tune_opts"], *(["--grad-checkpointing"] if spec["grad_checkpointing"] else [])])
    spec["label"] = f"{spec['tune']}{f' {opts}' if opts else ''} / {spec['head']} {' '.join(spec['head_opts'])}".strip()
    spec["label"] += f" / C={spec['classes']}"
    return spec


# ------------------------------------------------------------------ report


def _runs(r: dict) -> str:
    return f"{r['runs_used']} of {len(r['runs'])}"


def mode_table(results: dict) -> str:
    rows = ["| `--tune` | head | trainable encoder params | step s: median (best round) | images/s | vs `frozen` "
            "| RSS after build MiB | peak RSS MiB (+ training) | quiet runs used | cores busy with other work |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    frozen = {r["spec"]["head"]: r for r in results.values() if r["spec"]["tune"] == "frozen"}
    for r in results.values():
        s = r["spec"]
        tune = " ".join([s["tune"], *s["tune_opts"], *(["--grad-checkpointing"] if s["grad_checkpointing"] else [])])
        rel = r["images_per_s"] / frozen[s["head"]]["images_per_s"]
        rows.append(f"| {tune} | {s['head']} | {r['encoder_trainable']:,} | {r['step_s']:.3f} ({r['best_step_s']:.3f}) "
                    f"| {r['images_per_s']:.1f} | {rel:.2f} | {r['rss_built_mib']:,.0f} | {r['peak_rss_mib']:,.0f} "
                    f"(+{r['peak_rss_mib'] - r['rss_built_mib']:,.0f}) | {_runs(r)} | {r['other_cores']:.1f} |")
    return "\n".join(rows)


def class_table(results: dict) -> str:
    rows = ["| head | classes | trainable head params | step s (median) | of which not the encoder's forward s "
            "| first step s | peak RSS MiB (+ over build) | build s | quiet runs used "
            "| cores busy with other work |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        s = r["spec"]
        first = r["runs"][0]["warmup_step_s"]
        head = f"{s['head']} {' '.join(s['head_opts'])}".strip()
        rest = r["step_s"] - r["encoder_forward_s"]
        rows.append(f"| {head} | {s['classes']:,} | {r['head_trainable']:,} | {r['step_s']:.3f} | {rest:.3f} "
                    f"| {f'{first[0]:.3f}' if first else '(no warm-up)'} "
                    f"| {r['peak_rss_mib']:,.0f} (+{r['peak_rss_mib'] - r['rss_built_mib']:,.0f}) "
                    f"| {r['build_s']:.1f} | {_runs(r)} | {r['other_cores']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, few steps (1-2 minutes)")
    parser.add_argument("--model", default=None, help=f"open_clip model of the tuning modes (default: {FULL['model']}; "
                        f"quick: {QUICK['model']})")
    parser.add_argument("--class-model", default=None,
                        help=f"open_clip model of the heads against the class count (default: {FULL['class_model']})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the tuning modes (default: 2, quick: 1)")
    parser.add_argument("--retries", type=int, default=1,
                        help="reruns of a run during which other processes kept > 0.5 cores busy (default 1)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for finetune.json")
    add_child_options(parser)
    args = parser.parse_args(argv)
    if serve_child(args, lambda specs: [child_main(spec) for spec in specs]):
        return {}
    size = {**(QUICK if args.quick else FULL), **({"model": args.model} if args.model else {}),
            **({"class_model": args.class_model} if args.class_model else {})}
    rounds, threads = args.rounds or size["rounds"], torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    sections = {}
    t = time.perf_counter()
    mode_specs = [base_spec(size, threads, args.out, tune=tune, tune_opts=list(opts), grad_checkpointing=gc, head=head,
                            classes=size["mode_classes"]) for head in size["mode_heads"] for tune, opts, gc in MODES]
    modes = run_rounds(mode_specs, rounds, args.quick, args.retries)
    sections["tuning modes"] = time.perf_counter() - t
    t = time.perf_counter()
    def class_spec(head, opts, c):
        long = head == "prompt" and "classes_per_step=0" in opts and c > 1000
        return base_spec(size, threads, args.out, head=head, head_opts=list(opts), classes=c, model=size["class_model"],
                         **(size["long_steps"] if long else {}))

    class_specs = [class_spec(head, opts, c) for head, opts in CLASS_HEADS
                   for c in (size["naive_classes"] if head == "naive" else size["classes"])]
    heads = run_rounds(class_specs, size["class_rounds"], args.quick, args.retries)
    sections["heads × classes"] = time.perf_counter() - t
    machine = {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    report = {"size": size, "rounds": rounds, "shared_processes": args.quick, "machine": machine,
              "wall_s": time.perf_counter() - start,
              "sections_s": sections, "modes": modes, "heads": heads}
    (args.out / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{machine['cpu_model']}, {machine['nproc']} cores, torch {machine['torch']} ({threads} threads); "
          f"load average {load_before[0]:.1f} before, {machine['loadavg_after'][0]:.1f} after; "
          f"{report['wall_s']:.0f} s in all\n")
    print(f"{size['model']}, batch {size['batch_size']}, fp32, images in RAM; per optimizer step (forward + backward "
          f"+ AdamW), median of {size['steps']} steps × the quiet runs of {rounds} rounds, after {size['warmup']} "
          f"warm-up step(s) per process; {size['mode_classes']} classes:\n")
    print(mode_table(modes))
    print(f"\nHeads on the frozen {size['class_model']} encoder against the number of classes (batch "
          f"{size['batch_size']}; median of {size['steps']} steps after {size['warmup']} warm-up step(s), exact prompt "
          f"above 1,000 classes: {size['long_steps']['steps']} step, no warm-up; 'not the encoder's forward': head "
          "forward + backward, loss, AdamW, loop):\n")
    print(class_table(heads))
    print("\n`naive`: this benchmark's CoOp-style module (every class prompt through the text tower with gradients "
          "at every step), not a registered head.")
    if args.quick:
        print("Quick: each section's runs shared one process, so the RSS columns are sampled and not per mode or head.")
    busy = {name: [v["other_cores"] for v in part.values() if v.get("other_cores", 0) > QUIET]
            for name, part in (("tuning modes", modes), ("heads × classes", heads))}
    if any(busy.values()):
        print("\nWARNING: other processes kept cores busy during "
              + ", ".join(f"{len(v)} of {len(part)} {name} rows (up to {max(v):.1f} cores)"
                          for (name, v), part in zip(busy.items(), (modes, heads)) if v)
              + f"; torch's {threads} intra-op threads slow down badly when the cores are "
              "oversubscribed, so those timings are distorted: rerun on a quiet machine (or with --threads 1).")
    return report


if __name__ == "__main__":
    main()
