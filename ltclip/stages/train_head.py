"""``ltclip train-head``: train a head on cached features (stage 1), or a second stage on a run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_json, save_torch
from ..config import TrainHeadConfig, from_dict, provenance, to_dict
from ..data.feature_batches import FeatureInputs, parse_size
from ..data.samplers import create_sampler
from ..distributed import DistContext, resolve_device
from ..errors import LtclipError
from ..losses import compute_loss, get_loss, parse_loss_opts
from ..metrics import average_views, evaluate
from ..progress import Progress
from ..runs import MODEL_FILE, RUN_FILE, RunModel, cache_fingerprint, load_run, model_payload
from ..store import FeatureCache, load_text_embeddings

log = logging.getLogger(__name__)

LAST_FILE = "last.pt"
LOG_FILE = "train_log.jsonl"
OPTIMIZERS = ("adamw", "sgd")
NAN_CHECK_EVERY = 25  # steps between checks that the loss is finite
SCHEDULES = ("cosine", "step", "constant")


# ------------------------------------------------------------------ set-up helpers
def _open_split(features: Path, split: str, required: bool = True) -> FeatureCache | None:
    path = features / f"{split}.h5"
    if not path.is_file():
        if required:
            raise LtclipError(f"--features {features}: no {split}.h5; run `ltclip extract --splits {split}` first")
        return None
    return FeatureCache(path)


def _text_embeds(features: Path, num_classes: int):
    path = features / "text.h5"
    if not path.is_file():
        return None
    text = load_text_embeddings(path)
    if len(text.classnames) != num_classes:
        raise LtclipError(f"{path}: {len(text.classnames)} classes but the train cache has {num_classes}; re-extract")
    return torch.from_numpy(text.embeds)


def _optimizer(cfg: TrainHeadConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise LtclipError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 0, step decay (×0.1 at 60%/80%), or constant."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** ((t >= 0.6) + (t >= 0.8))
    return 1.0


def _check_options(cfg: TrainHeadConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise LtclipError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise LtclipError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or (cfg.steps is not None and cfg.steps < 1):
        raise LtclipError("--epochs, --steps and --batch-size must be >= 1")
    if cfg.lr <= 0:
        raise LtclipError(f"--lr {cfg.lr}: must be positive")
    if cfg.two_stage and not cfg.from_run:
        raise LtclipError("--two-stage needs --from RUN (the finished first stage)")
    get_loss(cfg.loss)


def _validation(model: RunModel, val: FeatureInputs | None, counts: np.ndarray, batch_size: int, device) -> dict | None:
    if val is None:
        return None
    logits = average_views(model.predict(val, batch_size, device))
    return evaluate(logits, val.labels, counts)


def _summary(metrics: dict | None) -> dict:
    keys = ("top1", "balanced_accuracy", "many", "medium", "few", "nll", "ece")
    return {} if metrics is None else {f"val_{k}": metrics[k] for k in keys}


def _prepare_out(out: Path, resume: bool, cfg_dict: dict) -> None:
    """A new run needs an empty folder; ``--resume`` needs the same config as the interrupted run."""
    config = out / "config.json"
    if resume:
        if not (out / LAST_FILE).is_file():
            raise LtclipError(f"--resume: {out} holds no interrupted run ({LAST_FILE} missing); drop --resume")
        saved = json.loads(config.read_text())
        cfg_dict = json.loads(json.dumps(cfg_dict))  # compare as stored (tuples become lists)
        diff = sorted(k for k in set(saved) | set(cfg_dict) if saved.get(k) != cfg_dict.get(k))
        if diff:
            raise LtclipError(f"--resume: options differ from the interrupted run in {', '.join(diff)}; resume with the same options")
        return
    if (out / RUN_FILE).exists() or (out / LAST_FILE).exists():
        raise LtclipError(f"--out {out} already holds a run; pass --resume to continue it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    save_json(config, cfg_dict)


def _check_finite(losses: list, epoch: int, step: int, out: Path) -> None:
    """Stop at a NaN/inf loss; ``last.pt`` still holds the last good epoch (no later state is saved)."""
    recent = torch.stack(losses[-NAN_CHECK_EVERY:])
    if not torch.isfinite(recent).all():
        kept = f"{out / LAST_FILE} keeps the last good epoch" if (out / LAST_FILE).exists() else "no epoch finished"
        raise LtclipError(
            f"loss became {recent[~torch.isfinite(recent)][0].item()} in epoch {epoch + 1} (by step {step}); {kept}: "
            "lower --lr or set --grad-clip", exit_code=1,
        )


def _epoch_line(epoch: int, epochs: int, record: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    line = f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}" if record["loss"] is not None else f"epoch {epoch + 1}/{epochs}"
    if "val_balanced_accuracy" in record:
        line += (f", val balanced acc {fmt(record['val_balanced_accuracy'])}% (many {fmt(record['val_many'])} / "
                 f"medium {fmt(record['val_medium'])} / few {fmt(record['val_few'])})")
    return line


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_log(path: Path, last_epoch: int) -> None:
    """Drop log lines of epochs after the checkpoint a resumed run continues from."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= last_epoch]
        path.write_text("".join(line + "\n" for line in keep))


