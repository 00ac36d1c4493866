"""One batched group of sweep points: their heads trained as a :class:`HeadStack` through the engine
in ``SWEEPDIR/groups/NAME`` (``last.pt`` there resumes it; a group killed before its first
checkpoint starts again), then each point written
as a normal train-head run folder (``config.json`` its single-run config, ``model.pt``, ``run.json``
and a ``train_log.jsonl`` of its own validations).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import save_json
from ..config import to_dict
from ..artifacts.feature_batches import FeatureInputs
from ..core.distributed import setup
from ..engine import LAST_FILE, LOG_FILE, SUMMARY_KEYS, ParamGroups, RunEnv, ValidationStats, fit, run_length, steps_per_epoch
from ..core.errors import LtclipError
from ..evaluation.metrics import average_views
from ..models.heads import HeadInputs, create_head, head_needs
from ..core.progress import Progress
from ..artifacts.runs import CONFIG_FILE, RunModel, method_record, model_payload, write_run
from ..stages.common import CacheSource, block_order, open_split, posthoc_tau, ram_budget, text_embeds
from .batched import HeadStack, StackTask, log_key
from .grid import Point

GROUP_FILE = "group.json"
# A group's epochs last milliseconds on small caches, where pickling every head, its best copy and its
# optimizer state each epoch was over a third of the sweep: epoch-end checkpoints at most this often
# (a kill loses at most this much training; ``--checkpoint-every N`` steps still applies).
EPOCH_CHECKPOINT_S = 30.0


def train_group(points: list[Point], folder: Path, features_record: dict, progress: Progress) -> None:
    """Train ``points`` together in ``folder`` (resuming its checkpoint if one is there) and write their runs."""
    cfgs = [p.cfg for p in points]
    first = cfgs[0]
    features = Path(first.features)
    ctx, device = setup(first.device)
    train_cache, val_cache = open_split(features, "train"), open_split(features, first.val_split)
    counts, num_classes = train_cache.class_counts(), train_cache.num_classes
    heads = []
    for cfg in cfgs:
        opts = cfg.method.head_opts
        torch.manual_seed(cfg.optim.seed)  # each head starts as it would alone
        text = text_embeds(features, num_classes) if head_needs(cfg.method.head, opts).text_embeds else None
        heads.append(create_head(cfg.method.head, HeadInputs(num_classes, train_cache.embed_dim, train_cache.token_shape, text), **opts))
    max_ram = ram_budget(first.max_ram, ctx)
    train, val = FeatureInputs(train_cache, "embeds", max_ram), FeatureInputs(val_cache, "embeds", max_ram)
    per_epoch = steps_per_epoch(first.optim, train_cache.num_rows)
    lengths = [run_length(cfg.optim, per_epoch) for cfg in cfgs]
    names = [p.name for p in points]
    stack = HeadStack(heads, names, [cfg.optim.select for cfg in cfgs], [epochs for _, epochs in lengths]).to(device)
    task = StackTask([(cfg.method.loss, dict(cfg.method.loss_opts)) for cfg in cfgs], counts,
                     [epochs for _, epochs in lengths])
    resume = _start_group(folder, points)
    progress.log(f"training {len(points)} heads together on the same batches: {', '.join(names)}")
    eval_batch = first.optim.batch_size * 2
    result = fit(
        stack, task, CacheSource(train, first.optim.seed), _loop_optim(first.optim), sampler=first.method.sampler,
        num_classes=num_classes, validate=lambda model: _validate_stack(model, val, counts, eval_batch, device),
        groups=ParamGroups(parts={f"heads.{k}": cfg.optim for k, cfg in enumerate(cfgs)}),
        env=RunEnv(out=folder, resume=resume, device=device, progress=progress, on_record=stack.keep_best,
                   tensorboard=first.tensorboard, epoch_checkpoint_s=EPOCH_CHECKPOINT_S,
                   block_order=block_order(first.read_blocks, first.shuffle_pool)),
    )
    for k, (point, (steps, epochs)) in enumerate(zip(points, lengths)):
        model = RunModel(stack.best[k], class_counts=counts).to(device)
        records = [{"epoch": r["epoch"], "step": r["step"], **{f"val_{m}": r[log_key(m, point.name)] for m in SUMMARY_KEYS}}
                   for r in result.history if r["epoch"] < epochs and log_key(SUMMARY_KEYS[0], point.name) in r]
        write_point_run(point.cfg, model, records, features_record, counts, stack.best_record(k), epochs, steps,
                        train.in_ram, val, eval_batch, device, dataset=train_cache.attrs.get("dataset"))


def _loop_optim(optim):
    """The loop's own settings: the group's shared ones; model selection is each head's (``HeadStack.keep_best``)."""
    return dataclasses.replace(optim, select=None)


def _start_group(folder: Path, points: list[Point]) -> bool:
    """Write the group's point configs, or check them against an interrupted group's; True: resume it."""
    configs = {p.name: to_dict(p.cfg) for p in points}
    saved = folder / GROUP_FILE
    if (folder / LAST_FILE).is_file():
        if json.loads(saved.read_text()) != json.loads(json.dumps(configs)):
            raise LtclipError(f"--resume: {folder} was trained for other points; resume with the same options or another --out")
        return True
    folder.mkdir(parents=True, exist_ok=True)
    save_json(saved, configs)
    return False


@torch.inference_mode()
def _validate_stack(stack: HeadStack, val: FeatureInputs, counts, batch_size: int, device) -> dict:
    """Every head's validation summary, as ``val_<metric>/<point>`` keys of the log record."""
    k = len(stack.heads)
    stats = ValidationStats(len(counts), heads=k)
    for x, y, _ in val.batches(np.arange(val.cache.num_rows), batch_size):
        b, v = x.shape[:2]
        logits = stack(x.flatten(0, 1).to(device)).float().view(b, v, -1).cpu().numpy()
        stats.add(average_views(logits).reshape(b, k, -1), y)
    return {f"{m}/{name}": value for s, name in zip(stats.summaries(counts), stack.names) for m, value in s.items()}


def write_point_run(cfg, model: RunModel, records: list[dict], features_record: dict, counts, best: dict | None,
                    epochs: int, steps: int, in_ram: bool, val: FeatureInputs, eval_batch: int, device, dataset) -> None:
    """A batched point as the run train-head writes: config, log, ``model.pt`` and ``run.json`` last."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / CONFIG_FILE, to_dict(cfg))
    (out / LOG_FILE).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    tau, extra = None, {}
    if cfg.posthoc_la:
        tau, extra["posthoc_tau_table"] = posthoc_tau(model, val, counts, eval_batch, device, cfg.val_split)
    write_run(out, "head", model_payload(model.head, tau=tau), features_record, counts, method=method_record(cfg.method, tau),
              best=best, dataset=dataset, epochs=epochs, steps=steps, inputs_in_ram=in_ram,
              processes=1, **extra)
