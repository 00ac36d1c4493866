"""A sweep's points (the product of the grid over a base of train-head options) and the groups
they train in: stage-1 points that share everything that decides the batch stream and whose heads
stack (:data:`BATCHABLE_HEADS`) train together in one pass; every other point (second stages
included) trains alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import SecondStageConfig, TrainHeadConfig
from ..recipes.resolve import lengthened, run_config
from ..core.errors import LtclipError
from ..data.samplers import class_probabilities
from ..engine import run_length, steps_per_epoch
from ..stages.common import open_split
from ..artifacts.workspace import slug
from .batched import BATCHABLE_HEADS

POINTS_DIR = "points"


@dataclass(frozen=True)
class Point:
    name: str
    options: dict  # this point's grid values
    values: dict  # the base option values with the point's
    cfg: TrainHeadConfig | SecondStageConfig  # its single-run config (out: SWEEPDIR/points/NAME)


def expand(base: dict, grid: list[tuple[str, list]], out: Path) -> list[Point]:
    """Every combination of the grid's values (the last key varying fastest), each over ``base``."""
    keys = [k for k, _ in grid]
    points = []
    for i, combo in enumerate(itertools.product(*(values for _, values in grid))):
        options = dict(zip(keys, combo))
        name = slug(f"{i:02d}-" + "-".join(f"{k}={_short(v)}" for k, v in options.items()))
        values = {**base, **options}
        try:
            cfg = point_config({**values, "out": str(out / POINTS_DIR / name)})
        except LtclipError as err:
            raise LtclipError(f"sweep point {name}: {err}") from None
        points.append(Point(name, options, values, cfg))
    return points


def point_config(values: dict) -> TrainHeadConfig | SecondStageConfig:
    """The config a train-head run of option ``values`` would train with (a stage-1 head's
    ``min_steps`` spent on its cache's rows, as :func:`~ltclip.stages.train_head.run_train_head` does)."""
    cfg = run_config(values)
    if isinstance(cfg, TrainHeadConfig) and cfg.min_steps:
        with open_split(Path(cfg.features), "train") as cache:
            cfg, _ = lengthened(cfg, cache.num_rows)
    return cfg


def _short(value) -> str:
    return "+".join(map(str, value)) if isinstance(value, (tuple, list)) else f"{value:g}" if isinstance(value, float) else str(value)


def plan_groups(points: list[Point]) -> list[list[Point]]:
    """The points in training groups, in grid order of their first point."""
    caches: dict[str, tuple[np.ndarray, int]] = {}

    def counts_rows(features: str):
        if features not in caches:
            with open_split(Path(features), "train") as cache:
                caches[features] = (cache.class_counts(), cache.num_rows)
        return caches[features]

    keys = [stream_key(p.cfg) for p in points]
    lengths: dict[tuple, int] = {}
    for p, key in zip(points, keys):
        if key is not None:
            counts, rows = counts_rows(p.cfg.features)
            lengths[key] = max(lengths.get(key, 0), run_length(p.cfg.optim, steps_per_epoch(p.cfg.optim, rows))[1])
    groups: dict[tuple, list[Point]] = {}
    for i, (p, key) in enumerate(zip(points, keys)):
        if key is not None:
            counts, rows = counts_rows(p.cfg.features)
            per_epoch = steps_per_epoch(p.cfg.optim, rows)
            total, epochs = run_length(p.cfg.optim, per_epoch)
            same_stream = total % per_epoch == 0 and _stream_ignores_length(p.cfg.method.sampler, counts, epochs, lengths[key])
            key = key + (None if same_stream else total,)
        groups.setdefault(key if key is not None else ("alone", i), []).append(p)
    return list(groups.values())


def stream_key(cfg: TrainHeadConfig | SecondStageConfig) -> tuple | None:
    """What a batched group's points must share (None: the point trains alone).

    The batch stream (cache, read order, sampler, batch size, accumulation, seed, precision), the one optimizer
    (kind, Nesterov), when the loop validates and checkpoints, and the run folder's settings. Per
    head: head and head options, loss and loss options, lr, weight decay, momentum, 1-D decay,
    schedule, warm-up, epochs/steps, --select and --posthoc-la. Gradient clipping takes one norm over
    every parameter, so a clipped point trains alone.
    """
    if not isinstance(cfg, TrainHeadConfig):  # a second stage trains alone
        return None
    o = cfg.optim
    if cfg.method.head not in BATCHABLE_HEADS or o.grad_clip > 0:
        return None
    return (cfg.features, cfg.val_split, cfg.max_ram, cfg.read_blocks, cfg.shuffle_pool, cfg.device, cfg.tensorboard, cfg.method.sampler,
            o.batch_size, o.accum, o.optimizer, o.nesterov, o.precision, o.seed, o.eval_every, o.checkpoint_every, o.eval_every_epochs)


def _stream_ignores_length(sampler: str, counts, epochs: int, longest: int) -> bool:
    """Whether the sampler draws epochs ``0 … epochs-1`` alike in a run of ``epochs`` and of ``longest``."""
    return all(np.array_equal(class_probabilities(sampler, counts, e, epochs), class_probabilities(sampler, counts, e, longest))
               for e in range(epochs))