def _finish(out: Path, features: Path, counts: np.ndarray, payload: dict, method: dict, best: dict | None, extra: dict) -> dict:
    """Write ``model.pt`` and then ``run.json`` (whose presence marks the run finished)."""
    save_torch(out / MODEL_FILE, payload)
    info = {
        "features": {"dir": str(features.resolve()), "train_sha256": cache_fingerprint(features / "train.h5")},
        "num_classes": int(len(counts)),
        "class_counts": counts.tolist(),
        "method": {**method, "posthoc_la": payload.get("tau")},
        "best": best,
        "provenance": provenance(),
        **extra,
    }
    save_json(out / RUN_FILE, info)
    return info


def _posthoc_tau(model: RunModel, val: FeatureInputs | None, counts, batch_size, device) -> tuple[float, list]:
    from ..two_stage import posthoc_logit_adjustment

    if val is None:
        raise LtclipError("--posthoc-la chooses tau on the val split, but the cache has none; extract --splits val")
    logits = average_views(model.predict(val, batch_size, device))
    tau, table = posthoc_logit_adjustment(logits, val.labels, counts)
    return float(tau), table


# ------------------------------------------------------------------ stage 1
def run_train_head(cfg: TrainHeadConfig, progress: Progress | None = None, resume: bool = False) -> dict:
    """Train (or resume) a head; ``cfg.from_run`` switches to the second stage on a finished run."""
    progress = progress or Progress()
    _check_options(cfg)
    if cfg.from_run:
        return _second_stage(cfg, progress)
    from ..models.heads import create_head, parse_head_opts

    out, features = Path(cfg.out), Path(cfg.features)
    loss_opts = parse_loss_opts(cfg.loss, cfg.loss_opts)
    head_opts = parse_head_opts(cfg.head, cfg.head_opts)
    device = resolve_device(cfg.device, DistContext())
    train_cache = _open_split(features, "train")
    val_cache = _open_split(features, cfg.val_split, required=False)
    counts = train_cache.class_counts()
    torch.manual_seed(cfg.seed)
    head = create_head(
        cfg.head, num_classes=train_cache.num_classes, embed_dim=train_cache.embed_dim, token_shape=train_cache.token_shape,
        text_embeds=_text_embeds(features, train_cache.num_classes) if cfg.head == "text-init" else None, **head_opts,
    ).to(device)
    max_ram = parse_size(cfg.max_ram)
    train = FeatureInputs(train_cache, head.input, max_ram)
    val = FeatureInputs(val_cache, head.input, max_ram) if val_cache is not None else None
    where = "in RAM" if train.in_ram else f"streamed from disk (larger than --max-ram {train.max_ram / 2**30:.1f} GiB)"
    progress.log(f"training inputs: {head.input} of {train_cache.num_rows:,} rows, {train.nbytes / 2**30:.2f} GiB, {where}")
    steps_per_epoch = math.ceil(len(train.labels) / cfg.batch_size)  # an epoch draws as many rows as there are
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    sampler = create_sampler(cfg.sampler, train.labels, train_cache.num_classes, seed=cfg.seed, total_epochs=epochs)
    optimizer = _optimizer(cfg, [p for p in head.parameters() if p.requires_grad])
    warmup = int(round(cfg.warmup * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))
    model = RunModel(head, class_counts=counts).to(device)
    counts_t = torch.as_tensor(counts, dtype=torch.float32, device=device)

    _prepare_out(out, resume, to_dict(cfg))
    start_epoch, step, best = 0, 0, None
    if resume:
        state = torch.load(out / LAST_FILE, map_location="cpu", weights_only=False)
        head.load_state_dict(state["head"]["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best"]
        progress.log(f"resuming {out} after epoch {state['epoch'] + 1} of {epochs}")
    _truncate_log(out / LOG_FILE, start_epoch - 1)

    for epoch in range(start_epoch, epochs):
        head.train()
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
        view_of = np.random.default_rng((cfg.seed, epoch, 1)).integers(0, train.views, len(order))
        losses = []
        with progress.task(f"epoch {epoch + 1}/{epochs}", min(steps_per_epoch, total_steps - step), "step") as advance:
            for x, y, _ in train.batches(order, cfg.batch_size, view_of):
                if step >= total_steps:
                    break
                logits = head(x.to(device, non_blocking=True))
                loss = compute_loss(cfg.loss, logits, y.to(device), counts_t, epoch=epoch, total_epochs=epochs, **loss_opts)
                losses.append(loss.detach())
                if len(losses) % NAN_CHECK_EVERY == 0:  # a host sync, so not at every step on a GPU
                    _check_finite(losses, epoch, step, out)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                advance(1)
        _check_finite(losses, epoch, step, out)
        metrics = _validation(model, val, counts, cfg.batch_size * 2, device)
        record = {"epoch": epoch, "step": step, "loss": torch.stack(losses).mean().item() if losses else None,
                  "lr": scheduler.get_last_lr()[0], **_summary(metrics)}
        _append_log(out / LOG_FILE, record)
        improved = metrics is not None and (best is None or metrics["balanced_accuracy"] > best["val_balanced_accuracy"])
        if improved:
            best = {"epoch": epoch, **_summary(metrics)}
            save_torch(out / "best.pt", model_payload(head))
        save_torch(out / LAST_FILE, {
            "head": model_payload(head)["head"], "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), "epoch": epoch, "step": step, "best": best,
        })
        progress.log(_epoch_line(epoch, epochs, record))

    if best is not None:  # model selection on val: the best epoch's weights
        head.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=False)["head"]["state_dict"])
    tau, extra = None, {}
    if cfg.posthoc_la:
        tau, extra["posthoc_tau_table"] = _posthoc_tau(model, val, counts, cfg.batch_size * 2, device)
        progress.log(f"post-hoc logit adjustment: tau={tau:g} (chosen on {cfg.val_split})")
    method = {"head": cfg.head, "head_opts": list(cfg.head_opts), "loss": cfg.loss, "loss_opts": list(cfg.loss_opts),
              "sampler": cfg.sampler, "two_stage": None}
    info = _finish(out, features, counts, model_payload(head, tau=tau), method, best,
                   {"dataset": train_cache.attrs.get("dataset"), "epochs": epochs, "steps": step,
                    "inputs_in_ram": train.in_ram, **extra})
    return {"out": str(out), "best": best, "tau": tau, "info": info}


