"""What a sweep's K stacked heads share per step and per validation: one AdamW update over every
parameter group (bit-identical to torch's), validation statistics kept for K heads at once
(identical to K separate ones), and one cross-entropy call for every loss registered as a softmax
cross-entropy of offset logits, a loss new to the sweep code too."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltclip.config import OptimConfig
from ltclip.engine import ValidationStats, create_optimizer
from ltclip.engine.grouped_optim import GroupedAdamW
from ltclip.evaluation.metrics import evaluate
from ltclip.methods import losses
from ltclip.methods.losses import compute_loss
from ltclip.sweep.batched import StackTask


def four_heads() -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(nn.Linear(8, 5) for _ in range(4))


BASE_LR = [3e-2 / (k + 1) for k in range(4) for _ in ("weight", "bias")]


def head_groups(heads: nn.ModuleList) -> list[dict]:
    """Two groups a head (weight, bias), each head its own lr and weight decay (0 for the last head's weight)."""
    groups = []
    for k, head in enumerate(heads):
        groups.append({"params": [head.weight], "lr": BASE_LR[2 * k], "weight_decay": 0.0 if k == 3 else 0.05 * (k + 1)})
        groups.append({"params": [head.bias], "lr": BASE_LR[2 * k + 1], "weight_decay": 0.0})
    return groups


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=gen) for _ in range(n)]


def train(heads, optimizer, steps: range, data: list[torch.Tensor]) -> None:
    """Squared-output steps ``steps`` of ``data``; head 3 gets no gradient from step 6 on (a sweep head
    past its epochs) and the lrs decay each step, as a schedule changes them."""
    for t in steps:
        optimizer.zero_grad()
        sum(heads[k](data[t]).pow(2).mean() for k in range(len(heads)) if k != 3 or t < 6).backward()
        for g, lr in zip(optimizer.param_groups, BASE_LR):
            g["lr"] = lr * 0.95 ** (t + 1)
        optimizer.step()


def test_grouped_adamw_is_bit_identical_to_torch_adamw():
    a, b, data = four_heads(), four_heads(), batches(20)
    torch_opt = torch.optim.AdamW(head_groups(a), foreach=False)
    grouped = GroupedAdamW(head_groups(b))
    train(a, torch_opt, range(20), data)
    train(b, grouped, range(20), data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    want, got = torch_opt.state_dict()["state"], grouped.state_dict()["state"]
    assert want.keys() == got.keys()
    for i in want:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[i][key], want[i][key]), (i, key)


def test_grouped_adamw_resumes_from_torch_adamw_state_and_back():
    """A checkpoint of either optimizer continues in the other exactly."""
    reference, resumed, data = four_heads(), four_heads(), batches(12)
    train(reference, torch.optim.AdamW(head_groups(reference), foreach=False), range(12), data)
    previous = None
    for kind, steps in ((torch.optim.AdamW, range(4)), (GroupedAdamW, range(4, 8)), (torch.optim.AdamW, range(8, 12))):
        optimizer = kind(head_groups(resumed), **({"foreach": False} if kind is torch.optim.AdamW else {}))
        if previous is not None:
            optimizer.load_state_dict(copy.deepcopy(previous.state_dict()))
        train(resumed, optimizer, steps, data)
        previous = optimizer
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_create_optimizer_groups_adamw_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    parts = {"0": OptimConfig(lr=0.1), "1": OptimConfig(lr=0.2, weight_decay=0.5)}
    adamw = create_optimizer(model, OptimConfig(), parts, grouped=True)
    assert type(adamw) is GroupedAdamW
    assert [(g["lr"], g["weight_decay"]) for g in adamw.param_groups] == [(0.1, 1e-4), (0.2, 0.5)]
    sgd = create_optimizer(model, OptimConfig(optimizer="sgd"), {k: OptimConfig(optimizer="sgd") for k in parts}, grouped=True)
    assert type(sgd) is torch.optim.SGD  # its per-parameter add(alpha=...) has no scalar-list form
    assert type(create_optimizer(model, OptimConfig(), parts)) is torch.optim.AdamW


