"""Head training on a token cache larger than memory: streamed vs in RAM, and the reader alone.

Run as ``python -m benchmarks.bench_streaming [--quick] [--out DIR]``; prints a Markdown table and
writes DIR/streaming.json (default bench_out/).

A synthetic token cache written with ``FeatureWriter`` (full: 20,000 × 197 × 128 float16, 1 GB) is
trained on for a fixed number of steps by ``run_train_head`` (the engine's loop, ``ltclip.engine.fit``)
with ``max_ram`` = 1/4 of the cache (streamed) and without a cap (in RAM), each in its own process
(started through a forking shell, so its ``ru_maxrss`` is its own, not this process's): peak RSS
(psutil, every 5 ms), ``ru_maxrss`` and VmHWM, and steady-state batches/s (step ends taken from the
engine's progress callbacks). The reader alone (``FeatureInputs.batches`` without a model) is
measured the same way, in the stage's order (the instance sampler's permutation) and in contiguous
rows, next to a reference reader that is not the stage's (one ``os.preadv`` per row at the
dataset's file offset), in the block-shuffled order of ``train-head --read-blocks`` (training
too), and once with the prefetch thread off (``prefetch=0``: the same batches,
read in the consumer's thread). *Cold* runs drop the file from the page cache first
(``posix_fadvise(DONTNEED)``), *warm* runs read it whole first; the file's page-cache residency
(``mincore``) before each run and the bytes the process really read from the block device
(``read_bytes`` in ``/proc/self/io``) are reported, so a page-cache-fed number cannot pass for a
disk-fed one. Each training measurement runs three times, interleaved with the others, and the
table shows the median (all three in brackets): single runs of a few dozen steps varied by ±20 %
on this VM. The virtual disk's host may cache too; read_bytes only shows what this machine's
kernel fetched from the device.

Timings need a quiet machine (torch's intra-op threads slow down badly on busy cores): the table shows how many cores
other processes kept busy during each run (from /proc/stat) and warns when it exceeds 0.5.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import mmap
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_eval import PeakRSS, machine_info
from benchmarks.timing import OtherLoad, StepTimer, add_child_options, loadavg, run_child, serve_child
from ltclip.config import TrainHeadConfig, from_flat

FULL = {"rows": 20_000, "tokens": 197, "width": 128, "embed_dim": 64, "classes": 100, "block_size": 1024,
        "batch_size": 64, "train_steps": 96, "reader_batches": 100, "skip_steps": 2, "ram_fraction": 0.25,
        "reader_runs": True}
QUICK = {"rows": 2_000, "tokens": 197, "width": 128, "embed_dim": 64, "classes": 100, "block_size": 256,
         "batch_size": 32, "train_steps": 5, "reader_batches": 20, "skip_steps": 2, "ram_fraction": 0.25,
         "reader_runs": False}
MiB = 2**20
BLOCK_ORDER = (64, 16)  # train-head --read-blocks 64 --shuffle-pool 16: pools of 1,024 rows (3 fit in max_ram)
TRAIN_REPEATS = 3  # each training measurement runs this many times; the table shows the median
VIT_B16_BATCH_BYTES = 256 * 197 * 768 * 2  # one batch of ViT-B/16 token sequences, float16

# ------------------------------------------------------------------ page cache and disk reads


def page_cache_fraction(path: Path) -> float | None:
    """Fraction of ``path``'s pages resident in this machine's page cache (``mincore``), or None."""
    size = path.stat().st_size
    if size == 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(addr, size, vec)
        libc.munmap(addr, size)
        return None if rc != 0 else float((np.frombuffer(vec, np.uint8) & 1).mean())
    finally:
        os.close(fd)


def drop_page_cache(path: Path) -> None:
    """Write back and evict ``path`` from the page cache (cold reads follow)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MiB):
            pass


def vm_hwm_mib() -> float | None:
    """The kernel's high-water mark of this process's resident memory (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def device_read_bytes() -> int | None:
    """Bytes this process has caused to be fetched from the block device so far."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ streamed vs in-RAM