# ------------------------------------------------------------------ stage 2
def _features_of(model: RunModel, inputs: FeatureInputs, batch_size: int, device) -> tuple[torch.Tensor, np.ndarray]:
    """Penultimate features of every row and view, flattened: ``[N·V, F]`` and labels repeated."""
    zs = []
    with torch.inference_mode():
        for x, _, _ in inputs.batches(np.arange(inputs.cache.num_rows), batch_size):
            zs.append(model.head.features(x.flatten(0, 1).to(device)).float().cpu())
    return torch.cat(zs), np.repeat(inputs.labels, inputs.views)


def _second_stage(cfg: TrainHeadConfig, progress: Progress) -> dict:
    """cRT / LWS / tau-norm / DisAlign / MARC / NCM and post-hoc logit adjustment on a finished run."""
    from ..two_stage import fit_two_stage

    if not cfg.two_stage and not cfg.posthoc_la:
        raise LtclipError("--from RUN needs --two-stage METHOD and/or --posthoc-la")
    device = resolve_device(cfg.device, DistContext())
    stage1 = load_run(cfg.from_run, device=device)
    features = Path(cfg.features) if cfg.features else stage1.features
    if features.resolve() != stage1.features.resolve():
        raise LtclipError(f"--features {features} differs from the first stage's {stage1.features}; omit --features")
    out = Path(cfg.out)
    _prepare_out(out, False, to_dict(cfg))
    counts = np.asarray(stage1.info["class_counts"])
    model = stage1.model
    head = model.head
    max_ram = parse_size(cfg.max_ram)
    val_cache = _open_split(features, cfg.val_split, required=False)
    val = FeatureInputs(val_cache, head.input, max_ram) if val_cache is not None else None
    calibrated, ts_log = None, []
    if cfg.two_stage:
        from ..two_stage import parse_two_stage_opts

        opts = parse_two_stage_opts(cfg.two_stage, cfg.two_stage_opts)
        train = FeatureInputs(_open_split(features, "train"), head.input, max_ram)
        z_train, y_train = _features_of(model, train, cfg.batch_size * 2, device)
        z_val, y_val = _features_of(model, val, cfg.batch_size * 2, device) if val is not None else (None, None)

        def record(entry: dict):
            ts_log.append(entry)
            _append_log(out / LOG_FILE, {"stage": 2, **entry})

        with progress.task(f"{cfg.two_stage} on {len(y_train):,} cached features", 1, "fit") as advance:
            calibrated = fit_two_stage(
                cfg.two_stage, classifier=head.classifier, z_train=z_train, y_train=y_train, class_counts=counts,
                z_val=z_val, y_val=y_val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                weight_decay=cfg.weight_decay, seed=cfg.seed, device=device, log=record, **opts,
            )
            advance(1)
        model = RunModel(head, calibrated, None, counts).to(device)
    tau, extra = None, {}
    if cfg.posthoc_la:
        tau, extra["posthoc_tau_table"] = _posthoc_tau(model, val, counts, cfg.batch_size * 2, device)
        model.tau = tau
        progress.log(f"post-hoc logit adjustment: tau={tau:g} (chosen on {cfg.val_split})")
    best = {"epoch": None, **_summary(_validation(model, val, counts, cfg.batch_size * 2, device))} if val is not None else None
    method = {**stage1.info["method"], "two_stage": cfg.two_stage}
    info = _finish(out, features, counts, model_payload(head, calibrated, tau), method, best,
                   {"dataset": stage1.info.get("dataset"), "stage1": str(Path(cfg.from_run).resolve()), **extra})
    return {"out": str(out), "best": best, "tau": tau, "info": info}


def load_train_config(path: str | Path) -> TrainHeadConfig:
    """A run's saved ``config.json`` as a config (the same file reruns the same experiment)."""
    return from_dict(TrainHeadConfig, json.loads(Path(path).read_text()))