def test_grouped_adamw_refuses_what_it_does_not_implement():
    head = nn.Linear(3, 2)
    opt = GroupedAdamW(head.parameters(), amsgrad=True)
    head(torch.ones(1, 3)).sum().backward()
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stats_of_k_heads_equal_k_separate_stats(dtype):
    """Exactly (==): chunks of every size, a class without validation rows, tied scores."""
    rng = np.random.default_rng(3)
    c, k = 9, 4
    train_counts = np.array([300, 150, 101, 100, 60, 20, 19, 5, 1])
    together, apart = ValidationStats(c, heads=k), [ValidationStats(c) for _ in range(k)]
    chunks = []
    for n in (0, 1, 37, 200, 5):
        x = (rng.normal(size=(n, k, c)) * 3).astype(dtype)
        x[: n // 2, 1] = np.round(x[: n // 2, 1])  # ties in one head
        y = rng.choice(np.delete(np.arange(c), 4), n)  # class 4: no validation rows
        together.add(x, y)
        for j, s in enumerate(apart):
            s.add(x[:, j], y)
        chunks.append((x, y))
    got = together.summaries(train_counts)
    assert got == [s.summary(train_counts) for s in apart]
    x = np.concatenate([x for x, _ in chunks])
    y = np.concatenate([y for _, y in chunks])
    for j in range(k):  # and each equals evaluate on that head's logits
        want = evaluate(x[:, j], y, train_counts)
        assert got[j]["balanced_accuracy"] == pytest.approx(want["balanced_accuracy"], rel=1e-12)
        assert got[j]["ece"] == pytest.approx(want["ece"], rel=1e-9)


def test_stats_of_k_heads_need_summaries():
    with pytest.raises(ValueError, match="summaries"):
        ValidationStats(3, heads=2).summary([1, 1, 1])


def class_ramp_loss(logits, targets, class_counts, *, epoch=0, total_epochs=1, slope=0.5):
    """Cross-entropy of the logits plus ``slope · j`` for class j: a loss of the offset form that no sweep code names."""
    return F.cross_entropy(logits + slope * torch.arange(logits.shape[1]).to(logits), targets)


def class_ramp(counts, *, slope=0.5):
    """``ramp``'s offsets: its option, with its default."""
    return slope * torch.arange(len(counts), dtype=torch.float64)


@pytest.fixture
def ramp_loss_registered(monkeypatch):
    """``ramp`` registered for this test only, in a copy of the loss registry standing in for it."""
    registry = copy.deepcopy(losses.LOSSES)
    registry.register("ramp", softmax_offset=class_ramp)(class_ramp_loss)
    monkeypatch.setattr(losses, "LOSSES", registry)


def test_a_new_loss_of_the_offset_form_joins_the_shared_cross_entropy(ramp_loss_registered):
    counts, epochs = [30, 9, 4, 1], [2, 2, 2]
    point_losses = [("focal", {}), ("ramp", {"slope": 0.7}), ("ce", {})]
    task = StackTask(point_losses, counts, epochs)
    assert task.softmax == [1, 2]  # ramp and ce share one cross-entropy call, focal is its own
    torch.testing.assert_close(task.offsets, torch.stack([0.7 * torch.arange(4.0), torch.zeros(4)]))
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 3, 4, generator=gen).requires_grad_(True), torch.randint(0, 4, (8,), generator=gen)
    loss, _ = task(lambda z, active: z[:, active], logits, y, 0)  # a stand-in stack: the heads' logits [B, K, C]
    expected = sum(compute_loss(name, logits[:, k], y, torch.tensor(counts, dtype=torch.float32), **opts)
                   for k, (name, opts) in enumerate(point_losses))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])
