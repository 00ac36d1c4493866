"""Losses against hand-written float64 loops on small batches, plus known limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltclip.core.errors import LtclipError
from ltclip.methods.losses import LOSSES, compute_loss, get_loss, list_losses

ALL = ["balanced_softmax", "cb", "cbw", "ce", "focal", "grw", "lade", "ldam", "logit_adjusted"]
REWEIGHTED = ["balanced_softmax", "logit_adjusted", "cbw", "cb", "grw"]

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 4)) * 2.0
TARGETS = [0, 1, 1, 3, 0, 0]  # class 2 is absent from the batch
COUNTS = [80.0, 20.0, 5.0, 2.0]
UNIFORM = [7.0, 7.0, 7.0, 7.0]


def loss(name, logits=LOGITS, targets=TARGETS, counts=COUNTS, **kw):
    """Evaluate a registered loss on float64 tensors and return a Python float."""
    return compute_loss(
        name,
        torch.tensor(logits, dtype=torch.float64),
        torch.tensor(targets),
        torch.tensor(counts, dtype=torch.float64),
        **kw,
    ).item()


# ---------------------------------------------------------------- reference loops


def log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def ce_loop(logits, targets, shift=None, weights=None, smoothing=0.0):
    """torch's (weighted, label-smoothed) cross-entropy written out sample by sample."""
    c = len(logits[0])
    shift = shift or [0.0] * c
    weights = weights or [1.0] * c
    num = den = 0.0
    for row, y in zip(logits, targets):
        lp = log_softmax([v + b for v, b in zip(row, shift)])
        smooth = sum(weights[j] * -lp[j] for j in range(c)) / c
        num += (1 - smoothing) * weights[y] * -lp[y] + smoothing * smooth
        den += weights[y]
    return num / den


def sum_to_c(raw):
    return [v * len(raw) / sum(raw) for v in raw]


def effective_number_weights(counts, beta):
    return sum_to_c([(1 - beta) / (1 - beta**n) for n in counts])


def ldam_loop(max_m, s, weights=None):
    """LDAM on LOGITS/TARGETS: margins max_m * (n_min / n_j)^(1/4) off the target logit, times s."""
    margins = [max_m * (min(COUNTS) / n) ** 0.25 for n in COUNTS]
    shifted = [
        [s * (v - (margins[j] if j == y else 0.0)) for j, v in enumerate(row)] for row, y in zip(LOGITS, TARGETS)
    ]
    return ce_loop(shifted, TARGETS, weights=weights)


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- registry and options


def test_registry_lists_every_name():
    assert list_losses() == ALL
    assert list_losses("l*") == ["lade", "ldam", "logit_adjusted"]


def test_get_loss_unknown_name_suggests_close_match():
    with pytest.raises(LtclipError, match="did you mean focal"):
        get_loss("focall")


def test_loss_options_read_from_signatures():
    assert LOSSES.options("focal") == {"gamma": 2.0}
    assert LOSSES.options("ldam") == {"max_m": 0.5, "s": 30.0, "drw_epoch": -1, "drw_at": -1.0, "drw_beta": 0.9999}
    assert LOSSES.options("balanced_softmax") == {}


def test_parse_types_values_like_defaults():
    opts = LOSSES.parse("cb", ["beta=0.99", "base = focal", "gamma=1"])
    assert opts == {"beta": 0.99, "base": "focal", "gamma": 1.0}
    assert isinstance(opts["gamma"], float)
    assert LOSSES.parse("ldam", ["drw_epoch=3"]) == {"drw_epoch": 3}


@pytest.mark.parametrize(
    "name, opts, message",
    [
        ("focal", ["alpha=0.25"], "valid keys: gamma"),
        ("balanced_softmax", ["tau=1"], "valid keys: none"),
        ("focal", ["gamma"], "key=value"),
        ("ldam", ["drw_epoch=1.5"], "expected int"),
        ("focal", ["gamma=big"], "expected float"),
    ],
)
def test_parse_errors(name, opts, message):
    with pytest.raises(LtclipError, match=message):
        LOSSES.parse(name, opts)


def test_compute_loss_rejects_unknown_options_and_bad_shapes():
    with pytest.raises(LtclipError, match="valid keys: gamma"):
        loss("focal", alpha=0.25)
    with pytest.raises(LtclipError, match="class_counts has 3 entries"):
        loss("ce", counts=[1.0, 2.0, 3.0])
    with pytest.raises(LtclipError, match="targets have shape"):
        loss("ce", targets=[0, 1])


