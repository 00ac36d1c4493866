"""Helpers of the stages that train on a feature cache (train-head and its second stages): opening
cache splits, the engine's training source over a cache, validation on a cache split (each process
its share of the rows), the run folder's start or resume, and post-hoc logit adjustment."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import atomic_path, save_json
from ..artifacts.feature_batches import FeatureInputs, default_max_ram, format_size, parse_size
from ..core.distributed import DistContext
from ..engine import LAST_FILE, ValidationStats
from ..core.errors import LtclipError
from ..evaluation.metrics import average_views
from ..artifacts.runs import CONFIG_FILE, INPUTS_FILE, MODEL_FILE, RunModel, cache_fingerprint
from ..artifacts.workspace import RUN_FILE
from ..config import flag, flatten
from ..data.manifests import file_sha256
from ..engine.log import LOG_FILE
from ..artifacts.store import FeatureCache, load_text_embeddings, shard_range

log = logging.getLogger(__name__)


def open_split(features: Path, split: str, required: bool = True) -> FeatureCache | None:
    path = features / f"{split}.h5"
    if not path.is_file():
        if required:
            raise LtclipError(f"--features {features}: no {split}.h5; run `ltclip extract --splits {split}` first")
        return None
    return FeatureCache(path)


def text_embeds(features: Path, num_classes: int, input: str = "embeds") -> torch.Tensor | None:
    """The cache's class text embeddings for a head reading ``input``: text.h5's ``embeds`` (the dataset's
    templates), or for ``pooled`` its ``pooled_embeds`` (LIFT's single template mapped back through
    ``proj.T``, written by ``extract --pooled``). None when text.h5 lacks them."""
    path = features / "text.h5"
    if not path.is_file():
        return None
    text = load_text_embeddings(path)
    if len(text.classnames) != num_classes:
        raise LtclipError(f"{path}: {len(text.classnames)} classes but the train cache has {num_classes}; re-extract")
    if input == "pooled":
        return None if text.pooled is None else torch.from_numpy(text.pooled)
    return torch.from_numpy(text.embeds)


def ram_budget(max_ram: str | None, ctx: DistContext) -> int | None:
    """``--max-ram`` in bytes for this process: the default (half the free memory) is shared by the processes."""
    given = parse_size(max_ram)
    if given is not None:
        return given
    free = default_max_ram()
    return None if free is None else free // ctx.world_size


class CacheSource:
    """The engine's training rows from a cache split: one stored view per drawn row.

    The view of the row at global position ``p`` of an epoch's order is drawn from
    ``default_rng((seed, epoch, 1))`` (the same on any number of processes). ``read_ahead``
    batches are read together (a block-shuffled order's pool in a few long reads).
    """

    def __init__(self, inputs: FeatureInputs, seed: int, read_ahead: int = 1):
        self.inputs, self.seed, self.labels, self.read_ahead = inputs, seed, inputs.labels, read_ahead

    def batches(self, order, batch_size, epoch, positions):
        views = np.random.default_rng((self.seed, epoch, 1)).integers(0, self.inputs.views, len(self.labels))
        for x, y, _ in self.inputs.batches(order, batch_size, views[positions], read_ahead=self.read_ahead):
            yield x, y


DEFAULT_SHUFFLE_POOL = 16


def block_order(read_blocks: int, shuffle_pool: int | None) -> tuple[int, int] | None:
    """``(rows per block, blocks per pool)`` of ``--read-blocks``/``--shuffle-pool``, None for the sampler's order."""
    if read_blocks < 0 or (shuffle_pool is not None and shuffle_pool < 1):
        raise LtclipError("--read-blocks must be >= 0 and --shuffle-pool >= 1")
    if not read_blocks:
        if shuffle_pool is not None:
            raise LtclipError("--shuffle-pool shapes a block-shuffled order: give --read-blocks ROWS too, or drop it")
        return None
    return read_blocks, DEFAULT_SHUFFLE_POOL if shuffle_pool is None else shuffle_pool


def read_ahead(order: tuple[int, int] | None, batch_size: int) -> int:
    """Batches read together: one shuffle pool's worth in a block-shuffled order, else 1."""
    return 1 if order is None else max(1, order[0] * order[1] // batch_size)


def check_pool_fits(order: tuple[int, int] | None, inputs: FeatureInputs) -> None:
    """A streamed pool is read whole, and up to three are held (read, queued, in use): within ``--max-ram``."""
    if order is None or inputs.in_ram:
        return
    rows = order[0] * order[1]
    pool = rows * inputs.nbytes // max(1, inputs.cache.num_rows)
    if 3 * pool > inputs.max_ram:
        raise LtclipError(f"--read-blocks {order[0]} --shuffle-pool {order[1]} reads {rows:,} rows ({format_size(pool)}) at a "
                          f"time and holds up to 3 such reads, above --max-ram {format_size(inputs.max_ram)}; "
                          "use smaller blocks or a smaller pool")


def validate_on_cache(model: RunModel, inputs: FeatureInputs, counts, batch_size: int, device, ctx: DistContext) -> dict:
    """Validation summary of ``model`` on a cache split, each process scoring its contiguous share."""
    start, stop = shard_range(inputs.cache.num_rows, ctx.rank, ctx.world_size)
    rows = np.arange(start, stop)
    stats = ValidationStats(len(counts))
    if len(rows):
        stats.add(average_views(model.predict(inputs, batch_size, device, rows=rows)), inputs.labels[rows])
    stats.all_reduce(ctx)
    return stats.summary(counts)


def start_run(out: Path, resume: bool, cfg_dict: dict, ctx: DistContext, inputs: dict[str, str] | None = None) -> None:
    """A new run needs a folder without a run, and records its options and the fingerprints of its
    input files (:func:`run_inputs`, plus ``inputs``: file → fingerprint); ``--resume`` needs the
    interrupted run's options and inputs, unchanged (:func:`check_resume`)."""
    inputs = {**run_inputs(cfg_dict), **(inputs or {})}
    if resume:
        check_resume(out, cfg_dict, inputs, ctx)
        return
    if (out / RUN_FILE).exists() or (out / LAST_FILE).exists():
        raise LtclipError(f"--out {out} already holds a run; pass --resume to continue it or choose another folder")
    ctx.barrier()  # every process has looked before rank 0 writes
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            save_json(out / CONFIG_FILE, cfg_dict)
            save_json(out / INPUTS_FILE, inputs)
        except OSError as err:
            raise LtclipError(f"--out {out}: cannot write ({err.strerror}); choose a writable folder") from None
    ctx.barrier()


def run_inputs(cfg_dict: dict) -> dict[str, str]:
    """Fingerprints of the files a run reads that its options name: the cache splits it trains and
    selects on (``features``), a second stage's first-stage ``model.pt`` (``from_run``)."""
    found = {}
    if cfg_dict.get("features"):
        for split in dict.fromkeys(("train", cfg_dict.get("val_split") or "train")):
            path = Path(cfg_dict["features"]) / f"{split}.h5"
            if path.is_file():
                found[str(path)] = cache_fingerprint(path)
    if cfg_dict.get("from_run"):
        path = Path(cfg_dict["from_run"]) / MODEL_FILE
        if path.is_file():
            found[str(path)] = file_sha256(path)
    return found


def check_resume(out: Path, cfg_dict: dict, inputs: dict[str, str], ctx: DistContext) -> None:
    """Refuse to resume with other options or changed inputs, each named; a torn last line of the
    log (a kill mid-write) is dropped, with a warning, once nothing else refuses."""
    if not (out / LAST_FILE).is_file():
        raise LtclipError(f"--resume: {out} holds no interrupted run ({LAST_FILE} missing); drop --resume")
    saved = _run_json(out / CONFIG_FILE, "the run's options are lost")
    now = json.loads(json.dumps(cfg_dict, default=str))  # compare as stored (tuples become lists)
    old_flat, new_flat = flatten(saved), flatten(now)
    diff = [f"{flag(k)} {_shown(old_flat.get(k))} → {_shown(new_flat.get(k))}"
            for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k) != new_flat.get(k)]
    if diff:
        raise LtclipError(f"--resume: options differ from the interrupted run: {', '.join(diff)}; resume with the same options")
    if (out / INPUTS_FILE).exists():  # runs started before ltclip recorded their inputs have none
        recorded = _run_json(out / INPUTS_FILE, "the run's input fingerprints are lost")
        for name, fingerprint in recorded.items():
            if inputs.get(name) != fingerprint:
                now_is = f"now {inputs[name][:12]}" if name in inputs else "now missing"
                raise LtclipError(f"--resume: {name} changed since the interrupted run started (fingerprint {str(fingerprint)[:12]}, "
                                  f"{now_is}); restore it, or start a new run in another --out")
    drop_torn_log_line(out / LOG_FILE, write=ctx.is_main)


def _run_json(path: Path, lost: str) -> dict:
    """A JSON object the run folder holds; anything else is a one-line refusal."""
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):  # missing, not JSON, or not UTF-8
        data = None
    if not isinstance(data, dict):
        raise LtclipError(f"--resume: {path} is missing or damaged (not a JSON object): {lost}; restore the file, "
                          "or start the run again in another --out")
    return data


