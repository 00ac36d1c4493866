"""Feature store: round trips, block order, resume after SIGKILL and disk full, shards, checks."""

from __future__ import annotations

import errno
import filecmp
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ltclip.core.errors import LtclipError
from ltclip.artifacts.store import (
    SCHEMA_VERSION,
    BlockWriter,
    EncodedTokens,
    FeatureCache,
    FeatureWriter,
    join_shards,
    load_text_embeddings,
    save_text_embeddings,
    shard_path,
    shard_range,
)

TESTS = Path(__file__).resolve().parent
CLASSES = ["cat", "dog", "owl", "elk"]
ATTRS = {"model": "ViT-T", "pretrained": "none", "preprocess": "224 bicubic", "image_size": 32}


def make_data(n: int, views: int = 1, dim: int = 8, tokens: tuple = (5, 4), seed: int = 0) -> dict:
    """Rows as the writer receives them: embeds (n, V, D), tokens (n, V, T, W), labels, paths."""
    rng = np.random.default_rng(seed)
    return {
        "embeds": rng.standard_normal((n, views, dim)).astype(np.float16),
        "tokens": rng.standard_normal((n, views) + tokens).astype(np.float16),
        "labels": rng.integers(0, len(CLASSES), n),
        "paths": [f"images/{i:04d}.png" for i in range(n)],
    }


def open_writer(path, data, *, block_size=8, attrs=ATTRS, with_tokens=True, **kw) -> FeatureWriter:
    n, views, dim = data["embeds"].shape
    return FeatureWriter.open(
        path,
        num_rows=n,
        embed_dim=dim,
        block_size=block_size,
        attrs=attrs,
        labels=data["labels"],
        classnames=CLASSES,
        paths=data["paths"],
        token_shape=data["tokens"].shape[2:] if with_tokens else None,
        views=views,
        **kw,
    )


def write_blocks(writer: FeatureWriter, data: dict, blocks=None) -> None:
    for b in writer.pending_blocks() if blocks is None else blocks:
        start, stop = (writer.row_start + r for r in writer.block_range(b))
        tokens = data["tokens"][start:stop] if writer.has_tokens else None
        writer.write_block(b, data["embeds"][start:stop], tokens)


def write_cache(path, data, *, order_seed=None, **kw) -> Path:
    with open_writer(path, data, **kw) as w:
        blocks = w.pending_blocks()
        if order_seed is not None:
            random.Random(order_seed).shuffle(blocks)
        write_blocks(w, data, blocks)
        w.finalise()
    return w.path


def same_file(a, b) -> bool:
    return filecmp.cmp(a, b, shallow=False)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("views", [1, 3])
def test_round_trip(tmp_path, views):
    data = make_data(37, views=views)
    path = write_cache(tmp_path / "train.h5", data, block_size=8)
    with FeatureCache(path) as cache:
        assert (cache.num_rows, cache.views, cache.embed_dim) == (37, views, 8)
        assert cache.has_tokens and cache.token_shape == (5, 4) and cache.complete
        assert np.array_equal(cache.load_embeds(), data["embeds"])
        assert np.array_equal(cache.read_tokens(np.arange(37)), data["tokens"])
        blocks = list(cache.iter_token_blocks(10))
        assert [start for start, _ in blocks] == [0, 10, 20, 30]
        assert np.array_equal(np.concatenate([t for _, t in blocks]), data["tokens"])
        assert cache.labels.dtype == np.int64 and np.array_equal(cache.labels, data["labels"])
        assert cache.paths == data["paths"] and cache.classnames == CLASSES
        assert np.array_equal(cache.class_counts(), np.bincount(data["labels"], minlength=4))
        assert cache.attrs["model"] == "ViT-T" and cache.attrs["image_size"] == 32
        assert cache.attrs["schema_version"] == SCHEMA_VERSION
        assert cache.attrs["rows_completed"] == 37 and cache.attrs["num_classes"] == 4
        assert cache.nbytes_on_disk == path.stat().st_size

    # The on-disk layout the docs promise: contiguous float16, (N, D) for one view, memmap-able.
    with h5py.File(path, "r") as h5:
        embeds = h5["embeds"]
        assert embeds.shape == ((37, 8) if views == 1 else (37, views, 8))
        assert h5["tokens"].shape == ((37, 5, 4) if views == 1 else (37, views, 5, 4))
        assert h5["labels"].dtype == np.int32 and h5["done"].dtype == np.uint8
        assert all(h5[k].chunks is None and h5[k].compression is None for k in ("embeds", "tokens"))
        mapped = np.memmap(path, np.float16, "r", offset=embeds.id.get_offset(), shape=embeds.shape)
        assert np.array_equal(mapped.reshape(37, views, 8), data["embeds"])


