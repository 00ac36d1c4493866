"""The training engine (ltclip.engine): validation statistics, gradient accumulation, schedules,
step-granular resume, the NaN guard, precision, the optimizer factory, model selection and logs.

Every problem is a small in-memory Gaussian long-tailed set (a few hundred rows), so each fit
takes milliseconds; numbers are checked against computations written out here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import ltclip.engine.hooks as hooks
import ltclip.engine.loop as loop
from ltclip.config import OptimConfig
from ltclip.data.gaussian import gaussian_lt
from ltclip.data.samplers import create_sampler
from ltclip.engine import (
    BEST_FILE, LAST_FILE, LOG_FILE, SUMMARY_KEYS, RunEnv, ValidationStats, check_optim, create_optimizer, fit,
)
from ltclip.methods.task import Task
from ltclip.engine.checkpoint import load_checkpoint
from ltclip.core.errors import LtclipError
from ltclip.evaluation.metrics import evaluate
from ltclip.models.heads import HeadInputs, create_head
from ltclip.methods.second_stage.fit import TensorSource

# 203 training rows: many (> 100), two medium, two few (< 20) classes. Batch 64 leaves an 11-row last step.
COUNTS = [110, 45, 25, 15, 8]
C, DIM = len(COUNTS), 12


def problem(separation: float = 3.0, seed: int = 0):
    """``(x_train, y_train, x_val, y_val)`` as tensors: Gaussian classes around means on a sphere."""
    _, splits = gaussian_lt(seed, COUNTS, DIM, separation, {"val": 20})
    (x, y), (xv, yv) = splits["train"], splits["val"]
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xv), torch.from_numpy(yv)


X, Y, XV, YV = problem()
assert len(Y) == 203


def new_head(name: str = "linear", seed: int = 0, **opts) -> nn.Module:
    """A head of ``name``; linear and MLP heads without a logit scale (the engine's learning rates and
    tolerances here are set for plain logits)."""
    torch.manual_seed(seed)
    if name in ("linear", "mlp"):
        opts.setdefault("scale", 0.0)
    return create_head(name, HeadInputs(C, DIM), **opts)


def cfg_of(**kw) -> OptimConfig:
    base = dict(epochs=3, batch_size=64, optimizer="adamw", lr=1e-2, weight_decay=1e-4, seed=0)
    return OptimConfig(**{**base, **kw})


def train(cfg: OptimConfig, model: nn.Module | None = None, source=None, sampler="instance", validate=None, **env):
    """``fit`` on the Gaussian problem; ``env`` are :class:`RunEnv` fields."""
    model = model if model is not None else new_head()
    result = fit(model, Task("ce", {}, COUNTS), source if source is not None else TensorSource(X, Y), cfg,
                 num_classes=C, sampler=sampler, validate=validate, env=RunEnv(**env))
    return model, result


def val_summary(model: nn.Module) -> dict:
    stats = ValidationStats(C)
    with torch.no_grad():
        stats.add(model(XV), YV)
    return stats.summary(COUNTS)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], rtol=0, **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def epoch_records(history: list) -> list:
    return [r for r in history if "loss" in r]


# ---------------------------------------------------------------- 1. ValidationStats


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("absent", [(), (4,), (6, 7, 8), (0, 1, 2)], ids=["all", "one-class", "no-few", "no-many"])
def test_validation_stats_in_chunks_equal_evaluate(dtype, absent):
    """Classes in ``absent`` have training rows but no validation rows (a whole shot group for two cases)."""
    rng = np.random.default_rng(len(absent) + 10 * (dtype is np.float64))
    c, n = 9, 500
    train_counts = np.array([300, 150, 101, 100, 60, 20, 19, 5, 1])  # many 0-2, medium 3-5, few 6-8
    classes = np.setdiff1d(np.arange(c), absent)
    labels = rng.choice(classes, n)
    logits = (rng.standard_normal((n, c)) * 3).astype(dtype)
    logits[np.arange(n) % 3 == 0, labels[np.arange(n) % 3 == 0]] += 4  # a third is confidently right
    logits[:7] = logits[7]  # a few exact duplicates
    logits[10:60] = np.round(logits[10:60] / 3)  # rows with tied scores (argmax takes the lower class)

    stats = ValidationStats(c)
    cuts = [0, 1, 1, 37, 200, 201, 499, n]  # including empty chunks and a one-row chunk
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        part_x, part_y = logits[a:b], labels[a:b]
        if i % 2:  # tensors as well as arrays
            part_x, part_y = torch.from_numpy(part_x), torch.from_numpy(part_y)
        stats.add(part_x, part_y)
    got = stats.summary(train_counts)
    want = evaluate(logits, labels, train_counts)

    assert set(got) == set(SUMMARY_KEYS)
    for key in SUMMARY_KEYS:
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    group = {(6, 7, 8): "few", (0, 1, 2): "many"}.get(absent)
    if group:
        assert got[group] is None
    # a hand count of the headline numbers
    hit = logits.argmax(1) == labels
    assert got["top1"] == pytest.approx(hit.mean() * 100, rel=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(np.mean([hit[labels == j].mean() * 100 for j in classes]), rel=1e-12)
    medium = [hit[labels == j].mean() * 100 for j in (3, 4, 5) if j in classes]
    assert got["medium"] == pytest.approx(np.mean(medium), rel=1e-12)
    x = logits.astype(np.float64)
    top = x.max(1)
    nll = np.log(np.exp(x - top[:, None]).sum(1)) + top - x[np.arange(n), labels]
    assert got["nll"] == pytest.approx(nll.mean(), rel=1e-6)


def test_validation_stats_order_of_rows_does_not_matter():
    rng = np.random.default_rng(5)
    logits, labels = rng.standard_normal((300, C)).astype(np.float32), rng.integers(0, C, 300)
    whole, shuffled = ValidationStats(C), ValidationStats(C)
    whole.add(logits, labels)
    perm = rng.permutation(300)
    for chunk in np.array_split(perm, 7):
        shuffled.add(logits[chunk], labels[chunk])
    a, b = whole.summary(COUNTS), shuffled.summary(COUNTS)
    for key in SUMMARY_KEYS:
        assert a[key] == pytest.approx(b[key], rel=1e-9), key


# ---------------------------------------------------------------- 2. gradient accumulation


def reference_sgd(cfg: OptimConfig, model: nn.Module) -> tuple[dict, list]:
    """Plain mini-batch SGD written out: the engine's instance order, mean CE per step, ``w -= lr g``."""
    labels = Y.numpy()
    per_epoch = math.ceil(len(labels) / cfg.batch_size)
    sampler = create_sampler("instance", labels, C, seed=cfg.seed, total_epochs=cfg.epochs)
    losses = []
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        order = torch.as_tensor(np.fromiter(iter(sampler), dtype=np.int64))
        total, rows = 0.0, 0
        for s in range(per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= cfg.lr * p.grad
            total += loss.item() * len(idx)
            rows += len(idx)
        losses.append(total / rows)
    return model.state_dict(), losses


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_accumulation_matches_plain_sgd_written_out(head):
    cfg = cfg_of(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.5, schedule="constant")
    want, want_losses = reference_sgd(cfg, new_head(head))
    for accum in (1, 4, 8):  # the last step's 11 rows: one micro-batch of 16, or micro-batches of 8 and 3
        model, result = train(dataclasses.replace(cfg, accum=accum), new_head(head))
        assert result.steps == 3 * 4 and result.epochs == 3
        assert_same_weights(model.state_dict(), want, atol=1e-6)
        assert [r["loss"] for r in epoch_records(result.history)] == pytest.approx(want_losses, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulation_gives_the_same_training(optimizer):
    cfg = cfg_of(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2, epochs=4, warmup=0.5, grad_clip=1.0)
    runs = {accum: train(dataclasses.replace(cfg, accum=accum), new_head("mlp", hidden=16)) for accum in (1, 2, 4, 8)}
    (m1, r1) = runs[1]
    for accum in (2, 4, 8):
        m, r = runs[accum]
        assert r.steps == r1.steps == 16
        assert_same_weights(m.state_dict(), m1.state_dict(), atol=1e-6)
        losses = [x["loss"] for x in epoch_records(r.history)]
        assert losses == pytest.approx([x["loss"] for x in epoch_records(r1.history)], rel=1e-6)
    assert not torch.equal(m1.classifier.weight, new_head("mlp", hidden=16).classifier.weight)  # it did train


@pytest.mark.parametrize("batch_size, accum", [(64, 3), (10, 4), (7, 2)])
def test_batch_size_not_divisible_by_accum_is_refused(batch_size, accum):
    cfg = cfg_of(batch_size=batch_size, accum=accum)
    with pytest.raises(LtclipError) as err:
        check_optim(cfg)
    assert "--batch-size" in one_line(err)
    model = new_head()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LtclipError) as err:
        train(cfg, model)
    assert "--batch-size" in one_line(err)
    assert_same_weights(model.state_dict(), before)


# ---------------------------------------------------------------- 3. the schedule


@pytest.fixture
def used_lrs(monkeypatch):
    """The lr of the first parameter group at every optimizer step of the next fits."""
    lrs: list[float] = []
    real = loop.create_optimizer

    def recording(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(loop, "create_optimizer", recording)
    return lrs


def hand_lr(s: int, total: int, warmup: int, schedule: str, peak: float) -> float:
    if s < warmup:
        return peak * (s + 1) / warmup
    t = (s - warmup) / (total - warmup)
    if schedule == "cosine":
        return peak * (1 + math.cos(math.pi * t)) / 2
    if schedule == "step":
        return peak * (1.0 if t < 0.6 else 0.1 if t < 0.8 else 0.01)
    return peak


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup", [0.0, 0.5, 0.9, 1.25])  # 0, 2, round(3.6) = 4 and 5 steps
def test_lr_at_every_step_is_warmup_then_schedule(used_lrs, schedule, warmup):
    cfg = cfg_of(schedule=schedule, warmup=warmup, epochs=5, lr=0.02)  # 4 steps per epoch, 20 steps
    _, result = train(cfg)
    w = round(warmup * 4)
    assert result.steps == 20 and len(used_lrs) == 20
    assert used_lrs == pytest.approx([hand_lr(s, 20, w, schedule, 0.02) for s in range(20)], rel=1e-12, abs=1e-15)
    if warmup:
        assert used_lrs[0] == pytest.approx(0.02 / w) and used_lrs[w - 1] == pytest.approx(0.02)


def test_step_schedule_numbers(used_lrs):
    # 12 steps, 2 of warm-up: t = (s - 2) / 10 reaches 0.6 at s = 8 and 0.8 at s = 10
    train(cfg_of(schedule="step", warmup=0.5, epochs=3, lr=1.0))
    assert used_lrs == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01], rel=1e-12)


