"""Streaming a token cache: the prefetcher changes nothing but timing, the block-shuffled order has
its stated structure and cuts reads into long runs, and torchrun ranks read disjoint rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.data.samplers import BlockShuffledSampler, block_shuffled, create_sampler
from ltclip.artifacts.store import FeatureCache, TokenFormat, shard_range, write_arrays

ROWS, SEQ = 50, (5, 8)
STREAMED = 1  # max_ram: nothing fits


@pytest.fixture(params=["float16", "int8"])
def cache(request, tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((ROWS, 2) + SEQ).astype(np.float32)
    fmt = TokenFormat.from_options(pool=2, dtype=request.param)
    path = write_arrays(tmp_path / "train.h5", tokens[:, :, 0, :3], np.arange(ROWS) % 4, list("abcd"), {}, tokens,
                        token_format=fmt)
    with FeatureCache(path) as c:
        yield c


def collect(batches):
    return [(x.numpy().tobytes(), y.tolist(), rows.tolist()) for x, y, rows in batches]


@pytest.mark.parametrize("max_ram", [None, STREAMED])
@pytest.mark.parametrize("read_ahead", [1, 3])
def test_prefetched_batches_equal_the_batches_read_in_this_thread(cache, max_ram, read_ahead):
    inputs = FeatureInputs(cache, "tokens", max_ram)
    order = np.random.default_rng(1).permutation(np.r_[np.arange(ROWS), [3, 3, 0]])
    view_of = np.random.default_rng(2).integers(0, 2, len(order))
    plain = collect(inputs.batches(order, 7, view_of, prefetch=0))
    assert len(plain) == 8 and [r for _, _, rows in plain for r in rows] == order.tolist()
    for prefetch in (1, 2, 5):
        assert collect(inputs.batches(order, 7, view_of, prefetch=prefetch, read_ahead=read_ahead)) == plain
    expected = cache.read_tokens(order)[np.arange(len(order)), view_of].astype(np.float32)
    np.testing.assert_array_equal(np.frombuffer(b"".join(x for x, _, _ in plain), np.float32).reshape(expected.shape), expected)


def test_decoding_stored_tensors_equals_decoding_numpy_rows(cache):
    """The path of a GPU: the stored rows travel as tensors and are decoded where they arrive."""
    inputs = FeatureInputs(cache, "tokens", STREAMED)
    stored = inputs.stored_rows(np.array([4, 1, 9]))
    as_tensors = type(stored)(*(None if a is None else torch.from_numpy(a) for a in stored))
    assert inputs.decode(as_tensors).numpy().tobytes() == inputs.decode(stored).numpy().tobytes()


def test_a_loading_error_reaches_the_consumer(cache):
    inputs = FeatureInputs(cache, "tokens", STREAMED)
    with pytest.raises(IndexError, match=r"token rows must lie in \[0, 50\)"):
        list(inputs.batches(np.array([0, 1, 2, 99]), 2))


def pools_of(order, block_rows, pool_blocks):
    """Brute force: cut ``order`` into its pools, each the entries of ``pool_blocks`` blocks (the last fewer)."""
    pools, members, current = [], set(), []
    for row in order.tolist():
        block = row // block_rows
        if block not in members and len(members) == pool_blocks:
            pools.append((members, current))
            members, current = set(), []
        members.add(block)
        current.append(row)
    return pools + [(members, current)] if current else pools


@pytest.mark.parametrize("num_rows, block_rows, pool_blocks", [(103, 10, 3), (100, 10, 1), (7, 10, 4), (40, 1, 5)])
def test_block_shuffled_rows_form_pools_of_whole_blocks(num_rows, block_rows, pool_blocks):
    order = block_shuffled(np.arange(num_rows), block_rows, pool_blocks, np.random.default_rng(3))
    assert sorted(order.tolist()) == list(range(num_rows))
    pools = pools_of(order, block_rows, pool_blocks)
    blocks = -(-num_rows // block_rows)
    assert len(pools) == -(-blocks // pool_blocks)
    for members, rows in pools:  # each pool: exactly the rows of its blocks, every block in one pool
        assert sorted(rows) == [r for b in sorted(members) for r in range(b * block_rows, min((b + 1) * block_rows, num_rows))]
    np.testing.assert_array_equal(order, block_shuffled(np.arange(num_rows), block_rows, pool_blocks, np.random.default_rng(3)))
    if num_rows > block_rows * pool_blocks:
        assert not np.array_equal(order, block_shuffled(np.arange(num_rows), block_rows, pool_blocks, np.random.default_rng(4)))


def test_block_shuffled_keeps_a_balanced_samplers_draws():
    """Repeats and missing rows (class-balanced draws) are kept as drawn: only their order changes."""
    labels = np.repeat(np.arange(4), [30, 10, 5, 2])
    sampler = create_sampler("class-balanced", labels, 4, seed=1)
    sampler.set_epoch(2)
    drawn = np.fromiter(iter(sampler), np.int64)
    order = block_shuffled(drawn, 8, 2, np.random.default_rng(0))
    assert sorted(order.tolist()) == sorted(drawn.tolist())
    for members, rows in pools_of(order, 8, 2):
        assert sorted(rows) == sorted(r for r in drawn.tolist() if r // 8 in members)


@pytest.mark.parametrize("world_size", [1, 2])
def test_block_shuffled_sampler_reorders_each_ranks_own_draws(world_size):
    labels = np.arange(60) % 3
    for rank in range(world_size):
        inner = create_sampler("sqrt", labels, 3, seed=5, rank=rank, world_size=world_size)
        wrapped = BlockShuffledSampler(create_sampler("sqrt", labels, 3, seed=5, rank=rank, world_size=world_size), 10, 2)
        for epoch in (0, 1):
            inner.set_epoch(epoch)
            wrapped.set_epoch(epoch)
            mine, order = list(inner), list(wrapped)
            assert len(wrapped) == len(order) == len(mine) and sorted(order) == sorted(mine) and order != mine
            assert list(wrapped) == order  # a pure function of (seed, epoch, rank): a resumed epoch reads the same
            assert len(pools_of(np.array(order), 10, 2)) <= 3


def test_block_order_with_read_ahead_reads_in_long_runs(cache, monkeypatch):
    runs = []
    real = FeatureCache._read_indexed

    def counting(self, name, rows):
        if name == "tokens":
            runs.append(int((np.diff(rows, prepend=-2) != 1).sum()))
        return real(self, name, rows)

    monkeypatch.setattr(FeatureCache, "_read_indexed", counting)
    inputs = FeatureInputs(cache, "tokens", STREAMED)
    order = block_shuffled(np.arange(ROWS), 10, 2, np.random.default_rng(5))
    list(inputs.batches(order, 5, read_ahead=4))  # 20 positions: exactly one pool of 2 blocks
    assert len(runs) == 3 and max(runs) <= 2 and sum(runs) <= 6
    runs.clear()
    list(inputs.batches(np.random.default_rng(5).permutation(ROWS), 5, read_ahead=4))
    assert sum(runs) > 6  # a fully random order needs many short reads


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_rows(cache, monkeypatch, world_size):
    read: list[list[int]] = []
    real = FeatureCache.read_token_parts
    monkeypatch.setattr(FeatureCache, "read_token_parts", lambda self, idx: read[-1].extend(np.asarray(idx).tolist()) or real(self, idx))
    inputs = FeatureInputs(cache, "tokens", STREAMED)
    drawn = []
    for rank in range(world_size):  # training: each rank its share of the sampler's order
        sampler = create_sampler("instance", cache.labels, cache.num_classes, seed=0, rank=rank, world_size=world_size)
        sampler.set_epoch(1)
        order = np.fromiter(iter(sampler), np.int64)
        read.append([])
        seen = [r for _, _, rows in inputs.batches(order, 4, np.zeros(len(order), np.int64)) for r in rows]
        assert seen == read[-1] == order.tolist()
        drawn += seen
    assert len(drawn) == len(set(drawn)) == world_size * (ROWS // world_size)
    read.clear()
    for rank in range(world_size):  # validation: each rank its contiguous shard
        read.append([])
        start, stop = shard_range(ROWS, rank, world_size)
        list(inputs.batches(np.arange(start, stop), 4))
        assert read[-1] == list(range(start, stop))
    assert sorted(r for rows in read for r in rows) == list(range(ROWS))