def test_block_order_does_not_change_the_file(tmp_path):
    data = make_data(61)
    in_order = write_cache(tmp_path / "a.h5", data)
    shuffled = write_cache(tmp_path / "b.h5", data, order_seed=3)
    assert same_file(in_order, shuffled)


def test_minimal_user_file_reads(tmp_path):
    path = tmp_path / "mine.h5"
    embeds = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    with h5py.File(path, "w") as h5:
        h5["embeds"] = embeds
        h5["labels"] = np.arange(20) % 5
        h5.attrs["schema_version"] = 1
        h5.attrs["num_classes"] = 5
    with FeatureCache(path) as cache:
        assert (cache.num_rows, cache.views, cache.embed_dim, cache.num_classes) == (20, 1, 16, 5)
        assert cache.paths is None and cache.classnames is None and not cache.has_tokens
        assert np.array_equal(cache.load_embeds(), embeds[:, None])
        assert np.array_equal(cache.class_counts(), [4] * 5)
        with pytest.raises(LtclipError, match="has no tokens"):
            cache.read_tokens([0])


def test_read_tokens_any_order(tmp_path):
    data = make_data(300, views=2, seed=4)
    path = write_cache(tmp_path / "t.h5", data, block_size=64)
    rng = np.random.default_rng(5)
    runs_and_repeats = [7, 8, 9, 10, 7, 299, 0, 0]
    idx = np.concatenate([rng.integers(0, 300, 50), runs_and_repeats, np.arange(100, 140)])
    rng.shuffle(idx)
    with FeatureCache(path) as cache:
        assert cache._raw_fd("tokens") is not None  # the writer's contiguous tokens are read directly
        assert np.array_equal(cache.read_tokens(idx), data["tokens"][idx])
        assert np.array_equal(cache.read_tokens([5]), data["tokens"][[5]])
        assert cache.read_tokens([]).shape == (0, 2, 5, 4)
        with pytest.raises(IndexError):
            cache.read_tokens([300])


def test_cache_reopens_in_each_process(tmp_path):
    data = make_data(12)
    cache = FeatureCache(write_cache(tmp_path / "p.h5", data))
    copy = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(copy.read_tokens([3, 1]), data["tokens"][[3, 1]])


# ----------------------------------------------------------------------------- rows in any order (BlockWriter)


def feed(blocks: BlockWriter, data: dict, rows) -> list[int]:
    """Hand ``rows`` (split rows) of ``data`` to ``blocks``, with a views axis as extract does."""
    rows = np.asarray(rows, dtype=np.int64)
    tokens = EncodedTokens(data["tokens"][rows], None) if blocks.writer.has_tokens else None
    return blocks.add(rows, data["embeds"][rows], tokens)


def done_flags(path) -> list[int]:
    with h5py.File(path, "r") as h5:
        return h5["done"][()].tolist()