@pytest.mark.parametrize("steps, epochs", [(1, 1), (4, 1), (5, 2), (10, 3), (12, 3)])
def test_steps_stop_after_exactly_that_many_optimizer_steps(used_lrs, steps, epochs):
    cfg = cfg_of(steps=steps, epochs=99, schedule="cosine", warmup=0.5)
    _, result = train(cfg)
    assert result.steps == steps and len(used_lrs) == steps
    assert result.epochs == epochs == math.ceil(steps / 4)
    records = epoch_records(result.history)
    assert [r["epoch"] for r in records] == list(range(epochs))
    assert [r["step"] for r in records] == [min(4 * (e + 1), steps) for e in range(epochs)]
    # the schedule spans the ``steps`` (warm-up: 0.5 epoch = 2 steps)
    assert used_lrs == pytest.approx([hand_lr(s, steps, 2, "cosine", cfg.lr) for s in range(steps)], rel=1e-12)


def test_cosine_per_epoch_is_lifts_learning_rate_of_each_epoch(used_lrs):
    # LIFT: SGD + CosineAnnealingLR(T_max=epochs) stepped after each epoch: lr_e = peak (1 + cos(pi e / E)) / 2
    cfg = cfg_of(schedule="cosine", schedule_unit="epoch", epochs=5, lr=0.02)  # 4 steps per epoch
    train(cfg)
    hand = [0.02 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert used_lrs == pytest.approx([lr for lr in hand for _ in range(4)], rel=1e-12)
    # the same numbers from torch's own scheduler, stepped once per epoch
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    by_torch = []
    for _ in range(5):
        by_torch += [opt.param_groups[0]["lr"]] * 4
        opt.step()
        torch_sched.step()
    assert used_lrs == pytest.approx(by_torch, rel=1e-12)


def test_per_epoch_schedule_after_warmup_steps_at_epoch_starts(used_lrs):
    # 5 epochs of 4 steps, warm-up 1.5 epochs = 6 steps (per step); then the value of the epoch's first
    # step after warm-up: steps 6-7 take t = 0, epoch e >= 2 takes t = (4e - 6) / 14
    train(cfg_of(schedule="cosine", schedule_unit="epoch", warmup=1.5, epochs=5, lr=1.0))
    epoch_starts = [6, 6, 8, 8, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16]
    want = [(s + 1) / 6 for s in range(6)] + [hand_lr(s, 20, 6, "cosine", 1.0) for s in epoch_starts]
    assert used_lrs == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- 4. resume at step granularity


class KillAfter:
    """A TrainSource that raises KeyboardInterrupt when asked for batch ``k + 1`` (counted over the run)."""

    def __init__(self, source, k: int):
        self.source, self.labels, self.left = source, source.labels, k

    def batches(self, order, batch_size, epoch, positions):
        for batch in self.source.batches(order, batch_size, epoch, positions):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield batch


# batch 32 in 2 micro-batches of 16: 7 steps per epoch (the last of 11 rows, one micro-batch),
# 13 micro-batches per epoch, 4 epochs = 28 steps, 52 micro-batches
RESUME_CFG = dict(epochs=4, batch_size=32, accum=2, warmup=0.5, lr=2e-2, select="closeness")
KILLS = {
    7: "epoch 1, between the micro-batches of step 4",
    12: "epoch 1, before its last (partial) step",
    13: "right after the end of epoch 1",
    20: "mid epoch 2, mid step",
    26: "right after the end of epoch 2",
    45: "last epoch, mid step",
    51: "last epoch, before the final step",
}
TARGET_STEP = 14  # the end of epoch 2: the validation that model selection must pick


def closeness_validate(target: dict):
    """The real summary plus ``closeness``: minus the squared distance of the weights to ``target``
    (0 exactly, the maximum, only for bit-identical weights)."""

    def validate(model: nn.Module) -> dict:
        summary = val_summary(model)
        summary["closeness"] = -sum(float(((v.double() - target[k].double()) ** 2).sum())
                                    for k, v in model.state_dict().items())
        return summary

    return validate


def resume_run(cfg, out, validate, kill=None, resume=False, **kw):
    source = TensorSource(X, Y)
    model = new_head("mlp", hidden=16, dropout=0.3)
    return train(cfg, model, KillAfter(source, kill) if kill is not None else source, sampler="progressive", out=out,
                 resume=resume, validate=validate, **kw)


@pytest.fixture(scope="module")
def target_weights() -> dict:
    """The weights at TARGET_STEP of an uninterrupted run (validation does not change the training)."""
    seen = []

    def capture(model):
        seen.append(copy.deepcopy(model.state_dict()))
        return {"closeness": 0.0}

    _, result = resume_run(cfg_of(**RESUME_CFG), None, capture)
    return seen[[r["step"] for r in result.history].index(TARGET_STEP)]


@pytest.fixture(scope="module", params=[(1, 0), (3, 2)], ids=["ckpt-every-1", "ckpt-every-3-eval-every-2"])
def resume_reference(request, tmp_path_factory, target_weights):
    """An uninterrupted run: ``(cfg, out, validate, final weights, FitResult)``."""
    checkpoint_every, eval_every = request.param
    cfg = cfg_of(**RESUME_CFG, checkpoint_every=checkpoint_every, eval_every=eval_every)
    out = tmp_path_factory.mktemp("reference")
    validate = closeness_validate(target_weights)
    model, result = resume_run(cfg, out, validate)
    assert result.steps == 28 and result.epochs == 4
    return cfg, out, validate, model.state_dict(), result


def test_resume_reference_exercises_model_selection(resume_reference, target_weights):
    cfg, out, _, weights, result = resume_reference
    assert result.best["step"] == TARGET_STEP and result.best["epoch"] == 1 and result.best["val_closeness"] == 0
    assert_same_weights(weights, target_weights)
    assert_same_weights(weights, load_checkpoint(out / BEST_FILE)["model"])
    assert not torch.equal(weights["fc.weight"], load_checkpoint(out / LAST_FILE)["model"]["fc.weight"])
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert log == result.history
    assert [r["step"] for r in epoch_records(log)] == [7, 14, 21, 28]
    assert [r["step"] for r in log if "loss" not in r] == ([2, 4, 6, 8, 10, 12, 16, 18, 20, 22, 24, 26]
                                                           if cfg.eval_every else [])


@pytest.mark.parametrize("kill", list(KILLS), ids=list(KILLS.values()))
def test_resume_after_a_kill_ends_bit_identical(resume_reference, tmp_path, kill):
    cfg, ref_out, validate, ref_weights, ref = resume_reference
    with pytest.raises(KeyboardInterrupt):
        resume_run(cfg, tmp_path, validate, kill=kill)
    done = 7 * (kill // 13) + (kill % 13) // 2  # optimizer steps completed before the kill
    saved = load_checkpoint(tmp_path / LAST_FILE)["state"]
    assert saved["step"] == max(s for s in range(1, done + 1) if s % cfg.checkpoint_every == 0 or s % 7 == 0)
    assert (saved["epoch"], saved["epoch_steps"]) == divmod(saved["step"], 7)
    model, result = resume_run(cfg, tmp_path, validate, resume=True)
    assert_same_weights(model.state_dict(), ref_weights)
    for name in (LAST_FILE, BEST_FILE):
        assert_same_weights(load_checkpoint(tmp_path / name)["model"], load_checkpoint(ref_out / name)["model"])
    assert (tmp_path / LOG_FILE).read_text() == (ref_out / LOG_FILE).read_text()
    assert result.best == ref.best and result.history == ref.history
    assert (result.steps, result.epochs) == (ref.steps, ref.epochs)


def test_epoch_checkpoints_spaced_in_time_resume_from_the_step_checkpoints(resume_reference, tmp_path, monkeypatch):
    """``epoch_checkpoint_s``: epoch ends write ``last.pt`` only that often (the last always);
    ``checkpoint_every`` steps still apply, and a resume from them ends as the uninterrupted run."""
    cfg, ref_out, validate, ref_weights, ref = resume_reference
    written, real = [], hooks.save_checkpoint

    def counting(path, obj):
        if path.name == LAST_FILE:
            written.append(obj["state"]["step"])
        real(path, obj)

    monkeypatch.setattr(hooks, "save_checkpoint", counting)
    with pytest.raises(KeyboardInterrupt):
        resume_run(cfg, tmp_path, validate, kill=45, epoch_checkpoint_s=1e9)  # the last epoch, mid step
    every = cfg.checkpoint_every  # 24 steps were done; the epoch ends (7, 14, 21) wrote nothing
    assert written == [s for s in range(1, 25) if s % every == 0 and s % 7]
    written.clear()
    model, result = resume_run(cfg, tmp_path, validate, resume=True, epoch_checkpoint_s=1e9)
    assert written == [s for s in range(25, 28) if s % every == 0] + [28]
    assert_same_weights(model.state_dict(), ref_weights)
    assert (tmp_path / LOG_FILE).read_text() == (ref_out / LOG_FILE).read_text() and result.best == ref.best


def test_resume_after_two_kills(resume_reference, tmp_path):
    cfg, ref_out, validate, ref_weights, ref = resume_reference
    with pytest.raises(KeyboardInterrupt):
        resume_run(cfg, tmp_path, validate, kill=9)
    with pytest.raises(KeyboardInterrupt):
        resume_run(cfg, tmp_path, validate, kill=17, resume=True)
    model, result = resume_run(cfg, tmp_path, validate, resume=True)
    assert_same_weights(model.state_dict(), ref_weights)
    assert (tmp_path / LOG_FILE).read_text() == (ref_out / LOG_FILE).read_text()
    assert result.best == ref.best


def test_resume_of_a_finished_run_changes_nothing(resume_reference, tmp_path):
    cfg, ref_out, validate, ref_weights, ref = resume_reference
    resume_run(cfg, tmp_path, validate)
    model, result = resume_run(cfg, tmp_path, validate, resume=True)
    assert_same_weights(model.state_dict(), ref_weights)
    assert (tmp_path / LOG_FILE).read_text() == (ref_out / LOG_FILE).read_text()
    assert result.best == ref.best and result.steps == 28


@pytest.mark.parametrize("kill", [20, 45], ids=["mid epoch 2, mid step", "last epoch, mid step"])
def test_resume_with_a_per_epoch_schedule_ends_bit_identical(tmp_path, kill):
    cfg = cfg_of(**{**RESUME_CFG, "select": "last"}, schedule_unit="epoch", checkpoint_every=3)
    reference, ref = resume_run(cfg, tmp_path / "ref", val_summary)
    with pytest.raises(KeyboardInterrupt):
        resume_run(cfg, tmp_path / "run", val_summary, kill=kill)
    model, result = resume_run(cfg, tmp_path / "run", val_summary, resume=True)
    assert_same_weights(model.state_dict(), reference.state_dict())
    assert result.history == ref.history and result.best == ref.best


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    cfg = cfg_of(**RESUME_CFG, checkpoint_every=0)
    validate = closeness_validate(new_head("mlp", hidden=16).state_dict())
    with pytest.raises(KeyboardInterrupt):
        resume_run(cfg, tmp_path, validate, kill=5)  # killed before the first epoch end: nothing saved
    assert not (tmp_path / LAST_FILE).exists()
    with pytest.raises(LtclipError) as err:
        resume_run(cfg, tmp_path, validate, resume=True)
    assert LAST_FILE in one_line(err)


# ---------------------------------------------------------------- 5. the NaN guard


@pytest.mark.parametrize("checkpoint_every", [0, 1, 2])
@pytest.mark.parametrize("with_out", [True, False])
def test_nan_guard_stops_a_diverging_run(tmp_path, checkpoint_every, with_out):
    cfg = cfg_of(optimizer="sgd", lr=1e30, checkpoint_every=checkpoint_every, batch_size=16, epochs=3)
    with pytest.raises(LtclipError) as err:
        train(cfg, out=tmp_path if with_out else None)
    assert "loss became" in one_line(err) and err.value.exit_code == 1
    last = tmp_path / LAST_FILE
    if with_out and checkpoint_every == 1:
        assert last.exists()  # the step before the overflow was checkpointed
    if last.exists():
        saved = load_checkpoint(last)
        assert all(torch.isfinite(v).all() for v in saved["model"].values())
        assert f"keeps step {saved['state']['step']}" in str(err.value)
    else:
        assert "no checkpoint was written" in str(err.value)


def test_nan_guard_leaves_a_resumable_checkpoint(tmp_path):
    # with the overflow caught before last.pt is written, that file is a sane state to resume from
    cfg = cfg_of(optimizer="sgd", lr=1e30, checkpoint_every=1, batch_size=16)
    with pytest.raises(LtclipError):
        train(cfg, out=tmp_path)
    saved = load_checkpoint(tmp_path / LAST_FILE)
    model = new_head()
    model.load_state_dict(saved["model"])
    assert torch.isfinite(model(X)).all()


# ---------------------------------------------------------------- 6. precision


def test_bf16_on_cpu_trains():
    x, y, _, _ = problem(separation=6.0, seed=1)
    cfg = cfg_of(precision="bf16", epochs=6, lr=5e-2, schedule="constant")
    model, result = train(cfg, new_head("mlp", hidden=16), TensorSource(x, y))
    losses = [r["loss"] for r in epoch_records(result.history)]
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    fp32, _ = train(dataclasses.replace(cfg, precision="fp32"), new_head("mlp", hidden=16), TensorSource(x, y))
    gap = (fp32.fc.weight - model.fc.weight).abs().max().item()
    assert 1e-5 < gap < 0.5  # bf16 matmuls were used, and they train the same model up to rounding


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(LtclipError) as err:
        train(cfg_of(precision="fp16"), out=tmp_path)
    assert "fp16" in one_line(err)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("option, value", [
    ("precision", "fp8"), ("optimizer", "lamb"), ("schedule", "linear"), ("lr", 0.0), ("weight_decay", -1.0),
    ("warmup", -0.5), ("grad_clip", -1.0), ("batch_size", 0), ("accum", 0), ("epochs", 0), ("steps", 0),
    ("eval_every", -1), ("checkpoint_every", -1), ("schedule_unit", "iteration"),
])
def test_bad_options_are_refused_before_training(tmp_path, monkeypatch, option, value):
    cfg = dataclasses.replace(cfg_of(), **{option: value})
    with pytest.raises(LtclipError) as err:
        check_optim(cfg)
    message = one_line(err)
    if isinstance(value, str):
        assert repr(value) in message
    calls = []
    monkeypatch.setattr(Task, "__call__", lambda *a: calls.append(a))
    with pytest.raises(LtclipError):
        train(cfg, out=tmp_path)
    assert not calls and not any(tmp_path.iterdir())


def test_unknown_select_is_refused_before_training():
    with pytest.raises(LtclipError) as err:
        check_optim(cfg_of(select="bogus"))
    message = one_line(err)
    assert "--select 'bogus'" in message and "balanced_accuracy" in message and "last" in message
    for select in (*SUMMARY_KEYS, "last"):
        check_optim(cfg_of(select=select))


# ---------------------------------------------------------------- 7. the optimizer factory


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.embed.bias.requires_grad_(False)


def groups_of(optimizer) -> list[tuple[float, set]]:
    return sorted(((g["weight_decay"], {id(p) for p in g["params"]}) for g in optimizer.param_groups if g["params"]),
                  key=lambda g: g[0])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_without_decay_1d_norms_and_biases_do_not_decay(optimizer):
    m = Tiny()
    opt = create_optimizer(m, cfg_of(optimizer=optimizer, weight_decay=0.05, decay_1d=False))
    assert groups_of(opt) == [
        (0.0, {id(m.norm.weight), id(m.norm.bias), id(m.out.bias)}),
        (0.05, {id(m.embed.weight), id(m.out.weight)}),
    ]
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-2)


def test_with_decay_1d_every_trainable_parameter_decays():
    m = Tiny()
    opt = create_optimizer(m, cfg_of(weight_decay=0.05))
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert len(trainable) == 5
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups if g["params"])
    assert set().union(*(s for _, s in groups_of(opt))) == trainable
    assert isinstance(opt, torch.optim.AdamW)


