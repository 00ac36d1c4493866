"""Where a cosine head's class rows start, as LIFT starts them (trainer.py, ``init_head``): from the
training images' features, one row per class, each normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``[C, D]``: each class's mean feature, normalised (LIFT's ``class_mean``); a class without
    images gets a zero row."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).double()
    return F.normalize(sums / counts[:, None], dim=-1).float()


def linear_probe(features: Tensor, labels: Tensor, num_classes: int, max_iter: int = 100) -> Tensor:
    """``[C, D]``: the class rows of a class-balanced, L2-regularised multinomial logistic regression on
    the features, normalised (LIFT's ``linear_probe``: scikit-learn's ``LogisticRegression(C=1,
    solver="lbfgs", max_iter=100, class_weight="balanced")``, whose objective torch's L-BFGS
    minimises here; its intercept is fitted and dropped, as LIFT drops it)."""
    x = features.float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = int((counts > 0).sum())
    weights = (len(labels) / (present * counts.clamp(min=1)))[labels]  # "balanced": n / (classes · n_y)
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    total, rows = weights.sum(), torch.arange(len(labels), device=x.device)

    @torch.no_grad()
    def closure():  # the objective and its gradient in closed form (the training loop owns autograd's backward)
        z = x @ w.T + b
        loss = (weights * F.cross_entropy(z, labels, reduction="none")).sum() + 0.5 * w.square().sum()
        residual = torch.softmax(z, dim=1)
        residual[rows, labels] -= 1  # d cross-entropy / d logits
        residual *= weights[:, None]
        w.grad, b.grad = (residual.T @ x + w) / total, residual.sum(0) / total  # scikit-learn's scaling: the same minimum
        return loss / total

    opt.step(closure)
    return F.normalize(w.detach(), dim=-1)