@pytest.mark.parametrize("views", [1, 2])
def test_block_writer_writes_a_block_once_all_its_rows_arrived(tmp_path, views):
    data = make_data(37, views=views)  # blocks of 8: rows 32..36 form a last, partial block of 5
    order = np.random.default_rng(1).permutation(37)
    with open_writer(tmp_path / "train.h5", data) as w:
        blocks = BlockWriter(w)
        assert blocks.pending_blocks() == [0, 1, 2, 3, 4] and not blocks.done
        assert blocks.pending_rows() == list(range(37))
        seen, cuts = set(), [0, 3, 4, 11, 19, 20, 31, 37]
        for lo, hi in zip(cuts, cuts[1:]):  # batches of uneven sizes, rows out of order
            before = blocks.pending_blocks()
            written = feed(blocks, data, order[lo:hi])
            seen.update(order[lo:hi].tolist())
            complete = [b for b in range(5) if set(range(*w.block_range(b))) <= seen]
            assert written == [b for b in before if b in complete]
            assert blocks.pending_blocks() == [b for b in range(5) if b not in complete]
            assert done_flags(w.path) == [int(b in complete) for b in range(5)]
        assert blocks.done and blocks.pending_blocks() == [] and blocks.pending_rows() == []
        w.finalise()
    with FeatureCache(tmp_path / "train.h5") as cache:
        np.testing.assert_array_equal(cache.load_embeds(), data["embeds"])
        np.testing.assert_array_equal(cache.read_tokens(np.arange(37)), data["tokens"])
    assert same_file(tmp_path / "train.h5", write_cache(tmp_path / "ref.h5", data))


def test_block_writer_reopened_resumes_at_the_first_unfinished_block(tmp_path):
    data = make_data(37)
    with open_writer(tmp_path / "train.h5", data) as w:
        blocks = BlockWriter(w)
        assert feed(blocks, data, [*range(8, 16), 3, 2, *range(33, 37)]) == [1]  # block 1 whole, 0 and 4 partly
    with open_writer(tmp_path / "train.h5", data) as w:  # as after a kill: buffered rows are lost
        blocks = BlockWriter(w)
        assert blocks.pending_blocks() == [0, 2, 3, 4]
        assert blocks.pending_rows() == [*range(0, 8), *range(16, 37)]
        assert feed(blocks, data, range(32, 37)) == [4]  # the last block: its 5 rows complete it
        assert feed(blocks, data, blocks.pending_rows()[::-1]) == [0, 2, 3]
        assert blocks.done
        w.finalise()
    assert same_file(tmp_path / "train.h5", write_cache(tmp_path / "ref.h5", data))


def test_block_writer_of_a_shard_takes_split_rows(tmp_path):
    data = make_data(53, views=2)
    out = tmp_path / "train.h5"
    with open_writer(out, data, block_size=10, shard=(1, 2)) as w:  # rows 27..52
        blocks = BlockWriter(w)
        assert blocks.pending_rows() == list(range(27, 53))
        with pytest.raises(IndexError, match=r"\[27, 53\)"):
            feed(blocks, data, [26])
        assert feed(blocks, data, np.random.default_rng(0).permutation(np.arange(27, 53))) == [0, 1, 2]
        w.finalise()
    with FeatureCache(shard_path(out, 1)) as part:
        np.testing.assert_array_equal(part.load_embeds(), data["embeds"][27:53])


def test_block_writer_refuses_rows_twice_or_of_written_blocks(tmp_path):
    data = make_data(20)
    with open_writer(tmp_path / "train.h5", data) as w:
        blocks = BlockWriter(w)
        feed(blocks, data, range(8))
        with pytest.raises(ValueError, match=r"block 0 of .* \(from row 0\) is already written"):
            feed(blocks, data, [11, 3])
        feed(blocks, data, [9, 11])  # the refused call took none of its rows
        with pytest.raises(ValueError, match="row 11 of .* arrived twice"):
            feed(blocks, data, [12, 11])
        with pytest.raises(ValueError, match="row 10 of .* arrived twice"):
            feed(blocks, data, [10, 10])
        with pytest.raises(ValueError, match="needs tokens"):
            blocks.add([12], data["embeds"][[12]])
        with pytest.raises(ValueError, match="must have shape"):
            blocks.add([12, 13], data["embeds"][[12]], EncodedTokens(data["tokens"][[12]], None))
        assert feed(blocks, data, [8, 10, 12, 13, 14, 15]) == [1]
        assert blocks.pending_blocks() == [2]