@pytest.mark.parametrize("decay_1d", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_frozen_parameters_are_in_no_group(decay_1d, weight_decay):
    m = Tiny()
    opt = create_optimizer(m, cfg_of(decay_1d=decay_1d, weight_decay=weight_decay))
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in m.parameters() if p.requires_grad}
    assert not {id(m.frozen.weight), id(m.frozen.bias), id(m.embed.bias)} & set(grouped)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_and_nesterov(nesterov):
    opt = create_optimizer(Tiny(), cfg_of(optimizer="sgd", nesterov=nesterov, momentum=0.8, lr=0.3))
    assert type(opt) is torch.optim.SGD
    for g in opt.param_groups:
        assert g["nesterov"] is nesterov and g["momentum"] == 0.8 and g["lr"] == 0.3


def test_nesterov_update_matches_torch_formula():
    # one parameter, two steps of nesterov SGD done by hand: b = μb + g; p -= lr (g + μb)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = create_optimizer(model, cfg_of(optimizer="sgd", nesterov=True, momentum=0.5, lr=0.1, weight_decay=0.0))
    w, b = 1.0, 0.0
    for _ in range(2):
        opt.zero_grad()
        (model.weight.sum() ** 2).backward()  # g = 2 w
        opt.step()
        g = 2 * w
        b = 0.5 * b + g
        w -= 0.1 * (g + 0.5 * b)
    assert model.weight.item() == pytest.approx(w, rel=1e-6)