def write_stream_cache(path: Path, s: dict) -> dict:
    from ltclip.artifacts.store import FeatureWriter

    rng = np.random.default_rng(0)
    rows, classes = s["rows"], s["classes"]
    labels = rng.permutation(np.arange(rows) % classes)
    writer = FeatureWriter.open(
        path, num_rows=rows, embed_dim=s["embed_dim"], block_size=s["block_size"],
        attrs={"dataset": "bench-stream", "model": "synthetic", "split": "train"}, labels=labels,
        classnames=[f"class {i}" for i in range(classes)], token_shape=(s["tokens"], s["width"]),
    )
    t = time.perf_counter()
    with writer:
        for block in writer.pending_blocks():
            lo, hi = writer.block_range(block)
            tokens = rng.standard_normal((hi - lo, s["tokens"], s["width"]), dtype=np.float32).astype(np.float16)
            embeds = rng.standard_normal((hi - lo, s["embed_dim"]), dtype=np.float32).astype(np.float16)
            writer.write_block(block, embeds, tokens)
        writer.finalise()
    return {"write_s": time.perf_counter() - t, "file_bytes": path.stat().st_size,
            "token_bytes": rows * s["tokens"] * s["width"] * 2}


def pread_batches(cache, order: np.ndarray, batch: int):
    """Reference reader, not the stage's: the same batches as a streamed ``FeatureInputs.batches``
    (same prefetch thread, float32 output), but each row read with one ``os.preadv`` straight from
    the contiguous dataset's file offset instead of one h5py read per row."""
    import h5py

    from ltclip.artifacts.feature_batches import _prefetched

    with h5py.File(cache.path, "r") as f:
        ds = f["tokens"]
        offset, row_shape = ds.id.get_offset(), ds.shape[1:]
    row_bytes = int(np.prod(row_shape)) * 2
    fd = os.open(cache.path, os.O_RDONLY)

    def load(start: int):
        idx = order[start : start + batch]
        buf = np.empty((len(idx), *row_shape), np.float16)
        for i, row in enumerate(idx.tolist()):
            os.preadv(fd, [memoryview(buf[i]).cast("B")], offset + row * row_bytes)
        return torch.from_numpy(buf).float(), torch.from_numpy(cache.labels[idx]), idx

    try:
        yield from _prefetched(load, range(0, len(order), batch), 2)
    finally:
        os.close(fd)


def child_main(spec: dict) -> dict:
    """One streamed/in-RAM measurement in a fresh process (so RSS and ru_maxrss are its own)."""
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from ltclip.artifacts.feature_batches import FeatureInputs
    from ltclip.data.samplers import BlockShuffledSampler, create_sampler
    from ltclip.stages.common import read_ahead
    from ltclip.stages.train_head import run_train_head
    from ltclip.artifacts.store import FeatureCache

    s, features = spec["stream"], Path(spec["features"])
    max_ram = spec["max_ram"]
    out: dict = {}
    io0 = device_read_bytes()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if spec["what"] == "train":
            timer = StepTimer()
            cfg = from_flat(TrainHeadConfig, {
                "features": str(features), "out": spec["out"], "head": "decoder", "epochs": 1,
                "steps": s["train_steps"], "batch_size": s["batch_size"], "device": "cpu", "seed": 0,
                "max_ram": None if max_ram is None else str(max_ram),
                **({"read_blocks": BLOCK_ORDER[0], "shuffle_pool": BLOCK_ORDER[1]} if spec["order"] == "blocks" else {})},
                owner="bench_streaming")
            info = run_train_head(cfg, timer)["info"]
            ends = timer.epochs[0]["step_ends_s"]
            skip = s["skip_steps"]
            out.update(in_ram=info["inputs_in_ram"], steps=len(ends), setup_s=timer.epochs[0]["start_s"],
                       steady_batches_per_s=(len(ends) - skip) / (ends[-1] - ends[skip - 1]),
                       first_steps_s=ends[:skip], epoch_cpu_s=timer.epochs[0]["cpu_s"])
        else:
            cache = FeatureCache(features / "train.h5")
            inputs = FeatureInputs(cache, "tokens", max_ram)
            setup = time.perf_counter() - t0
            k, batch = s["reader_batches"], s["batch_size"]
            ahead = 1
            if spec["order"] == "contiguous":
                start = int(np.random.default_rng(1).integers(0, cache.num_rows - k * batch + 1))
                order = np.arange(start, start + k * batch)
            else:  # the stage's order: the instance sampler's permutation, block-shuffled as --read-blocks does
                sampler = create_sampler("instance", cache.labels, cache.num_classes, seed=0, total_epochs=1)
                if spec["order"] == "blocks":
                    sampler, ahead = BlockShuffledSampler(sampler, *BLOCK_ORDER), read_ahead(BLOCK_ORDER, batch)
                sampler.set_epoch(0)
                order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))[: k * batch]
            marks = []
            tb = time.perf_counter()
            if spec["via"] == "pread":
                batches = pread_batches(cache, order, batch)
            else:
                batches = inputs.batches(order, batch, np.zeros(len(order), np.int64), prefetch=spec.get("prefetch", 2),
                                         read_ahead=ahead)
            for x, _, _ in batches:
                marks.append(time.perf_counter())
            skip = 1
            out.update(in_ram=inputs.in_ram and spec["via"] != "pread", batches=len(marks), setup_s=setup,
                       steady_batches_per_s=(len(marks) - skip) / (marks[-1] - marks[skip - 1]),
                       first_batch_s=marks[0] - tb, mib_per_s=(len(marks) - skip) * batch * inputs.nbytes
                       / cache.num_rows / (marks[-1] - marks[skip - 1]) / MiB)
            cache.close()
        out["wall_s"] = time.perf_counter() - t0
    io1 = device_read_bytes()
    out.update(rss_start_mib=mem.start_mib, peak_rss_mib=mem.peak_mib,
               ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, vm_hwm_mib=vm_hwm_mib(),
               device_read_mib=None if io0 is None or io1 is None else (io1 - io0) / MiB)
    return out


