"""Two-stage methods against numpy formulas and brute-force sweeps, plus a learning test on
long-tailed Gaussian features where every method must beat its plain-CE stage-1 classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltclip.core.errors import LtclipError
from ltclip.methods.second_stage import TAU_GRID, TWO_STAGE, build_two_stage, fit_two_stage, list_two_stage, posthoc_logit_adjustment

METHODS = ["crt", "disalign", "lws", "marc", "ncm", "tau-norm"]
TRAINED = ["crt", "disalign", "lws", "marc"]


# ---------------------------------------------------------------- independent references


def balanced_accuracy(logits, y, classes=None):
    """Mean per-class recall in percent over the classes present in y (or the given subset)."""
    pred = np.asarray(logits).argmax(1)
    classes = np.unique(y) if classes is None else classes
    return 100.0 * np.mean([(pred[y == c] == c).mean() for c in classes])


def numpy_tau_norm(z, w, tau):
    return z @ (w / np.linalg.norm(w, axis=1, keepdims=True) ** tau).T


def numpy_ncm(z_train, y_train, z, num_classes, scale):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    means = unit(np.stack([unit(z_train[y_train == c]).mean(0) for c in range(num_classes)]))
    return scale * unit(z) @ means.T


def logits_of(module, z):
    with torch.no_grad():
        return module(torch.as_tensor(z)).numpy()


# ---------------------------------------------------------------- a small long-tailed problem


class Problem:
    """C isotropic unit-variance Gaussians in D dims, means at distance ``radius`` from the origin,
    train counts falling exponentially 500 -> 5; balanced val (20/class) and test (200/class)."""

    def __init__(self, classes=20, dim=16, radius=3.0, seed=0):
        rng = np.random.default_rng(seed)
        means = rng.normal(size=(classes, dim))
        self.means = radius * means / np.linalg.norm(means, axis=1, keepdims=True)
        self.counts = np.round(500 * 0.01 ** (np.arange(classes) / (classes - 1))).astype(np.int64)
        self.num_classes, self.dim = classes, dim

        def draw(per_class):
            y = np.repeat(np.arange(classes), per_class)
            return (self.means[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y

        self.z_train, self.y_train = draw(self.counts)
        self.z_val, self.y_val = draw(np.full(classes, 20))
        self.z_test, self.y_test = draw(np.full(classes, 200))
        self.stage1 = plain_ce_linear(self.z_train, self.y_train, classes)

    def fit(self, name, val=False, **kw):
        extra = {"z_val": self.z_val, "y_val": self.y_val} if val else {}
        return fit_two_stage(
            name, classifier=self.stage1, z_train=self.z_train, y_train=self.y_train,
            class_counts=self.counts, **extra, **kw,
        )


def plain_ce_linear(z, y, num_classes, steps=300, seed=0):
    """Stage 1: a linear classifier trained to convergence with plain cross-entropy (full batch)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(z.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    zt, yt = torch.as_tensor(z), torch.as_tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(zt), yt).backward()
        opt.step()
    return lin.requires_grad_(False)


@pytest.fixture(scope="module")
def problem():
    return Problem()


@pytest.fixture(scope="module")
def small():
    """A 5-class, 6-dim problem for the formula checks."""
    return Problem(classes=5, dim=6, radius=2.0, seed=1)


# ---------------------------------------------------------------- registry and options


def test_registry_lists_methods_and_their_options():
    assert list_two_stage() == METHODS
    assert list_two_stage("*-norm") == ["tau-norm"]
    assert TWO_STAGE.options("disalign") == {"exponent": 1.2}
    assert TWO_STAGE.options("marc") == {"exponent": 1.2}
    assert TWO_STAGE.options("tau-norm") == {"taus": TAU_GRID, "tau": 1.0}
    assert TWO_STAGE.options("crt") == {}
    assert TAU_GRID == tuple(round(0.1 * k, 1) for k in range(21))


def test_parse_options_types_them_like_their_defaults():
    assert TWO_STAGE.parse("disalign", ["exponent=0.8"]) == {"exponent": 0.8}
    assert TWO_STAGE.parse("tau-norm", ["taus=0,0.5, 1", "tau=2"]) == {"taus": (0.0, 0.5, 1.0), "tau": 2.0}
    assert TWO_STAGE.parse("crt", []) == {}
    for name, opt, message in (
        ("crt", "exponent=1", "not an option of two-stage method 'crt'; valid keys: none"),
        ("marc", "exponent", "must look like key=value; keys for two-stage method 'marc': exponent"),
        ("ncm", "scale=big", r"expected float \(default 16.0\)"),
    ):
        with pytest.raises(LtclipError, match=message):
            TWO_STAGE.parse(name, [opt])