def test_nothing_trainable_is_one_line_error():
    m = Tiny().requires_grad_(False)
    with pytest.raises(LtclipError) as err:
        create_optimizer(m, cfg_of())
    assert "frozen" in one_line(err)
    with pytest.raises(LtclipError) as err:
        create_optimizer(m, cfg_of(decay_1d=False))
    one_line(err)


# ---------------------------------------------------------------- 8. model selection


class Scripted:
    """A validate callback returning scripted metrics and keeping a copy of the weights it saw."""

    def __init__(self, **script):
        self.script, self.seen = script, []

    def __call__(self, model):
        i = len(self.seen)
        self.seen.append(copy.deepcopy(model.state_dict()))
        return {**{k: float(v[i]) for k, v in self.script.items()}, "many": None}


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("select, want", [("balanced_accuracy", 1), ("top1", 0), ("nll", 0)])
def test_model_selection_loads_the_best_epoch(tmp_path, with_out, select, want):
    validate = Scripted(balanced_accuracy=[10, 30, 20], top1=[50, 10, 5], nll=[1.5, 3.0, 2.0])  # nll: lowest wins
    model, result = train(cfg_of(select=select), validate=validate, out=tmp_path if with_out else None)
    assert len(validate.seen) == 3
    assert_same_weights(model.state_dict(), validate.seen[want])
    assert not torch.equal(validate.seen[want]["classifier.weight"], validate.seen[2]["classifier.weight"])
    assert result.best["epoch"] == want and result.best["step"] == 4 * (want + 1)
    assert result.best[f"val_{select}"] == validate.script[select][want]
    assert result.best["val_many"] is None
    records = epoch_records(result.history)
    assert [r["val_balanced_accuracy"] for r in records] == [10, 30, 20]
    if with_out:
        assert_same_weights(load_checkpoint(tmp_path / BEST_FILE)["model"], validate.seen[want])
        assert_same_weights(load_checkpoint(tmp_path / LAST_FILE)["model"], validate.seen[2])