def bench_stream(s: dict, work: Path, threads: int) -> dict:
    root = work / "stream"
    root.mkdir()
    path = root / "train.h5"
    free = shutil.disk_usage(work).free
    written = write_stream_cache(path, s)
    cap = int(written["token_bytes"] * s["ram_fraction"])
    runs = [
        # (label, what, cache state, order, max_ram, reader)
        ("reader, streamed, cold", "reader", "cold", "sampler", cap, "stage"),
        ("reader, streamed, cold, contiguous rows", "reader", "cold", "contiguous", cap, "stage"),
        ("reader, streamed, warm", "reader", "warm", "sampler", cap, "stage"),
        ("reader, streamed, warm, no prefetch thread", "reader", "warm", "sampler", cap, "stage-sync"),
        ("reader, in RAM", "reader", "warm", "sampler", None, "stage"),
        ("reference reader (os.preadv per row), cold", "reader", "cold", "sampler", cap, "pread"),
        ("reference reader (os.preadv per row), warm", "reader", "warm", "sampler", cap, "pread"),
        ("reader, streamed, cold, block-shuffled", "reader", "cold", "blocks", cap, "stage"),
        ("train, streamed, cold", "train", "cold", "sampler", cap, "stage"),
        ("train, streamed, cold, block-shuffled", "train", "cold", "blocks", cap, "stage"),
        ("train, streamed, warm", "train", "warm", "sampler", cap, "stage"),
        ("train, in RAM", "train", "warm", "sampler", None, "stage"),
    ]
    if not s["reader_runs"]:
        runs = [r for r in runs if r[1] != "reader"]
    results = {label: [] for label, *_ in runs}
    repeats = [(r, rep) for rep in range(TRAIN_REPEATS) for r in runs if rep == 0 or r[1] == "train"]  # interleaved
    for i, ((label, what, state, order, max_ram, via), rep) in enumerate(repeats):
        (drop_page_cache if state == "cold" else warm_page_cache)(path)
        resident = page_cache_fraction(path)
        spec = {"label": label, "what": what, "order": order, "max_ram": max_ram, "via": via.removesuffix("-sync"),
                "prefetch": 0 if via.endswith("-sync") else 2, "stream": s,
                "threads": threads,
                "features": str(root), "out": str(work / f"stream_run_{i}")}
        load = loadavg()
        with OtherLoad() as other:
            r = run_child("benchmarks.bench_streaming", spec, spec["label"])
        results[label].append({**r, "what": what, "cache_state": state, "order": order, "max_ram": max_ram,
                               "page_cache_before": resident, "page_cache_after": page_cache_fraction(path),
                               "loadavg_before": load, "loadavg_after": loadavg(), "other_cores": other.cores})
    results = {label: _median_run(tries) for label, tries in results.items()}
    for label, r in results.items():
        r["vs_in_ram"] = r["steady_batches_per_s"] / results[f"{r['what']}, in RAM"]["steady_batches_per_s"]
    return {"free_bytes_before": free, **written, "max_ram": cap, "runs": results}