@pytest.mark.parametrize(
    "name, kw, message", [("cb", {"base": "sigmoid"}, "base must be"), ("cb", {"beta": 1.0}, "beta must be in")]
)
def test_invalid_option_values(name, kw, message):
    with pytest.raises(LtclipError, match=message):
        loss(name, **kw)


# ---------------------------------------------------------------- each loss against a loop


def test_ce_and_label_smoothing_match_loops_and_torch():
    assert loss("ce") == pytest.approx(ce_loop(LOGITS, TARGETS), rel=1e-12)
    smoothed = loss("ce", label_smoothing=0.2)
    assert smoothed == pytest.approx(ce_loop(LOGITS, TARGETS, smoothing=0.2), rel=1e-12)
    torch_value = F.cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGETS), label_smoothing=0.2).item()
    assert smoothed == pytest.approx(torch_value, rel=1e-12)


def test_focal_matches_loop_and_gamma_zero_is_ce():
    expected = 0.0
    for row, y in zip(LOGITS, TARGETS):
        p = math.exp(log_softmax(row)[y])
        expected += -((1 - p) ** 2.0) * math.log(p) / len(TARGETS)
    assert loss("focal") == pytest.approx(expected, rel=1e-10)
    assert loss("focal", gamma=0.0) == pytest.approx(loss("ce"), rel=1e-12)


def focal_reference(logits, targets, gamma):
    """Focal loss written out in float64 with pow on ``1 - softmax``: an independent formula."""
    p = torch.softmax(logits, dim=1)[torch.arange(len(targets)), targets]
    return (-((1.0 - p) ** gamma) * torch.log(p)).mean()


def focal_gradient_closed_form(logits, targets, gamma):
    """d/dz_j of the batch mean of ``-(1-p)^γ log p``: ``[γ p (1-p)^(γ-1) log p - (1-p)^γ] (δ_jy - p_j) / N``."""
    probs = torch.softmax(logits, dim=1)
    p = probs[torch.arange(len(targets)), targets]
    q = 1.0 - p
    outer = gamma * p * q ** (gamma - 1.0) * torch.log(p) - q**gamma
    return outer[:, None] * (F.one_hot(targets, logits.shape[1]) - probs) / len(targets)


def focal_grad(logits, targets, gamma, counts=None):
    z = logits.clone().requires_grad_(True)
    value = compute_loss("focal", z, targets, counts or [1.0] * logits.shape[1], gamma=gamma)
    value.backward()
    return value.detach(), z.grad


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradient_matches_float64_references(gamma):
    logits64 = torch.tensor(LOGITS, dtype=torch.float64)
    targets = torch.tensor(TARGETS)
    reference = logits64.clone().requires_grad_(True)
    expected_value = focal_reference(reference, targets, gamma)
    expected_value.backward()
    closed = focal_gradient_closed_form(logits64, targets, gamma)
    torch.testing.assert_close(reference.grad, closed, rtol=1e-10, atol=1e-14)

    value, grad = focal_grad(logits64, targets, gamma)
    assert value.item() == pytest.approx(expected_value.item(), rel=1e-12)
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-14)
    value32, grad32 = focal_grad(logits64.float(), targets, gamma)
    assert value32.item() == pytest.approx(expected_value.item(), rel=1e-5)
    torch.testing.assert_close(grad32.double(), closed, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 0.0])
