"""Samplers: class frequencies vs. Kang et al.'s formulas, determinism, rank splits, Places-LT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import places_lt_train_counts, shared_files
from ltclip.data.samplers import class_probabilities, create_sampler, list_samplers
from ltclip.core.errors import LtclipError


# A long-tailed profile with an empty class (index 6) in the middle.
COUNTS = np.array([400, 250, 150, 90, 50, 30, 0, 18, 10, 6, 3, 1])
EMPTY = 6
CLASS_LEVEL = ["class-balanced", "sqrt", "progressive"]


def make_labels(counts: np.ndarray = COUNTS) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(123).permutation(labels)


def frequencies(labels: np.ndarray, order: list[int], num_classes: int) -> np.ndarray:
    return np.bincount(labels[order], minlength=num_classes) / len(order)


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def tv_bound(num_classes: int, num_draws: int, delta: float = 1e-9) -> float:
    """Bound on the TV distance between M i.i.d. draws' frequencies and their distribution.

    E[TV] <= 1/2 sum_j sqrt(p_j / M) <= 1/2 sqrt(C / M) (Jensen, then Cauchy-Schwarz), and TV moves
    by at most 1/M when one draw changes, so McDiarmid gives P(TV > E[TV] + eps) <= exp(-2 M eps^2).
    With delta = 1e-9 the bound fails for a correct sampler with probability below 1e-9, while a
    wrong formula (e.g. sqrt instead of class-balanced, TV 0.33 on COUNTS) is far outside it.
    """
    expected = 0.5 * math.sqrt(num_classes / num_draws)
    return expected + math.sqrt(math.log(1 / delta) / (2 * num_draws))


def test_registry_lists_all_samplers():
    assert list_samplers() == ["class-balanced", "instance", "progressive", "sqrt"]
    assert list_samplers("*balanced") == ["class-balanced"]


def test_class_probabilities_closed_forms():
    present = COUNTS > 0
    np.testing.assert_allclose(class_probabilities("instance", COUNTS), COUNTS / COUNTS.sum())
    np.testing.assert_allclose(class_probabilities("class-balanced", COUNTS), present / 11)
    root = np.sqrt(COUNTS)
    np.testing.assert_allclose(class_probabilities("sqrt", COUNTS), root / root.sum())
    ib, cb = COUNTS / COUNTS.sum(), present / 11
    for epoch, mix in [(0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0), (9, 1.0)]:
        np.testing.assert_allclose(
            class_probabilities("progressive", COUNTS, epoch=epoch, total_epochs=4),
            (1 - mix) * ib + mix * cb,
        )
    for name in list_samplers():
        p = class_probabilities(name, COUNTS, epoch=2, total_epochs=4)
        assert p[EMPTY] == 0 and p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("name", CLASS_LEVEL)
def test_class_level_frequencies_match_formula(name):
    labels, draws = make_labels(), 200_000
    sampler = create_sampler(name, labels, len(COUNTS), num_samples=draws, total_epochs=4)
    for epoch in (0, 2):
        sampler.set_epoch(epoch)
        expected = class_probabilities(name, COUNTS, epoch=epoch, total_epochs=4)
        freq = frequencies(labels, list(sampler), len(COUNTS))
        assert tv(freq, expected) < tv_bound(len(COUNTS), draws)


def test_class_balanced_cycles_through_each_class():
    labels = make_labels()
    sampler = create_sampler("class-balanced", labels, len(COUNTS), num_samples=50_000)
    order = np.array(list(sampler))
    per_image = np.bincount(order, minlength=len(labels))
    per_class = np.bincount(labels[order], minlength=len(COUNTS))
    for j in np.flatnonzero(COUNTS):
        k, n = per_class[j], COUNTS[j]
        assert set(per_image[labels == j]) <= {k // n, -(-k // n)}


def test_instance_is_a_permutation_per_pass():
    labels = make_labels()
    n = len(labels)
    sampler = create_sampler("instance", labels, len(COUNTS), num_samples=2 * n + n // 2)
    order = np.array(list(sampler))
    assert sorted(order[:n]) == sorted(order[n : 2 * n]) == list(range(n))
    assert len(set(order[2 * n :])) == n // 2
    np.testing.assert_allclose(frequencies(labels, order[:n].tolist(), len(COUNTS)), COUNTS / n)


def test_progressive_set_epoch_moves_towards_balance():
    labels, draws = make_labels(), 100_000
    sampler = create_sampler("progressive", labels, len(COUNTS), num_samples=draws, total_epochs=5)
    uniform = class_probabilities("class-balanced", COUNTS)
    first = frequencies(labels, list(sampler), len(COUNTS))
    sampler.set_epoch(4)
    last = frequencies(labels, list(sampler), len(COUNTS))
    bound = tv_bound(len(COUNTS), draws)
    assert tv(first, COUNTS / COUNTS.sum()) < bound
    assert tv(last, 0.2 * COUNTS / COUNTS.sum() + 0.8 * uniform) < bound
    assert tv(last, uniform) < tv(first, uniform) - 0.3


@pytest.mark.parametrize("name", list_samplers())
def test_order_is_a_function_of_seed_and_epoch(name):
    labels = make_labels()
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()

    def order(seed, epoch):
        sampler = create_sampler(name, labels, len(COUNTS), seed=seed, total_epochs=3)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(7, 1) == order(7, 1)
    assert order(7, 1) != order(7, 2)
    assert order(7, 1) != order(8, 1)
    # No global RNG is read or advanced.
    assert (np.random.get_state()[1] == np_state).all()
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("name", list_samplers())
def test_ranks_split_the_single_process_sequence(name):
    labels, world, num_samples = make_labels(), 3, 1000
    kwargs = dict(num_samples=num_samples, seed=3, total_epochs=2)
    single = create_sampler(name, labels, len(COUNTS), **kwargs)
    single.set_epoch(1)
    shards = []
    for rank in range(world):
        sampler = create_sampler(name, labels, len(COUNTS), rank=rank, world_size=world, **kwargs)
        sampler.set_epoch(1)
        assert len(sampler) == num_samples // world
        shards.append(list(sampler))
    merged = [shards[i % world][i // world] for i in range(world * len(shards[0]))]
    assert merged == list(single)[: (num_samples // world) * world]


@pytest.mark.parametrize("name", list_samplers())
def test_empty_classes_are_never_drawn(name):
    labels = make_labels()
    sampler = create_sampler(name, labels, len(COUNTS), num_samples=20_000, total_epochs=2)
    sampler.set_epoch(1)
    assert EMPTY not in set(labels[list(sampler)])


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(name="balanced"), "class-balanced"),
        (dict(name="sqrt", power=0.3), "power"),
        (dict(name="instance", rank=2, world_size=2), "rank"),
        (dict(name="instance", num_classes=5), "num_classes"),
        (dict(name="instance", num_samples=1, world_size=2), "num_samples"),
        (dict(name="instance", seed=-1), "seed"),
        (dict(name="instance", labels=np.array([0.5, 1.0])), "labels"),
    ],
)
def test_bad_options_raise_one_line_errors(kwargs, option):
    args = dict(name="instance", labels=make_labels(), num_classes=len(COUNTS)) | kwargs
    with pytest.raises(LtclipError, match=option) as err:
        create_sampler(args.pop("name"), args.pop("labels"), args.pop("num_classes"), **args)
    assert "\n" not in str(err.value)


def test_bad_counts_and_epoch_raise():
    with pytest.raises(LtclipError, match="class_counts"):
        class_probabilities("sqrt", np.zeros(3, dtype=int))
    with pytest.raises(LtclipError, match="epoch"):
        create_sampler("instance", make_labels(), len(COUNTS)).set_epoch(-1)


@pytest.mark.parametrize(
    "manifest", [pytest.param(None, id="profile")] + [pytest.param(p, id="full") for p in shared_files("Places_LT_train.txt")]
)
def test_places_lt_class_balanced_really_balances(manifest):
    """On Places-LT (4980 to 5 images per class) our class-balanced epoch is near uniform.

    The reference code's sampler, a weighted permutation without replacement (weights 1/n_j),
    draws every image exactly once per epoch, so its epoch is exactly as imbalanced as instance
    sampling: its first draws look balanced, then the small classes run out.
    Labels: the real train file's, or the committed profile's (the file is sorted by label, so
    repeating each label by its count gives the same sequence).
    """
    if manifest is None:
        labels = np.repeat(np.arange(365), places_lt_train_counts())
    else:
        labels = np.array([int(line.split()[1]) for line in manifest.read_text().splitlines()])
    num_classes, n = 365, len(labels)
    assert n == 62_500
    counts = np.bincount(labels, minlength=num_classes)
    uniform = np.full(num_classes, 1 / num_classes)

    ours = create_sampler("class-balanced", labels, num_classes)
    ours_counts = np.bincount(labels[list(ours)], minlength=num_classes)
    # 171 expected draws per class, sd ~13: 4.5 sd either side still keeps max/min under 2.1.
    assert ours_counts.max() / ours_counts.min() < 2.1
    assert tv(ours_counts / n, uniform) < tv_bound(num_classes, n)

    weights = torch.from_numpy(1.0 / counts[labels])
    gen = torch.Generator().manual_seed(0)
    reference = torch.multinomial(weights, n, replacement=False, generator=gen).numpy()
    instance = list(create_sampler("instance", labels, num_classes))
    reference_tv = tv(frequencies(labels, reference, num_classes), uniform)
    instance_tv = tv(frequencies(labels, instance, num_classes), uniform)
    assert reference_tv == pytest.approx(instance_tv, abs=1e-9)
    head = reference[: n // 10]
    assert tv(frequencies(labels, head, num_classes), uniform) < reference_tv / 2
    assert reference_tv > 5 * tv(ours_counts / n, uniform)