def test_model_selection_keeps_the_first_of_equal_scores():
    validate = Scripted(balanced_accuracy=[10, 30, 30])
    model, result = train(cfg_of(), validate=validate)
    assert result.best["epoch"] == 1
    assert_same_weights(model.state_dict(), validate.seen[1])


def test_mid_epoch_validation_takes_part_in_selection():
    # eval_every=3 with 4 steps per epoch: every 3rd step inside an epoch, and every epoch end
    scores = [1, 2, 50, 3, 4, 5]
    validate = Scripted(balanced_accuracy=scores)
    model, result = train(cfg_of(eval_every=3), validate=validate)
    steps = [r["step"] for r in result.history if "val_balanced_accuracy" in r]
    assert steps == [3, 4, 6, 8, 9, 12]  # step 12 is the end of the run: validated once
    assert result.best == {"epoch": 1, "step": 6, "val_balanced_accuracy": 50.0, "val_many": None}
    assert_same_weights(model.state_dict(), validate.seen[2])


@pytest.mark.parametrize("with_out", [False, True])
def test_select_last_keeps_the_last_epoch_and_logs_validation(tmp_path, with_out):
    validate = Scripted(balanced_accuracy=[10, 30, 20])
    model, result = train(cfg_of(select="last"), validate=validate, out=tmp_path if with_out else None)
    assert_same_weights(model.state_dict(), validate.seen[2])
    assert result.best == {"epoch": 2, "step": 12, "val_balanced_accuracy": 20.0, "val_many": None}
    assert [r["val_balanced_accuracy"] for r in epoch_records(result.history)] == [10, 30, 20]
    if with_out:
        assert not (tmp_path / BEST_FILE).exists()
        assert_same_weights(load_checkpoint(tmp_path / LAST_FILE)["model"], validate.seen[2])