# ----------------------------------------------------------------------------- crash safety

SPEC = {"rows": 600, "block": 20, "dim": 16, "tokens": (17, 48)}  # blocks < 64 KiB


def block_data(block: int) -> tuple[np.ndarray, np.ndarray]:
    start, stop = block * SPEC["block"], min((block + 1) * SPEC["block"], SPEC["rows"])
    rng = np.random.default_rng(1000 + block)
    embeds = rng.standard_normal((stop - start, SPEC["dim"])).astype(np.float16)
    return embeds, rng.standard_normal((stop - start,) + SPEC["tokens"]).astype(np.float16)


def spec_writer(path) -> FeatureWriter:
    rows = SPEC["rows"]
    return FeatureWriter.open(
        path, num_rows=rows, embed_dim=SPEC["dim"], token_shape=SPEC["tokens"],
        block_size=SPEC["block"], attrs=ATTRS, labels=np.arange(rows) % 4, classnames=CLASSES,
        paths=[f"img{i}.jpg" for i in range(rows)],
    )


def python_child(body: str) -> list[str]:
    """A ``python -c`` command that can import this module and ltclip, then runs ``body``."""
    prelude = f"import sys; sys.path[:0] = {[str(TESTS), str(TESTS.parent)]!r}; import test_store\n"
    return [sys.executable, "-c", prelude + body]


def run_writer(path, pause: float = 0.0) -> None:
    """The extraction loop the SIGKILL test interrupts (also run in-process as the reference)."""
    with spec_writer(path) as writer:
        print("open", len(writer.pending_blocks()), flush=True)
        for b in writer.pending_blocks():
            writer.write_block(b, *block_data(b))
            time.sleep(pause)
        writer.finalise()


def check_done_blocks(path) -> bool:
    """The file opens and every block recorded as done holds exactly its rows; is it complete?"""
    with FeatureCache(path, allow_incomplete=True) as cache, h5py.File(path, "r") as h5:
        embeds = cache.load_embeds()[:, 0]
        for b in np.flatnonzero(h5["done"][()]):
            expected_embeds, expected_tokens = block_data(b)
            rows = np.arange(b * SPEC["block"], b * SPEC["block"] + len(expected_embeds))
            assert np.array_equal(embeds[rows], expected_embeds)
            assert np.array_equal(cache.read_tokens(rows)[:, 0], expected_tokens)
        return cache.complete


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference.h5"
    run_writer(reference)
    path = tmp_path / "train.h5"
    command = python_child(f"test_store.run_writer({str(path)!r}, pause=0.004)")
    path.with_name("train.h5.partial").write_bytes(b"left by a run killed while creating the file")
    rng = random.Random(7)
    killed_mid_write = 0
    for _ in range(5):
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        pending = int(child.stdout.readline().split()[1])
        time.sleep(rng.uniform(0.0, 0.8) * pending * 0.004)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        complete = check_done_blocks(path)
        killed_mid_write += not complete
    assert killed_mid_write >= 3
    run_writer(path)
    assert check_done_blocks(path)
    assert same_file(path, reference)
    assert not path.with_name("train.h5.partial").exists()


def test_block_writes_change_raw_data_only(tmp_path):
    """After creation, writing blocks changes no byte outside embeds, tokens and done flags."""
    data = make_data(40, views=2)
    path = tmp_path / "train.h5"
    open_writer(path, data).close()
    before = np.fromfile(path, np.uint8)
    with h5py.File(path, "r") as h5:
        regions = [(h5[k].id.get_offset(), h5[k].id.get_storage_size())
                   for k in ("embeds", "tokens", "done")]
    with open_writer(path, data) as w:
        write_blocks(w, data, [3, 0, 1])
    after = np.fromfile(path, np.uint8)
    changed = np.flatnonzero(before != after)
    inside = np.zeros(len(changed), bool)
    for offset, size in regions:
        inside |= (changed >= offset) & (changed < offset + size)
    assert len(before) == len(after) and changed.size > 0 and inside.all()