def test_unknown_method_and_option_are_user_errors(small):
    with pytest.raises(LtclipError, match="did you mean crt"):
        small.fit("crtt")
    with pytest.raises(LtclipError, match="valid keys: exponent"):
        small.fit("marc", rho=1.0)
    with pytest.raises(LtclipError, match="epochs must be an integer >= 0"):
        small.fit("lws", epochs=-1)


def with_nan(z):
    z = z.copy()
    z[3, 2] = np.nan
    return z


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: {"class_counts": [1, 2, 3]}, "class_counts has 3 entries"),
        (lambda p: {"y_train": np.where(p.y_train == 0, 5, p.y_train)}, r"y_train must lie in \[0, 5\)"),
        (lambda p: {"y_train": p.y_train[1:]}, "y_train must be 729 integer labels"),
        (lambda p: {"z_val": p.z_val}, "pass both z_val and y_val"),
        (lambda p: {"z_val": p.z_val[:, :4], "y_val": p.y_val}, "z_val has dim 4"),
        (lambda p: {"z_train": with_nan(p.z_train)}, "NaN"),
        (lambda p: {"z_train": p.z_train[:, :4]}, "does not accept features of dim 4"),
    ],
)
def test_bad_inputs_are_user_errors(small, change, message):
    args = {
        "classifier": small.stage1, "z_train": small.z_train, "y_train": small.y_train,
        "class_counts": small.counts,
    }
    with pytest.raises(LtclipError, match=message):
        fit_two_stage("lws", **{**args, **change(small)})


def test_tau_norm_needs_a_linear_classifier_and_crt_a_resettable_one(small):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(5, 6))

        def forward(self, z):
            return z @ self.weight.T

    for name, message in (("tau-norm", "linear classifier"), ("crt", "reset_parameters")):
        with pytest.raises(LtclipError, match=message):
            fit_two_stage(
                name, classifier=Scaled(), z_train=small.z_train, y_train=small.y_train,
                class_counts=small.counts, epochs=0,
            )


# ---------------------------------------------------------------- tau-norm and post-hoc adjustment


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.7])
def test_tau_norm_matches_numpy_formula(small, tau):
    model = build_two_stage("tau-norm", {"in_dim": 6, "num_classes": 5, "tau": tau}, small.stage1)
    w = small.stage1.weight.numpy().astype(np.float64)
    expected = numpy_tau_norm(small.z_test, w, tau)
    np.testing.assert_allclose(logits_of(model, small.z_test), expected, rtol=1e-4, atol=1e-4)


def test_tau_zero_is_stage1_without_bias(small):
    model = build_two_stage("tau-norm", {"in_dim": 6, "num_classes": 5, "tau": 0.0}, small.stage1)
    expected = logits_of(small.stage1, small.z_test) - small.stage1.bias.numpy()
    np.testing.assert_allclose(logits_of(model, small.z_test), expected, rtol=1e-5, atol=1e-5)


def test_tau_norm_sweep_picks_the_brute_force_best(problem):
    model = problem.fit("tau-norm", val=True)
    w = problem.stage1.weight.numpy().astype(np.float64)
    scores = [balanced_accuracy(numpy_tau_norm(problem.z_val, w, t), problem.y_val) for t in TAU_GRID]
    table = model.summary["tau_table"]
    assert [row["tau"] for row in table] == list(TAU_GRID)
    np.testing.assert_allclose([row["balanced_accuracy"] for row in table], scores)
    best = TAU_GRID[int(np.argmax(scores))]
    assert model.summary["tau"] == model.config["tau"] == model.tau == best
    assert len(set(scores)) > 1  # the sweep is informative on this problem


def test_tau_norm_without_val_uses_tau_option(problem):
    assert problem.fit("tau-norm").tau == 1.0
    assert problem.fit("tau-norm", tau=0.5).config["tau"] == 0.5
    custom = problem.fit("tau-norm", val=True, taus=[0.0, 0.3])
    assert [row["tau"] for row in custom.summary["tau_table"]] == [0.0, 0.3]