def _shown(value) -> str:
    """An option's value as typed on the command line (``depth=2`` for a method's options)."""
    if isinstance(value, dict):
        return ",".join(f"{k}={_shown(v)}" for k, v in sorted(value.items())) or "(defaults)"
    if isinstance(value, list):
        return " ".join(map(_shown, value)) or "(none)"
    if value is None or isinstance(value, bool):
        return {None: "(unset)", True: "true", False: "false"}[value]
    return str(value)


def drop_torn_log_line(path: Path, write: bool = True) -> None:
    """``train_log.jsonl`` without a last line a kill tore mid-write (warned); a damaged line that
    is not that one is a one-line refusal. ``write``: rewrite the file (rank 0 only)."""
    if not path.is_file():
        return
    *lines, tail = path.read_bytes().split(b"\n")  # tail: what follows the last newline, a torn write
    for number, line in enumerate(lines, 1):
        if line.strip() and not _is_record(line):
            raise LtclipError(f"--resume: {path} line {number} is damaged (not a log record); delete that line, "
                              "or start the run again in another --out")
    if tail.strip() and not _is_record(tail):
        log.warning("%s: dropped its last line, torn when the run was killed while writing it", path)
        if write:
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"".join(line + b"\n" for line in lines))


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("step"), int)


def posthoc_tau(model: RunModel, val: FeatureInputs | None, counts, batch_size: int, device, val_split: str) -> tuple[float, list]:
    """Post-hoc logit adjustment's τ, chosen on the whole val split (every process alike)."""
    from ..methods.second_stage import posthoc_logit_adjustment

    if val is None:
        raise LtclipError(f"--posthoc-la chooses tau on the {val_split} split, but the cache has none; extract --splits {val_split}")
    logits = average_views(model.predict(val, batch_size, device))
    tau, table = posthoc_logit_adjustment(logits, val.labels, counts)
    return float(tau), table