def _median_run(tries: list[dict]) -> dict:
    """The try with the median steady rate (every try's rate kept beside it)."""
    ranked = sorted(tries, key=lambda t: t["steady_batches_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "tries_batches_per_s": [t["steady_batches_per_s"] for t in tries]}


def stream_table(report: dict) -> str:
    st = report["stream"]
    rows = [
        "| run | inputs | file in page cache before | MiB read from device | steady batches/s (MiB/s) | vs in RAM "
        "| set-up s | peak RSS MiB (start) | ru_maxrss MiB (VmHWM) | cores busy with other work |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for label, r in st["runs"].items():
        rate = f"{r['steady_batches_per_s']:.2f}"
        if len(r["tries_batches_per_s"]) > 1:
            rate += " [" + ", ".join(f"{v:.2f}" for v in r["tries_batches_per_s"]) + "]"
        if r.get("mib_per_s") is not None:
            rate += f" ({r['mib_per_s']:,.0f})"
        rows.append(
            f"| {label} | {'in RAM' if r['in_ram'] else 'streamed'} | {fmt(r['page_cache_before'], '.0%')} "
            f"| {fmt(r['device_read_mib'], ',.0f')} | {rate} | {r['vs_in_ram']:.2f} "
            f"| {r['setup_s']:.1f} | {r['peak_rss_mib']:,.0f} ({r['rss_start_mib']:,.0f}) "
            f"| {r['ru_maxrss_mib']:,.0f} ({fmt(r['vm_hwm_mib'], ',.0f')}) | {r['other_cores']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for streaming.json")
    add_child_options(parser)
    args = parser.parse_args(argv)
    if serve_child(args, child_main):
        return {}
    s = QUICK if args.quick else FULL
    logging.getLogger().setLevel(logging.ERROR)
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_streaming_", dir="/tmp") as tmp:
        st = bench_stream(s, Path(tmp), torch.get_num_threads())
    machine = {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "tmp_free_gib_before": st["free_bytes_before"] / 2**30}
    report = {"size": s, "machine": machine, "wall_s": time.perf_counter() - start, "stream": st}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{machine['cpu_model']}, {machine['nproc']} cores, torch {machine['torch']} ({torch.get_num_threads()} "
          f"threads); load average {load_before[0]:.1f} before, {machine['loadavg_after'][0]:.1f} after; "
          f"{machine['tmp_free_gib_before']:.0f} GiB free on /tmp; {report['wall_s']:.0f} s in all\n")
    print(f"Decoder on a {st['file_bytes'] / MiB:,.0f} MiB token cache ({s['rows']:,} × {s['tokens']} × "
          f"{s['width']} float16), streamed with max_ram {st['max_ram'] / MiB:,.0f} MiB; batch {s['batch_size']}, "
          f"{s['train_steps']} train steps / {s['reader_batches']} reader batches, first {s['skip_steps']} "
          "train steps (1 reader batch) excluded from batches/s:\n")
    print(stream_table(report))
    batch_mib = VIT_B16_BATCH_BYTES / MiB
    rates = {label: r["mib_per_s"] / batch_mib for label, r in st["runs"].items() if r.get("mib_per_s")}
    if rates:
        print(f"\nAt these read rates one ViT-B/16 token batch (256 × 197 × 768 float16 = {batch_mib:.0f} MiB) "
              "arrives " + ", ".join(f"{v:.1f}/s ({k})" for k, v in rates.items()) + ".")
    busy = {k: v["other_cores"] for k, v in st["runs"].items() if v["other_cores"] > 0.5}
    if busy:
        print("\nWARNING: other processes kept cores busy during: "
              + ", ".join(f"{k} ({v:.1f})" for k, v in busy.items())
              + f"; torch's {torch.get_num_threads()} intra-op threads slow down badly when the cores are "
              "oversubscribed, so those timings are distorted: rerun on a quiet machine (or with --threads 1).")
    return report


if __name__ == "__main__":
    main()