def test_posthoc_logit_adjustment_matches_hand_computation(problem):
    logits = logits_of(problem.stage1, problem.z_val)
    log_prior = np.log(problem.counts / problem.counts.sum())
    taus = np.linspace(0, 2, 21)
    best, table = posthoc_logit_adjustment(logits, problem.y_val, problem.counts, taus=taus)
    scores = [balanced_accuracy(logits - t * log_prior[None, :], problem.y_val) for t in taus]
    np.testing.assert_allclose([row["tau"] for row in table], taus)
    np.testing.assert_allclose([row["balanced_accuracy"] for row in table], scores)
    assert best == pytest.approx(taus[int(np.argmax(scores))])
    assert best > 0  # the prior correction helps a CE classifier on balanced data
    assert posthoc_logit_adjustment(logits, problem.y_val, problem.counts)[1][-1]["tau"] == 2.0


# ---------------------------------------------------------------- initialisation and forward formulas


def test_crt_reinitialises_the_classifier(small):
    other = torch.nn.Linear(6, 5)
    with torch.no_grad():
        other.weight.fill_(100.0)
        other.bias.fill_(-100.0)
    before = small.stage1.weight.clone()

    def init(classifier, seed=0):
        return fit_two_stage(
            "crt", classifier=classifier, z_train=small.z_train, y_train=small.y_train,
            class_counts=small.counts, epochs=0, seed=seed,
        ).classifier

    a, b = init(small.stage1), init(other)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)  # independent of stage-1 values
    assert not torch.allclose(a.weight, small.stage1.weight)
    bound = 1 / np.sqrt(6)  # torch's default nn.Linear init: U(-1/sqrt(in), 1/sqrt(in))
    assert a.weight.abs().max() <= bound and a.bias.abs().max() <= bound
    assert not torch.equal(init(small.stage1, seed=1).weight, a.weight)
    assert torch.equal(small.stage1.weight, before)  # the caller's classifier is untouched
    state = torch.random.get_rng_state()
    init(small.stage1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not advanced


def test_crt_reinitialises_a_cosine_classifier_including_its_scale(small):
    heads = pytest.importorskip("ltclip.models.heads")
    stage1 = heads.CosineClassifier(6, 5, init_scale=16.0, learn_scale=True)
    with torch.no_grad():
        stage1.scale.fill_(3.0)  # as if learned in stage 1
    fresh = fit_two_stage(
        "crt", classifier=stage1, z_train=small.z_train, y_train=small.y_train, class_counts=small.counts, epochs=0,
    ).classifier
    assert type(fresh) is type(stage1)
    assert float(fresh.scale.detach()) == 16.0
    assert not torch.allclose(fresh.weight, stage1.weight)


@pytest.mark.parametrize("name", ["lws", "disalign", "marc"])
def test_calibration_at_init_equals_stage1(small, name):
    stage1 = logits_of(small.stage1, small.z_test)
    fitted = small.fit(name, epochs=0)
    rebuilt = build_two_stage(name, {"in_dim": 6, "num_classes": 5}, small.stage1)
    for model in (fitted, rebuilt):
        np.testing.assert_allclose(logits_of(model, small.z_test), stage1, rtol=1e-6, atol=1e-6)


def test_forward_formulas_with_random_parameters(small):
    rng = np.random.default_rng(3)
    z = small.z_test.astype(np.float64)
    w, b = small.stage1.weight.numpy().astype(np.float64), small.stage1.bias.numpy().astype(np.float64)
    logits = z @ w.T + b
    dims = {"in_dim": 6, "num_classes": 5}

    def with_params(name, **values):
        model = build_two_stage(name, dims, small.stage1)
        new = {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
        model.load_state_dict({**model.state_dict(), **new})
        return logits_of(model, small.z_test)

    f = rng.uniform(0.5, 2, 5)
    np.testing.assert_allclose(with_params("lws", scales=f), logits * f, rtol=1e-4, atol=1e-4)

    omega, beta = rng.uniform(0.5, 2, 5), rng.normal(size=5)
    marc = logits * omega + beta * np.linalg.norm(w, axis=1)
    np.testing.assert_allclose(with_params("marc", omega=omega, beta=beta), marc, rtol=1e-4, atol=1e-4)

    wg, bg, alpha = rng.normal(size=(1, 6)), rng.normal(size=1), rng.uniform(0.5, 2, 5)
    sigma = 1 / (1 + np.exp(-(z @ wg.T + bg)))
    disalign = (1 - sigma) * logits + sigma * (alpha * logits + beta)
    got = with_params("disalign", **{"gate.weight": wg, "gate.bias": bg, "alpha": alpha, "beta": beta})
    np.testing.assert_allclose(got, disalign, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_ncm_matches_numpy_brute_force(small, scale):
    model = small.fit("ncm", scale=scale)
    expected = numpy_ncm(small.z_train.astype(np.float64), small.y_train, small.z_test, 5, scale)
    np.testing.assert_allclose(logits_of(model, small.z_test), expected, rtol=1e-4, atol=1e-4)
    assert TWO_STAGE.options("ncm") == {"scale": 16.0}


# ---------------------------------------------------------------- sampling, determinism, checkpoints


class Recorder(torch.nn.Linear):
    """A linear classifier that records the first feature (the label, see below) of every batch."""

    seen: list = []  # class attribute: shared by deep copies

    def forward(self, z):
        Recorder.seen.append(z[:, 0].detach().round().long())
        return super().forward(z)


@pytest.mark.parametrize("name, balanced", [("crt", True), ("lws", True), ("disalign", False), ("marc", False)])
def test_sampling_is_class_balanced_only_where_the_method_says(name, balanced):
    counts = np.array([300, 60, 20, 10, 5])
    y = np.repeat(np.arange(5), counts)
    z = np.random.default_rng(0).normal(size=(len(y), 4)).astype(np.float32)
    z[:, 0] = y  # the label travels in feature 0
    Recorder.seen.clear()
    fit_two_stage(name, classifier=Recorder(4, 5), z_train=z, y_train=y, class_counts=counts, epochs=6, batch_size=64)
    drawn = np.bincount(torch.cat(Recorder.seen[1:]).numpy(), minlength=5)  # [0] is the shape probe
    assert drawn.sum() == 6 * len(y)
    if balanced:
        np.testing.assert_allclose(drawn / drawn.sum(), 0.2, atol=0.03)
    else:
        np.testing.assert_array_equal(drawn, 6 * counts)


@pytest.mark.parametrize("name", TRAINED)
def test_training_is_deterministic_and_logs_every_epoch(small, name):
    records = []
    a = small.fit(name, epochs=3, seed=5, log=records.append, batch_size=64)
    b = small.fit(name, epochs=3, seed=5, batch_size=64)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    lrs = [r["lr"] for r in records]  # the lr after each epoch's last step: cosine decay from 0.1 to 0
    assert 0.1 > lrs[0] > lrs[1] > lrs[2] and lrs[2] == pytest.approx(0.0, abs=1e-12)
    assert a.summary["history"] == records and a.summary["best_epoch"] == 2
    c = small.fit(name, epochs=3, seed=6, batch_size=64)
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("name", TRAINED)
def test_validation_selects_the_best_epoch(problem, name):
    model = problem.fit(name, val=True, epochs=6, batch_size=256, lr=0.5)
    history = model.summary["history"]
    scores = [r["val_balanced_accuracy"] for r in history]
    assert model.summary["best_epoch"] == int(np.argmax(scores))
    assert model.summary["val_balanced_accuracy"] == max(scores)
    assert balanced_accuracy(logits_of(model, problem.z_val), problem.y_val) == pytest.approx(max(scores))


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_round_trip(small, name):
    model = small.fit(name, val=True, epochs=2, batch_size=64)
    config = json.loads(json.dumps(model.config))
    rebuilt = build_two_stage(name, config, small.stage1)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.name == model.name == name
    np.testing.assert_array_equal(logits_of(rebuilt, small.z_test), logits_of(model, small.z_test))


def test_build_rejects_a_foreign_config(small):
    with pytest.raises(LtclipError, match="does not fit two-stage method 'lws'"):
        build_two_stage("lws", {"in_dim": 6, "num_classes": 5, "tau": 1.0}, small.stage1)


# ---------------------------------------------------------------- learning


def test_every_method_beats_the_plain_ce_stage1_on_balanced_test(problem):
    few = np.flatnonzero(problem.counts < 20)
    stage1 = logits_of(problem.stage1, problem.z_test)
    base = balanced_accuracy(stage1, problem.y_test)
    base_few = balanced_accuracy(stage1, problem.y_test, few)
    results = {}
    for name in ["crt", "lws", "tau-norm", "disalign", "marc", "ncm"]:
        logits = logits_of(problem.fit(name, batch_size=128), problem.z_test)
        results[name] = (balanced_accuracy(logits, problem.y_test), balanced_accuracy(logits, problem.y_test, few))
    # measured (seed 0): stage-1 64.0 (few 35.0); crt 72.8 (58.0), lws 70.3, tau-norm 71.7,
    # disalign 70.5, marc 70.6, ncm 74.9; nearest true mean (Bayes) 79.4
    for name, (acc, _) in results.items():
        assert acc >= base + 3.0, (name, acc, base)
    assert results["crt"][1] >= base_few + 10.0, (results["crt"], base_few)
