"""Head inputs from a cache: the stored dtype is kept, in RAM and streamed alike (float32 user files)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.core.errors import LtclipError
from ltclip.artifacts.store import FeatureCache

ROWS, T, W, D, CLASSES = 23, 3, 4, 5, 3
IN_RAM, STREAMED = 2**40, 1  # max_ram: everything fits / nothing does


def user_cache(path: Path, dtype, views: int = 1) -> dict:
    """A cache written with h5py directly (as docs/artifacts.md allows), values float16 would round."""
    lead = (ROWS,) if views == 1 else (ROWS, views)
    steps = np.arange(ROWS * views * T * W).reshape(lead + (T, W))
    data = {
        "tokens": (1 + 1e-4 * steps).astype(dtype),
        "embeds": (1 + 1e-4 * np.arange(ROWS * views * D).reshape(lead + (D,))).astype(dtype),
        "labels": np.arange(ROWS) % CLASSES,
    }
    with h5py.File(path, "w") as f:
        for name, value in data.items():
            f[name] = value
        f.attrs.update(schema_version=1, num_classes=CLASSES)
    return {name: value.reshape((ROWS, views) + value.shape[1 + (views > 1):]) for name, value in data.items()
            if name != "labels"}


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tokens_in_ram_and_streamed_give_the_stored_values(tmp_path, dtype, views):
    stored = user_cache(tmp_path / "train.h5", dtype, views)
    if dtype == np.float32:
        assert not np.array_equal(stored["tokens"].astype(np.float16).astype(np.float32), stored["tokens"])
    order = np.random.default_rng(0).permutation(np.r_[np.arange(ROWS), [4, 4, 0]])
    with FeatureCache(tmp_path / "train.h5") as cache:
        assert cache.token_dtype == cache.embed_dtype == np.dtype(dtype)
        in_ram, streamed = (FeatureInputs(cache, "tokens", max_ram) for max_ram in (IN_RAM, STREAMED))
        assert in_ram.in_ram and not streamed.in_ram
        for inputs in (in_ram, streamed):
            assert inputs.dtype == np.dtype(dtype)
            assert inputs.nbytes == ROWS * views * T * W * np.dtype(dtype).itemsize
        got = [list(inputs.batches(order, batch_size=5)) for inputs in (in_ram, streamed)]
    assert len(got[0]) == len(got[1]) == 6
    for (x_ram, y_ram, idx_ram), (x_str, y_str, idx_str) in zip(*got):
        assert x_ram.dtype == x_str.dtype == torch.float32
        assert x_ram.numpy().tobytes() == x_str.numpy().tobytes()  # bit-identical
        np.testing.assert_array_equal(x_ram.numpy(), stored["tokens"][idx_ram].astype(np.float32))
        np.testing.assert_array_equal(idx_ram, idx_str)
        np.testing.assert_array_equal(y_ram.numpy(), y_str.numpy())


def test_one_view_per_row_and_pooled_embeddings_keep_float32(tmp_path):
    stored = user_cache(tmp_path / "train.h5", np.float32, views=2)
    order = np.arange(ROWS)[::-1].copy()
    view_of = order % 2
    with FeatureCache(tmp_path / "train.h5") as cache:
        picked = [next(FeatureInputs(cache, "tokens", m).batches(order, ROWS, view_of))[0] for m in (IN_RAM, STREAMED)]
        embeds = FeatureInputs(cache, "embeds")
        x_embeds = next(embeds.batches(order, ROWS))[0]
    assert picked[0].numpy().tobytes() == picked[1].numpy().tobytes()
    np.testing.assert_array_equal(picked[0].numpy(), stored["tokens"][order, view_of])
    assert embeds.nbytes == ROWS * 2 * D * 4
    np.testing.assert_array_equal(x_embeds.numpy(), stored["embeds"][order])


def test_read_rows_slices_with_a_views_axis(tmp_path):
    stored = user_cache(tmp_path / "train.h5", np.float32)
    with FeatureCache(tmp_path / "train.h5") as cache:
        tokens = cache.read_rows("tokens", 3, 9)
        assert tokens.shape == (6, 1, T, W) and tokens.dtype == np.float32
        np.testing.assert_array_equal(tokens, stored["tokens"][3:9])
        np.testing.assert_array_equal(cache.read_rows("embeds", 0, ROWS), stored["embeds"])
        assert cache.read_rows("embeds", ROWS, ROWS).shape == (0, 1, D)
        with pytest.raises(IndexError, match=r"rows \[20, 24\) are not within \[0, 23\)"):
            cache.read_rows("tokens", 20, 24)
        with pytest.raises(ValueError, match="dataset must be one of"):
            cache.read_rows("labels", 0, 1)
    with h5py.File(tmp_path / "train.h5", "a") as f:
        del f["tokens"]
    with FeatureCache(tmp_path / "train.h5") as cache:
        assert cache.token_dtype is None
        with pytest.raises(LtclipError, match="has no tokens"):
            cache.read_rows("tokens", 0, 1)
