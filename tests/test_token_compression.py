"""Token formats: each round-trips within its error bound (checked against float64 numpy), files in
every format read back what was written, and `ltclip extract --token-*` caches train and evaluate."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.cli import app
from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.core.errors import LtclipError
from ltclip.artifacts.store import (
    BlockWriter, FeatureCache, FeatureWriter, PcaFit, TokenCodec, TokenFormat, join_shards, shard_path, write_arrays,
)
from ltclip.artifacts.store.tokens import pool_tokens

runner = CliRunner()
GRID, WIDTH = 4, 12
SEQ = (1 + GRID * GRID, WIDTH)


def model_tokens(n: int, seed: int = 0, views: int | None = None) -> np.ndarray:
    """Tokens whose magnitudes differ by token and by channel (so the two scales differ)."""
    rng = np.random.default_rng(seed)
    lead = (n,) if views is None else (n, views)
    x = rng.standard_normal(lead + SEQ) * rng.uniform(0.1, 5.0, SEQ[0])[:, None] * rng.uniform(0.5, 2.0, WIDTH)
    return x.astype(np.float32)


def encode(fmt: TokenFormat, x: np.ndarray, basis=None):
    codec = TokenCodec(fmt, SEQ, basis)
    enc = codec.encode(torch.from_numpy(x))
    decoded = codec.decode(torch.from_numpy(enc.values), None if enc.scales is None else torch.from_numpy(enc.scales))
    return enc, decoded.numpy().astype(np.float64)


@pytest.mark.parametrize("scale", ["token", "channel"])
def test_int8_error_is_at_most_half_a_scale_step(scale):
    x = model_tokens(7)
    enc, decoded = encode(TokenFormat.from_options(dtype="int8", scale=scale), x)
    ref = x.astype(np.float64)
    axis = -1 if scale == "token" else -2
    ref_scale = np.abs(ref).max(axis=axis) / 127
    np.testing.assert_allclose(enc.scales, ref_scale, rtol=1e-6)
    step = np.expand_dims(ref_scale, axis)
    np.testing.assert_array_equal(enc.values, np.rint(ref / step).astype(np.int8))
    assert enc.values.dtype == np.int8 and np.abs(enc.values).max() == 127
    assert (np.abs(decoded - ref) <= step / 2 * (1 + 1e-5)).all()


def test_fp8_error_is_within_e4m3_rounding():
    x = model_tokens(5, seed=1)
    enc, decoded = encode(TokenFormat.from_options(dtype="fp8"), x)
    ref = x.astype(np.float64)
    s = np.abs(ref).max(axis=-1, keepdims=True) / 448
    np.testing.assert_allclose(enc.scales[..., None], s, rtol=1e-6)
    y = np.abs(ref / s)  # e4m3: 3 mantissa bits (relative half-step 2^-4), subnormal step 2^-9
    bound = s * np.maximum(2.0**-4 * y, 2.0**-10) * (1 + 1e-5)
    assert enc.values.dtype == np.uint8 and (np.abs(decoded - ref) <= bound).all()


def test_float16_is_a_plain_cast():
    x = model_tokens(3)
    enc, decoded = encode(TokenFormat(), x)
    assert enc.scales is None
    np.testing.assert_array_equal(enc.values, x.astype(np.float16))
    np.testing.assert_array_equal(decoded, x.astype(np.float16).astype(np.float64))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pooling_equals_a_loop_over_the_grid(k):
    x = model_tokens(3, views=2)
    got = pool_tokens(torch.from_numpy(x), k).numpy()
    cells = GRID // k
    ref = np.empty(x.shape[:2] + (1 + cells * cells, WIDTH))
    for n in range(x.shape[0]):
        for v in range(x.shape[1]):
            ref[n, v, 0] = x[n, v, 0]
            for i in range(cells):
                for j in range(cells):
                    window = [x[n, v, 1 + (k * i + a) * GRID + k * j + b].astype(np.float64) for a in range(k) for b in range(k)]
                    ref[n, v, 1 + i * cells + j] = np.mean(window, axis=0)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert TokenFormat(pool=k).stored_shape(SEQ) == ref.shape[-2:]


def test_pca_reconstruction_equals_numpy_svd_projection():
    sample = model_tokens(40, seed=2)
    fit = PcaFit(WIDTH)
    for part in np.array_split(sample, 3):  # accumulated over batches, like extraction does
        fit.add(torch.from_numpy(part))
    mean, components = fit.basis(5)
    flat = sample.reshape(-1, WIDTH).astype(np.float64)
    mu = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mu, full_matrices=False)
    top = vt[:5]
    np.testing.assert_allclose(mean, mu, atol=1e-5)
    np.testing.assert_allclose(components @ components.T, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(components.T @ components, top.T @ top, atol=1e-4)  # the same subspace
    x = model_tokens(4, seed=3)
    fmt = TokenFormat.from_options(pca=5)
    _, decoded = encode(fmt, x, (mean, components))
    ref = (x - mu) @ top.T @ top + mu
    np.testing.assert_allclose(decoded, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())  # the coordinates are float16
    again = PcaFit(WIDTH)
    again.add(torch.from_numpy(sample))
    assert all(np.array_equal(a, b) for a, b in zip(again.basis(5), (mean, components)))  # signs are fixed


FORMATS = {
    "float16": TokenFormat(),
    "int8-token": TokenFormat.from_options(dtype="int8"),
    "int8-channel": TokenFormat.from_options(dtype="int8", scale="channel"),
    "fp8": TokenFormat.from_options(dtype="fp8"),
    "pool2": TokenFormat.from_options(pool=2),
    "pool2-pca6-int8": TokenFormat.from_options(pool=2, dtype="int8", pca=6),
}


def basis_for(fmt):
    if not fmt.pca:
        return None
    fit = PcaFit(WIDTH)
    fit.add(pool_tokens(torch.from_numpy(model_tokens(20, seed=9)), fmt.pool))
    return fit.basis(fmt.pca)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_reads_back_what_it_wrote(tmp_path, name, views):
    fmt, n = FORMATS[name], 11
    x = model_tokens(n, seed=4, views=None if views == 1 else views)
    basis = basis_for(fmt)
    codec = TokenCodec(fmt, SEQ, basis)
    enc = codec.encode(torch.from_numpy(x))
    expected = codec.decode(torch.from_numpy(enc.values), None if enc.scales is None else torch.from_numpy(enc.scales)).numpy()
    expected = expected.reshape((n, views) + expected.shape[-2:])
    path = write_arrays(tmp_path / "train.h5", x[..., 0, :5], np.arange(n) % 3, ["a", "b", "c"], {"model": "m"}, x,
                        token_format=fmt, token_basis=basis)
    with FeatureCache(path) as cache:
        assert cache.token_format == fmt and cache.token_shape == codec.decoded_shape
        assert cache.attrs["schema_version"] == 2 and cache.attrs["token_dtype"] == fmt.dtype
        order = np.array([3, 1, 1, 10, 0, 7])
        got = cache.read_tokens(order)
        np.testing.assert_array_equal(got.astype(np.float32), expected[order].astype(np.float32))
        assert cache.token_row_bytes * n == sum(h5py.File(path)[k].id.get_storage_size() for k in ("tokens", "token_scales")
                                                if k in h5py.File(path))
        batches = [[x.numpy() for x, _, _ in FeatureInputs(cache, "tokens", cap).batches(order, 4)] for cap in (None, 1)]
        for ram, streamed in zip(*batches):
            assert ram.tobytes() == streamed.tobytes()
        np.testing.assert_array_equal(np.concatenate(batches[0]), expected[order].astype(np.float32))


def test_shards_of_a_compressed_cache_join_into_the_single_process_file(tmp_path):
    fmt, n = FORMATS["pool2-pca6-int8"], 13
    x, basis = model_tokens(n, seed=5), basis_for(FORMATS["pool2-pca6-int8"])
    common = dict(num_rows=n, embed_dim=5, block_size=4, attrs={"model": "m"}, labels=np.arange(n) % 3,
                  classnames=["a", "b", "c"], token_shape=SEQ, token_format=fmt, token_basis=basis)
    for rank in range(2):
        with FeatureWriter.open(tmp_path / "train.h5", shard=(rank, 2), **common) as w:
            for b in w.pending_blocks():
                lo, hi = w.block_range(b)
                w.write_block(b, x[w.row_start + lo : w.row_start + hi, 0, :5], x[w.row_start + lo : w.row_start + hi])
            w.finalise()
    join_shards([shard_path(tmp_path / "train.h5", r) for r in range(2)], tmp_path / "train.h5")
    with FeatureWriter.open(tmp_path / "one.h5", **common) as w:
        for b in w.pending_blocks():
            lo, hi = w.block_range(b)
            w.write_block(b, x[lo:hi, 0, :5], x[lo:hi])
        w.finalise()
    with h5py.File(tmp_path / "train.h5") as joined, h5py.File(tmp_path / "one.h5") as one:
        for name in ("tokens", "token_scales", "token_pca_mean", "token_pca_components"):
            np.testing.assert_array_equal(joined[name][()], one[name][()])
    with pytest.raises(LtclipError, match="another PCA basis"):
        FeatureWriter.open(tmp_path / "one.h5", **{**common, "token_basis": (basis[0] + 1, basis[1])})


@pytest.mark.parametrize("name", ["int8-channel", "pool2-pca6-int8"])
def test_block_writer_takes_encoded_rows_in_any_order(tmp_path, name):
    fmt, n = FORMATS[name], 11
    x, basis = model_tokens(n, seed=2, views=2), basis_for(FORMATS[name])
    common = dict(num_rows=n, embed_dim=5, block_size=4, attrs={"model": "m"}, labels=np.arange(n) % 3, views=2,
                  classnames=["a", "b", "c"], token_shape=SEQ, token_format=fmt, token_basis=basis)
    with FeatureWriter.open(tmp_path / "one.h5", **common) as w:
        for b in w.pending_blocks():
            lo, hi = w.block_range(b)
            w.write_block(b, x[lo:hi, :, 0, :5], x[lo:hi])
        w.finalise()
    with FeatureWriter.open(tmp_path / "rows.h5", **common) as w:
        blocks = BlockWriter(w)
        for rows in ([10, 3, 9], [0, 8, 1, 2], [7, 4, 6, 5]):  # as extract: encoded per batch, views kept
            encoded = w.codec.encode(torch.from_numpy(x[rows]))
            assert encoded.scales is not None
            blocks.add(rows, x[rows, :, 0, :5], encoded)
        assert blocks.done
        w.finalise()
    with h5py.File(tmp_path / "rows.h5") as got, h5py.File(tmp_path / "one.h5") as one:
        for ds in ("embeds", "tokens", "token_scales", "done"):
            np.testing.assert_array_equal(got[ds][()], one[ds][()], err_msg=ds)


def test_unknown_or_inconsistent_token_formats_are_one_line_errors(tmp_path):
    x = model_tokens(4)
    path = write_arrays(tmp_path / "train.h5", x[:, 0, :5], np.arange(4) % 3, ["a", "b", "c"], {}, x,
                        token_format=FORMATS["int8-token"])
    with h5py.File(path, "a") as f:
        f.attrs["token_dtype"] = "int4"
    with pytest.raises(LtclipError, match=r"stores tokens as 'int4' with scale 'token', a format this ltclip cannot read; upgrade"):
        FeatureCache(path)
    with h5py.File(path, "a") as f:
        f.attrs["token_dtype"] = "fp8"
    with pytest.raises(LtclipError, match="tokens are int8 but token_dtype is 'fp8'"):
        FeatureCache(path)
    with h5py.File(path, "a") as f:
        f.attrs["token_dtype"] = "int8"
        del f["token_scales"]
    with pytest.raises(LtclipError, match="do not fit the format int8 per-token"):
        FeatureCache(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int4"}, "--token-dtype 'int4': expected one of float16, int8, fp8"),
    ({"scale": "channel"}, "--token-scale channel: float16 tokens have no scale"),
    ({"dtype": "int8", "scale": "row"}, "--token-scale 'row': expected one of token, channel"),
    ({"pool": 0}, "--token-pool 0: expected an integer >= 1"),
    ({"pca": -1}, "--token-pca -1: expected an integer >= 0"),
])
def test_bad_format_options(kwargs, message):
    with pytest.raises(LtclipError, match=message):
        TokenFormat.from_options(**kwargs)


def test_formats_that_do_not_fit_the_model_are_refused():
    with pytest.raises(LtclipError, match=r"--token-pool 3: must divide the 4×4 patch grid; choose one of \[1, 2, 4\]"):
        TokenFormat(pool=3).check(SEQ)
    with pytest.raises(LtclipError, match="--token-pool 2: 18 tokens are not CLS"):
        TokenFormat(pool=2).check((18, WIDTH))
    with pytest.raises(LtclipError, match="--token-pca 12: must be below the token width 12"):
        TokenFormat(pca=12).check(SEQ)


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def compressed(synthetic_root, tmp_path_factory):
    """`ltclip extract --token-pool 2 --token-dtype int8 --token-pca 16` on the synthetic images (tiny ViT: 17 × 64)."""
    torch.manual_seed(1)
    from ltclip.models.backbone import load_backbone

    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(load_backbone(TINY_MODEL, "none").model.state_dict(), ckpt)
    out = tmp_path_factory.mktemp("cache") / "feat"
    args = ["extract", "--data-root", str(synthetic_root), "--model", TINY_MODEL, "--pretrained", str(ckpt), "--out", str(out),
            "--workers", "0", "--batch-size", "32", "--block-size", "64", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--token-pool", "2", "--token-dtype", "int8", "--token-pca", "16", "--token-pca-sample", "50"])
    assert result.exit_code == 0, result.output
    return out, args


def test_train_and_eval_splits_read_the_same_transform(compressed, tmp_path):
    out, _ = compressed
    with FeatureCache(out / "train.h5") as train, FeatureCache(out / "test.h5") as test:
        assert train.token_format == test.token_format == TokenFormat.from_options(pool=2, dtype="int8", pca=16)
        assert train.token_shape == test.token_shape == (5, 64)
        assert all(np.array_equal(a, b) for a, b in zip(train.codec.basis, test.codec.basis))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.h5").write_bytes((out / "train.h5").read_bytes())
    x = model_tokens(3)
    write_arrays(mixed / "test.h5", x[:, 0, :5], [0, 1, 2], [f"class {i}" for i in range(10)], {}, np.zeros((3, 17, 64)))
    with pytest.raises(LtclipError, match="token_dtype='float16' but train.h5 beside it with token_dtype='int8'"):
        FeatureCache(mixed / "test.h5")


def test_a_compressed_cache_trains_the_decoder_from_the_cli(compressed, tmp_path):
    out, _ = compressed
    run = tmp_path / "run"
    result = runner.invoke(app, ["train-head", "--features", str(out), "--head", "decoder", "--epochs", "1",
                                 "--batch-size", "32", "--device", "cpu", "--out", str(run)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from ltclip.artifacts.runs import load_run

    assert load_run(run).model.head.config["token_shape"] == [5, 64]


def test_cache_info_shows_bytes_per_image(compressed):
    out, _ = compressed
    result = runner.invoke(app, ["cache", "info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    import json

    info = json.loads(result.output)
    train = next(f for f in info["files"] if f["file"] == "train.h5")
    # embeds 32 float16 + 5 × 16 int8 token coordinates + 5 float32 scales
    assert train["bytes_per_image"] == 32 * 2 + 5 * 16 + 5 * 4 and train["stored_tokens"] == [5, 16]
    assert train["data_bytes"] == train["rows"] * train["bytes_per_image"]
    assert train["token_format"] == "int8 per-token, pool 2×2, PCA 16"
    assert info["bytes"] == sum(f["bytes"] for f in info["files"])
    table = runner.invoke(app, ["cache", "info", str(out)], env={"COLUMNS": "200"})
    assert "bytes/image" in table.output and "164" in table.output and "total" in table.output


def test_rerun_is_up_to_date_and_another_format_is_refused(compressed):
    out, args = compressed
    fmt = ["--token-pool", "2", "--token-dtype", "int8", "--token-pca", "16", "--token-pca-sample", "50"]
    again = runner.invoke(app, [*args, *fmt])
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    other = runner.invoke(app, [*args, "--token-pool", "2", "--token-dtype", "fp8", "--token-pca", "16", "--token-pca-sample", "50"])
    assert other.exit_code != 0 and "stores tokens as int8 per-token, pool 2×2, PCA 16, this run asks for fp8" in other.output


@pytest.mark.parametrize("extra, message", [
    (["--token-pool", "3"], "--token-pool 3: must divide the 4×4 patch grid"),
    (["--token-pca", "64"], "--token-pca 64: must be below the token width 64"),
    (["--no-tokens", "--token-dtype", "int8"], "shape the stored tokens; drop them or drop --no-tokens"),
    (["--token-pca-sample", "10"], "--token-pca-sample sizes the PCA fit: pass --token-pca W too"),
    (["--token-scale", "channel"], "--token-scale channel: float16 tokens have no scale"),
])
def test_bad_extract_options_are_one_line_errors(compressed, tmp_path, extra, message):
    out, args = compressed
    result = runner.invoke(app, [str(tmp_path / "x") if a == str(out) else a for a in args] + extra)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