def test_resume_refuses_other_features(tmp_path):
    data = make_data(40)
    path = tmp_path / "train.h5"
    with open_writer(path, data) as w:
        write_blocks(w, data, [0, 2])
    with pytest.raises(LtclipError, match=r"model='ViT-T'.*model='ViT-B'.*delete the file"):
        open_writer(path, data, attrs={**ATTRS, "model": "ViT-B"})
    with pytest.raises(LtclipError, match=r"extra=\(absent\), this run has extra=1"):
        open_writer(path, data, attrs={**ATTRS, "extra": 1})
    with pytest.raises(LtclipError, match="block_size=8, this run has block_size=16"):
        open_writer(path, data, block_size=16)
    with pytest.raises(LtclipError, match=r"token_dtype='float16', this run has token_dtype=\(absent\)"):
        open_writer(path, data, with_tokens=False)
    with pytest.raises(LtclipError, match="other labels"):
        open_writer(path, {**data, "labels": (data["labels"] + 1) % 4})
    with open_writer(path, data) as w:  # the same identity resumes
        assert w.pending_blocks() == [1, 3, 4]


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "train.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(LtclipError, match="delete it"):
        open_writer(path, make_data(10))
    with pytest.raises(LtclipError, match="delete it"):
        FeatureCache(path)
    with pytest.raises(LtclipError, match="does not exist"):
        FeatureCache(tmp_path / "missing.h5")


def test_incomplete_cache_is_refused(tmp_path):
    data = make_data(40)
    path = tmp_path / "train.h5"
    with open_writer(path, data) as w:
        write_blocks(w, data, [0, 1])
    with pytest.raises(LtclipError, match=r"incomplete \(2 of 5 blocks.*resume"):
        FeatureCache(path)
    with open_writer(path, data) as w:
        write_blocks(w, data)  # every block written, but not finalised
    with pytest.raises(LtclipError, match="incomplete"):
        FeatureCache(path)
    with FeatureCache(path, allow_incomplete=True) as cache:
        assert not cache.complete
        assert np.array_equal(cache.load_embeds(), data["embeds"])


def test_disk_full_then_rerun_completes(tmp_path, monkeypatch):
    data = make_data(50)
    reference = write_cache(tmp_path / "reference.h5", data)
    path = tmp_path / "train.h5"
    real_write = h5py.Dataset.write_direct

    def failing_write(self, source, source_sel=None, dest_sel=None):
        if self.name == "/tokens" and dest_sel.start == 3 * 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, source, source_sel, dest_sel)

    monkeypatch.setattr(h5py.Dataset, "write_direct", failing_write)
    with pytest.raises(LtclipError, match=r"^disk full while writing .*train.h5; free space"):
        write_cache(path, data)
    with h5py.File(path, "r") as h5:
        assert h5["done"][()].tolist() == [1, 1, 1, 0, 0, 0, 0]

    def broken_write(self, source, source_sel=None, dest_sel=None):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(h5py.Dataset, "write_direct", broken_write)
    with pytest.raises(LtclipError, match=r"cannot write .*Input/output error.*rerun"):
        write_cache(path, data)
    monkeypatch.undo()
    write_cache(path, data)
    assert same_file(path, reference)