def test_without_validate_the_last_weights_are_kept():
    model, result = train(cfg_of())
    assert result.best is None
    again, _ = train(cfg_of())
    assert_same_weights(model.state_dict(), again.state_dict())  # and training is deterministic


# ---------------------------------------------------------------- 9. TensorBoard


def test_tensorboard_scalars_equal_the_jsonl_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(cfg_of(epochs=3), out=tmp_path, tensorboard=True, validate=val_summary)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert "loss" in acc.Tags()["scalars"] and "val/balanced_accuracy" in acc.Tags()["scalars"]
    for tag, key in (("loss", "loss"), ("lr", "lr"), ("val/balanced_accuracy", "val_balanced_accuracy")):
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in log] == [4, 8, 12]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in log], rel=1e-6)


def test_tensorboard_after_a_resume_shows_each_step_once(tmp_path):
    # the killed run logged steps 10 (validation) after its last checkpoint (step 9): the resumed
    # run logs it again, and TensorBoard must show it once (purge_step)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = cfg_of(**{**RESUME_CFG, "select": "balanced_accuracy"}, checkpoint_every=3, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, source=KillAfter(TensorSource(X, Y), 20), out=tmp_path, validate=val_summary, tensorboard=True)
    assert load_checkpoint(tmp_path / LAST_FILE)["state"]["step"] == 9
    train(cfg, out=tmp_path, resume=True, validate=val_summary, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    for tag, key in (("loss", "loss"), ("val/top1", "val_top1")):
        got = [(s.step, s.value) for s in acc.Scalars(tag)]
        want = [(r["step"], r[key]) for r in log if key in r]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_device_names_resolve_or_are_refused_in_one_line(monkeypatch):
    """auto/cpu/cuda/cuda:N: ``cuda`` is the rank's GPU, ``cuda:N`` that GPU, if it is visible."""
    from ltclip.core.distributed import DistContext, resolve_device

    rank1 = DistContext(rank=1, world_size=2, local_rank=1)
    assert resolve_device("cpu", rank1) == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cpu:0", "cuda:"):
        with pytest.raises(LtclipError, match=f"^--device '{bad}': choose one of auto, cpu, cuda, cuda:N$"):
            resolve_device(bad, rank1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", rank1) == torch.device("cpu")
    with pytest.raises(LtclipError, match="^--device cuda:0: no CUDA device is visible"):
        resolve_device("cuda:0", rank1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", rank1) == torch.device("cuda:1")
    assert resolve_device("cuda:0", rank1) == torch.device("cuda:0")
    with pytest.raises(LtclipError, match=r"^--device cuda:2: 2 CUDA device\(s\) visible, cuda:0 to cuda:1; pass one of them$"):
        resolve_device("cuda:2", rank1)


def test_amp_precision_is_fp16_on_cuda_and_fp32_elsewhere():
    from ltclip.core.distributed import device_precision

    assert device_precision(torch.device("cuda"), "amp") == "fp16"  # LIFT's prec: amp (a GradScaler in fit)
    assert device_precision(torch.device("cpu"), "amp") == "fp32"
    assert [device_precision(torch.device("cpu"), p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(LtclipError, match="--precision 'half'"):
        device_precision(torch.device("cpu"), "half")
    a, _ = train(cfg_of(precision="amp"))
    b, _ = train(cfg_of(precision="fp32"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # on a CPU: fp32


def test_the_fp16_gradient_scaler_steps_as_unscaled_fp32_skips_inf_and_resumes():
    """The CUDA fp16 path's scaler logic (scale, unscale before clipping, skip a non-finite step,
    checkpoint its scale), run with torch's CPU scaler on fp32 gradients: a power-of-two scale cancels
    exactly, so a scaled step is the plain step."""
    from ltclip.engine.state import Trained

    def trained(scaler):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return Trained(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5), scaler)

    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    plain, scaled = trained(None), trained(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    for step in range(3):
        for t in (plain, scaled):
            loss = nn.functional.cross_entropy(t.model(x), y)
            (t.scaler.scale(loss) if t.scaler is not None else loss).backward()
            t.update(grad_clip=0.05)  # clipping must see the unscaled gradients
        for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    before = [p.detach().clone() for p in scaled.model.parameters()]
    loss = nn.functional.cross_entropy(scaled.model(x), y) * torch.tensor(float("inf"))
    scaled.scaler.scale(loss).backward()
    scaled.update(grad_clip=0.05)
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.model.parameters()))  # the step was skipped
    assert scaled.scaler.get_scale() == 2.0 ** 9 and scaled.schedule.last_epoch == 4  # scale halved, schedule on
    resumed = trained(torch.amp.GradScaler("cpu"))
    resumed.load_state_dict(scaled.state_dict())
    assert resumed.scaler.get_scale() == 2.0 ** 9
