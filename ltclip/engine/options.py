"""The typed arguments of :func:`ltclip.engine.fit` besides the model, task, rows and :class:`OptimConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..core.distributed import DistContext
from ..core.progress import Progress

if TYPE_CHECKING:
    from ..config import OptimConfig


@dataclass(frozen=True)
class ParamGroups:
    """Submodules optimized their own way (:func:`create_optimizer`).

    ``lrs`` maps submodules to their own peak learning rates; ``parts`` maps them to an
    :class:`OptimConfig` of their own instead: each part trains on the same batches with its own lr,
    weight decay, momentum, schedule, warm-up and length (``epochs``/``steps``) and stops updating at
    its end; the loop runs until the longest part ends, with its own config's batch size, sampler,
    seed, optimizer and precision. ``no_decay`` names parameters kept out of weight decay.
    """

    lrs: dict[str, float] | None = None
    parts: dict[str, OptimConfig] | None = None
    no_decay: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunEnv:
    """Where a fit runs and what it leaves: folder, processes, device and reporting.

    With ``out`` rank 0 writes ``train_log.jsonl``, ``last.pt`` and ``best.pt`` there, and
    ``resume=True`` continues from ``last.pt``; without it nothing is written and the best weights
    stay in memory. ``progress`` shows each epoch, ``on_record`` receives every log record and
    ``tensorboard`` adds TensorBoard scalars. ``epoch_checkpoint_s`` skips an epoch's ``last.pt``
    when the previous one is more recent than that many seconds (the last epoch's is always written;
    ``checkpoint_every`` still applies): for single-process runs of many sub-second epochs.
    ``block_order=(block_rows, pool_blocks)`` regroups each epoch's draws
    (:class:`~ltclip.data.samplers.BlockShuffledSampler`): the same rows, read from a slow disk in long runs.
    """

    out: Path | None = None
    resume: bool = False
    device: torch.device | str = "cpu"
    ctx: DistContext = DistContext()
    progress: Progress | None = None
    on_record: Callable[[dict], None] | None = None
    tensorboard: bool = False
    epoch_checkpoint_s: float = 0.0
    block_order: tuple[int, int] | None = None