@pytest.mark.slow  # ~1.8 s: a child process
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_real_write_failure_is_reported_and_resumable(tmp_path):
    """A real failing write() (file size limit): the error surfaces at once, the process exits
    cleanly, and the rerun completes the same file."""
    reference = tmp_path / "reference.h5"
    run_writer(reference)
    path = tmp_path / "train.h5"
    spec_writer(path).close()  # created at full (sparse) size before the limit applies
    command = python_child(
        "import resource, signal\n"
        "from ltclip.core.errors import LtclipError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({reference.stat().st_size // 2}, -1))\n"
        f"try:\n    test_store.run_writer({str(path)!r})\n"
        "except LtclipError as err:\n    print('ERROR', err)\n"
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ERROR cannot write" in done.stdout and "File too large" in done.stdout
    assert not check_done_blocks(path)
    with h5py.File(path, "r") as h5:
        assert 0 < h5["done"][()].sum() < h5["done"].size
    run_writer(path)
    assert same_file(path, reference)


@pytest.mark.slow  # ~1.6 s: a child process
def test_file_being_written_is_refused_elsewhere(tmp_path):
    path = tmp_path / "train.h5"
    with spec_writer(path):
        body = (
            "from ltclip.core.errors import LtclipError\n"
            "path = sys.argv[1]\n"
            "for attempt in (lambda: test_store.spec_writer(path),\n"
            "                lambda: test_store.FeatureCache(path, allow_incomplete=True)):\n"
            "    try:\n        attempt()\n    except LtclipError as err:\n        print(err)\n"
        )
        done = subprocess.run(python_child(body) + [str(path)], capture_output=True, text=True)
    assert done.stdout.count("is being written by another process") == 2, done.stdout + done.stderr


def test_non_finite_rows_are_refused(tmp_path):
    data = make_data(16)
    with open_writer(tmp_path / "x.h5", data) as w:
        with pytest.raises(LtclipError, match="non-finite embeds for rows 0..7"):
            w.write_block(0, np.full((8, 8), np.inf), data["tokens"][:8])
        assert w.pending_blocks() == [0, 1]


# ----------------------------------------------------------------------------- shards


def test_shard_ranges_tile_without_padding():
    for rows, world in [(10, 3), (7, 7), (100, 4)]:
        ranges = [shard_range(rows, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_join_shards_equals_single_process(tmp_path):
    data = make_data(53, views=2)
    single = write_cache(tmp_path / "single.h5", data, block_size=10)
    out = tmp_path / "train.h5"
    shards = [write_cache(out, data, block_size=10, shard=(r, 2), order_seed=r) for r in range(2)]
    assert shards == [shard_path(out, 0), shard_path(out, 1)]
    with FeatureCache(shards[1]) as part:
        assert (part.attrs["row_start"], part.attrs["row_stop"], part.num_rows) == (27, 53, 26)
    join_shards(shards, out)
    assert same_file(out, single)
    assert not any(s.exists() for s in shards)


def test_join_shards_refuses_missing_or_incomplete(tmp_path):
    data = make_data(40)
    out = tmp_path / "train.h5"
    shards = [shard_path(out, r) for r in range(3)]
    write_cache(out, data, shard=(0, 3))
    with open_writer(out, data, shard=(1, 3)) as w:
        write_blocks(w, data, [0])
    with pytest.raises(LtclipError, match=r"shard .*train.rank2.h5 is missing"):
        join_shards(shards, out)
    with pytest.raises(LtclipError, match=r"train.rank1.h5 is incomplete"):
        join_shards(shards[:2], out)
    with open_writer(out, data, shard=(1, 3)) as w:
        write_blocks(w, data)
        w.finalise()
    with pytest.raises(LtclipError, match="end at row 27 of 40: a shard is missing"):
        join_shards(shards[:2], out)
    write_cache(out, data, shard=(2, 3), attrs={**ATTRS, "model": "other"})
    with pytest.raises(LtclipError, match="model='ViT-T'.*model='other'"):
        join_shards(shards, out)
    assert all(s.exists() for s in shards) and not out.exists()


# ----------------------------------------------------------------------------- reader validation


def user_file(path, *, labels=(0, 1, 2), **attrs) -> Path:
    with h5py.File(path, "w") as h5:
        h5["embeds"] = np.zeros((len(labels), 4), np.float32)
        h5["labels"] = np.asarray(labels)
        h5.attrs.update({"schema_version": 1, "num_classes": 3, **attrs})
    return path


def test_reader_refuses_bad_files(tmp_path):
    with pytest.raises(LtclipError, match=r"schema_version 3 but ltclip .* reads up to 2; upgrade"):
        FeatureCache(user_file(tmp_path / "a.h5", schema_version=3))
    with pytest.raises(LtclipError, match=r"label 3 of row 1 is outside \[0, 3\)"):
        FeatureCache(user_file(tmp_path / "b.h5", labels=(0, 3, 1)))
    with pytest.raises(LtclipError, match=r"label -1 of row 0"):
        FeatureCache(user_file(tmp_path / "c.h5", labels=(-1, 0, 1)))
    with pytest.raises(LtclipError, match="num_classes"):
        FeatureCache(user_file(tmp_path / "d.h5", num_classes=0))
    path = user_file(tmp_path / "e.h5")
    with h5py.File(path, "a") as h5:
        del h5.attrs["schema_version"]
    with pytest.raises(LtclipError, match=r"schema_version \(absent\)"):
        FeatureCache(path)
    with h5py.File(path, "a") as h5:
        h5.attrs["schema_version"] = 1
        h5["tokens"] = np.zeros((2, 3, 4), np.float16)
    with pytest.raises(LtclipError, match="tokens shape"):
        FeatureCache(path)


def test_expect_names_the_differing_attribute(tmp_path):
    with FeatureCache(write_cache(tmp_path / "a.h5", make_data(9))) as cache:
        cache.expect(model="ViT-T", image_size=32)
        with pytest.raises(LtclipError, match=r"image_size=32 but this run uses image_size=64"):
            cache.expect(model="ViT-T", image_size=64)
        with pytest.raises(LtclipError, match=r"made with manifest_sha256=\(absent\)"):
            cache.expect(manifest_sha256="abc")


# ----------------------------------------------------------------------------- text embeddings


def test_text_embeddings_round_trip_and_validation(tmp_path):
    embeds = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    path = save_text_embeddings(tmp_path / "text.h5", embeds, CLASSES, templates, ATTRS)
    loaded = load_text_embeddings(path)
    assert np.array_equal(loaded.embeds, embeds) and loaded.embeds.dtype == np.float32
    assert loaded.classnames == CLASSES and loaded.templates == templates
    assert loaded.attrs["model"] == "ViT-T" and loaded.attrs["num_classes"] == 4
    assert not path.with_name("text.h5.partial").exists()

    with pytest.raises(LtclipError, match="holds 'text_embeddings', not 'features'"):
        FeatureCache(path)
    with pytest.raises(LtclipError, match="holds 'features', not 'text_embeddings'"):
        load_text_embeddings(write_cache(tmp_path / "train.h5", make_data(9)))
    with h5py.File(path, "a") as h5:
        h5.attrs["num_classes"] = 5
    with pytest.raises(LtclipError, match="do not match num_classes=5"):
        load_text_embeddings(path)
    with pytest.raises(ValueError):
        save_text_embeddings(tmp_path / "bad.h5", embeds[:3], CLASSES, templates, ATTRS)


def test_chunked_tokens_of_a_user_file_read_through_h5py(tmp_path):
    """Direct reads need a contiguous dataset; a chunked one is read through h5py, same rows."""
    rng = np.random.default_rng(5)
    tokens = rng.standard_normal((12, 3, 4)).astype(np.float16)
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["embeds"] = tokens[:, 0]
        f["labels"] = np.arange(12) % 3
        f.create_dataset("tokens", data=tokens, chunks=(2, 3, 4), compression="gzip")
        f.attrs["schema_version"] = 1
        f.attrs["num_classes"] = 3
    idx = [7, 0, 7, 11, 3, 4]
    with FeatureCache(tmp_path / "train.h5") as cache:
        assert cache._raw_fd("tokens") is None
        np.testing.assert_array_equal(cache.read_tokens(idx)[:, 0], tokens[idx])