def test_focal_gradient_finite_when_p_rounds_to_one(gamma):
    """Logit gap 20: p_y is 1 in float32, where pow(1 - p, γ < 1) used to give 0 · inf = NaN."""
    z = torch.tensor([[20.0, 0, 0], [0, 1, 0]])
    y = torch.tensor([0, 1])
    assert torch.exp(F.log_softmax(z, dim=1))[0, 0].item() == 1.0  # the case really arises
    value, grad = focal_grad(z, y, gamma, counts=[5, 3, 2])
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    expected = focal_gradient_closed_form(z.double(), y, gamma)  # float64 resolves 1 - p ≈ 4e-9
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert value.item() == pytest.approx(focal_reference(z.double(), y, gamma).item(), rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy_value_and_gradient():
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    targets = torch.tensor(TARGETS)
    value, grad = focal_grad(logits, targets, 0.0)
    z = logits.clone().requires_grad_(True)
    ce = F.cross_entropy(z, targets)
    ce.backward()
    assert value.item() == pytest.approx(ce.item(), rel=1e-12)
    torch.testing.assert_close(grad, z.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_single_class_and_masked_rows_have_zero_loss_and_gradient(gamma):
    """1 - p_y is exactly 0 when no other class is finite: loss 0, gradient 0, no NaN."""
    for logits in (torch.tensor([[3.0], [-1.0]]), torch.tensor([[2.0, -math.inf], [-math.inf, 0.5]])):
        targets = torch.tensor([0, 1]) if logits.shape[1] == 2 else torch.tensor([0, 0])
        value, grad = focal_grad(logits, targets, gamma)
        assert value.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


def test_focal_refuses_negative_gamma():
    with pytest.raises(LtclipError, match="gamma must be >= 0"):
        loss("focal", gamma=-1.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cbw_is_inverse_frequency_weighted_ce(smoothing):
    weights = sum_to_c([1.0 / n for n in COUNTS])
    expected = ce_loop(LOGITS, TARGETS, weights=weights, smoothing=smoothing)
    assert loss("cbw", label_smoothing=smoothing) == pytest.approx(expected, rel=1e-12)
    weight = torch.tensor(weights, dtype=torch.float64)
    torch_value = F.cross_entropy(
        torch.tensor(LOGITS), torch.tensor(TARGETS), weight=weight, label_smoothing=smoothing
    ).item()
    assert loss("cbw", label_smoothing=smoothing) == pytest.approx(torch_value, rel=1e-12)


def test_grw_matches_loop_and_exponent_one_is_cbw():
    weights = sum_to_c([(1.0 / n) ** 0.5 for n in COUNTS])
    assert loss("grw", exponent=0.5) == pytest.approx(ce_loop(LOGITS, TARGETS, weights=weights), rel=1e-12)
    assert loss("grw", exponent=1.0) == pytest.approx(loss("cbw"), rel=1e-12)
    assert loss("grw") == pytest.approx(loss("grw", exponent=1.2), rel=1e-12) != pytest.approx(loss("cbw"), rel=1e-6)
    assert loss("grw", exponent=0.0) == pytest.approx(loss("ce"), rel=1e-12)


def test_cb_softmax_matches_cui_reduction():
    w = effective_number_weights(COUNTS, 0.9)
    expected = sum(w[y] * -log_softmax(row)[y] for row, y in zip(LOGITS, TARGETS)) / len(TARGETS)
    assert loss("cb", beta=0.9) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
def test_cb_focal_matches_cui_sigmoid_focal(gamma):
    w = effective_number_weights(COUNTS, 0.99)
    total = 0.0
    for row, y in zip(LOGITS, TARGETS):
        for j, z in enumerate(row):
            p_t = sigmoid(z) if j == y else 1.0 - sigmoid(z)
            total += w[y] * (1.0 - p_t) ** gamma * -math.log(p_t)
    expected = total / len(TARGETS)
    assert loss("cb", beta=0.99, base="focal", gamma=gamma) == pytest.approx(expected, rel=1e-10)


def test_balanced_softmax_and_logit_adjusted_match_loops():
    log_counts = [math.log(n) for n in COUNTS]
    assert loss("balanced_softmax") == pytest.approx(ce_loop(LOGITS, TARGETS, shift=log_counts), rel=1e-12)
    log_prior = [math.log(n / sum(COUNTS)) for n in COUNTS]
    expected = ce_loop(LOGITS, TARGETS, shift=[0.5 * v for v in log_prior])
    assert loss("logit_adjusted", tau=0.5) == pytest.approx(expected, rel=1e-12)
    assert loss("logit_adjusted", tau=1.0) == pytest.approx(loss("balanced_softmax"), rel=1e-12)
    assert loss("logit_adjusted", tau=0.0) == pytest.approx(loss("ce"), rel=1e-12)


@pytest.mark.parametrize("name", REWEIGHTED)
def test_uniform_counts_reduce_to_cross_entropy(name):
    assert loss(name, counts=UNIFORM) == pytest.approx(loss("ce"), rel=1e-12)


def test_ldam_matches_loop():
    assert loss("ldam", max_m=0.4, s=10.0) == pytest.approx(ldam_loop(0.4, 10.0), rel=1e-12)


def test_ldam_margins_follow_inverse_fourth_root_with_largest_max_m():
    # With zero logits and s=1, a single sample of class j has loss log(1 + (C-1) e^{m_j}); invert it.
    c = len(COUNTS)
    recovered = []
    for j in range(c):
        value = loss("ldam", logits=[[0.0] * c], targets=[j], s=1.0)
        recovered.append(math.log((math.exp(value) - 1.0) / (c - 1)))
    assert max(recovered) == pytest.approx(0.5, rel=1e-10)
    for j in range(c):
        assert recovered[j] == pytest.approx(0.5 * (min(COUNTS) / COUNTS[j]) ** 0.25, rel=1e-10)


def test_ldam_drw_off_before_drw_epoch_and_on_after():
    plain = loss("ldam")
    assert loss("ldam", drw_epoch=3, epoch=2) == pytest.approx(plain, rel=1e-12)
    assert loss("ldam", drw_epoch=-1, epoch=50) == pytest.approx(plain, rel=1e-12)
    expected = ldam_loop(0.5, 30.0, weights=effective_number_weights(COUNTS, 0.999))
    for epoch in (3, 7):
        assert loss("ldam", drw_epoch=3, drw_beta=0.999, epoch=epoch) == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize("total, first", [(10, 8), (200, 160), (18, 14), (3, 2)])  # round(0.8 · total)
def test_ldam_drw_at_a_fraction_starts_at_that_epoch_of_training(total, first):
    plain = loss("ldam")
    weighted = ldam_loop(0.5, 30.0, weights=effective_number_weights(COUNTS, 0.9999))
    assert loss("ldam", drw_at=0.8, epoch=first - 1, total_epochs=total) == pytest.approx(plain, rel=1e-12)
    for epoch in (first, total - 1):
        assert loss("ldam", drw_at=0.8, epoch=epoch, total_epochs=total) == pytest.approx(weighted, rel=1e-12)


@pytest.mark.parametrize("opts, message", [({"drw_at": 0.8, "drw_epoch": 3}, "give one"), ({"drw_at": 1.5}, "in \\[0, 1\\]")])
def test_ldam_drw_options_are_refused_in_one_line(opts, message):
    with pytest.raises(LtclipError, match=message):
        loss("ldam", **opts)


def test_lade_matches_reference_loop():
    alpha, lam = 0.3, 0.2
    n, c = len(TARGETS), len(COUNTS)
    prior = [v / sum(COUNTS) for v in COUNTS]
    pc_softmax = ce_loop(LOGITS, TARGETS, shift=[math.log(p) for p in prior])
    lader = 0.0
    for j in range(c):
        mine = [row[j] for row, y in zip(LOGITS, TARGETS) if y == j]
        first = sum(mine) / len(mine) if mine else 0.0
        terms = [row[j] - math.log(prior[j]) + math.log(1.0 / c) for row in LOGITS]
        top = max(terms)
        second = top + math.log(sum(math.exp(t - top) for t in terms)) - math.log(n)
        lader -= prior[j] * (first - second - lam * second**2)
    assert loss("lade", alpha=alpha, remine_lambda=lam) == pytest.approx(pc_softmax + alpha * lader, rel=1e-12)
    assert loss("lade", alpha=0.0) == pytest.approx(loss("balanced_softmax"), rel=1e-12)


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("name", ALL)
def test_gradients_finite_with_an_empty_class(name):
    counts = torch.tensor([40.0, 0.0, 3.0, 1.0])
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    extra = {"drw_epoch": 0} if name == "ldam" else {}
    value = compute_loss(name, logits, torch.tensor([1, 1, 2, 3, 0, 0]), counts, **extra)
    value.backward()
    assert value.ndim == 0 and value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_zero_counts_are_clamped_to_one(name):
    assert loss(name, counts=[80.0, 0.0, 5.0, 2.0]) == pytest.approx(loss(name, counts=[80.0, 1.0, 5.0, 2.0]))


@pytest.mark.parametrize("name", ALL)
def test_class_counts_accept_lists(name):
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    from_list = compute_loss(name, logits, torch.tensor(TARGETS), COUNTS)
    assert from_list.item() == pytest.approx(loss(name), rel=1e-12)
