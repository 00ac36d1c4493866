"""Where computation runs: the process group torchrun describes, the device, and autocast precision."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str, ctx: DistContext) -> torch.device:
    """``auto`` → ``cuda`` when CUDA is available, else CPU; ``cuda`` → the rank's GPU; ``cuda:N`` → GPU N."""
    from .errors import LtclipError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    head, colon, index = device.partition(":")
    if device != "cpu" and (head != "cuda" or (colon and not index.isdigit())):
        raise LtclipError(f"--device {device!r}: choose one of auto, cpu, cuda, cuda:N")
    if head == "cuda":
        if not torch.cuda.is_available():
            raise LtclipError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
        if colon and int(index) >= torch.cuda.device_count():
            raise LtclipError(f"--device {device}: {torch.cuda.device_count()} CUDA device(s) visible, "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pass one of them")
        if not colon:
            device = f"cuda:{ctx.local_rank}"
    return torch.device(device)


def setup(device: str) -> tuple[DistContext, torch.device]:
    """The process group (under torchrun) and this process's device for ``--device``."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    ctx = init_distributed("cuda" if cuda else "cpu")
    return ctx, resolve_device(device, ctx)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def default_workers(ctx: DistContext, cap: int = 8) -> int:
    """DataLoader workers when none are asked for: this process's share of the CPUs, at most ``cap``."""
    return max(0, min(cap, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))))


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # besides fp32: no autocast


def device_precision(device: torch.device, precision: str) -> str:
    """``--precision`` on ``device``: ``amp`` is fp16 (with a GradScaler when training) on CUDA, as
    LIFT's ``prec: amp``, and fp32 elsewhere; the other values are themselves."""
    from .errors import LtclipError

    if precision not in ("fp32", "amp", *AUTOCAST_DTYPES):
        raise LtclipError(f"--precision {precision!r}: choose one of fp32, {', '.join(AUTOCAST_DTYPES)}, amp")
    if precision == "amp":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of ``--precision``: none for fp32, bf16 anywhere, fp16 on CUDA only."""
    from .errors import LtclipError

    precision = device_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise LtclipError("--precision fp16 needs a CUDA device; use fp32 or bf16 on a CPU")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
