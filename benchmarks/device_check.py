"""One prepared device measurement: extract, decoder, finetune, prompt tuning and kNN, side by side.

Run as ``python -m benchmarks.device_check --size tiny|full --out DIR [--parts extract,decoder,...]
[--device auto]``; writes DIR/device_check.json and DIR/device_check.md. Made for a GPU available
for a few minutes: ``--size full`` fits 8 minutes on one H100, ``--size tiny`` runs on a CPU.

- ``extract``: images/s of ``run_extract`` against the raw forward of the same (pre-decoded) images and
  the input pipeline alone (JPEG decode + resize through ``ImageSplit`` and a DataLoader with the workers
  extract picks, no model), on 256×256 noise JPEGs, at the precision a user would pick (bf16 on CUDA
  when supported, else fp16; fp32 on a CPU).
- ``decoder``: one epoch of the paper's decoder head from a random token cache (``run_train_head``)
  against the paper's way (the frozen encoder's forward at every step, then the decoder).
- ``finetune``: step time and peak memory of ``--tune`` frozen, adaptformer (LIFT's), lora, vpt-deep and
  full, built as ``ltclip finetune`` does, ``--precision amp``, images already in memory.
- ``prompt``: the ``prompt`` head (text prompt tuning, its default options) against the class count.
- ``faiss``: exact kNN search (``retrieval.search``) with faiss (a GPU index when faiss has GPU support)
  against the torch fallback, same queries and database.

Weights are random (``--pretrained none``): speed does not depend on them. Each part runs under its own
time cap (SIGALRM): past it, the rows measured so far are kept and the part says it was stopped; a
missing dependency, an out-of-memory error or any other error becomes a note (the traceback goes to
stderr) and the run goes on. DIR's files are rewritten after every part, so a run stopped from outside
keeps the parts it finished. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's RSS (sampled every 5 ms) on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import signal
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.device_parts import device_info, part_decoder, part_extract, part_faiss, part_finetune, part_prompt

TINY = "ltclip-tiny-vit"
FUNCTIONS = {"extract": part_extract, "decoder": part_decoder, "finetune": part_finetune, "prompt": part_prompt,
             "faiss": part_faiss}
PARTS = tuple(FUNCTIONS)
SIZES = {
    "full": {"extract_model": "ViT-B-16", "extract_images": 4096, "extract_batch": 256,
             "decoder_models": ("ViT-B-16", "ViT-L-14"), "decoder_rows": 2048, "decoder_classes": 1000, "decoder_batch": 128,
             "tune_model": "ViT-B-16", "tune_batch": 128, "tune_steps": 5, "prompt_classes": (100, 1000, 8142),
             "knn": {"queries": 10_000, "database": 100_000, "dim": 512, "k": 10},
             "caps_s": {"extract": 100, "decoder": 150, "finetune": 110, "prompt": 60, "faiss": 30}},
    "tiny": {"extract_model": TINY, "extract_images": 256, "extract_batch": 64,
             "decoder_models": (TINY,), "decoder_rows": 256, "decoder_classes": 10, "decoder_batch": 32,
             "tune_model": TINY, "tune_batch": 8, "tune_steps": 8, "prompt_classes": (10, 50),
             "knn": {"queries": 1000, "database": 20_000, "dim": 64, "k": 10},
             "caps_s": {"extract": 60, "decoder": 60, "finetune": 60, "prompt": 40, "faiss": 20}},
    "test": {"extract_model": TINY, "extract_images": 8, "extract_batch": 4,
             "decoder_models": (TINY,), "decoder_rows": 16, "decoder_classes": 4, "decoder_batch": 8,
             "tune_model": TINY, "tune_batch": 2, "tune_steps": 2, "prompt_classes": (4,),
             "knn": {"queries": 20, "database": 200, "dim": 16, "k": 5},
             "caps_s": {"extract": 30, "decoder": 30, "finetune": 30, "prompt": 30, "faiss": 30}},
}


class PartStopped(Exception):
    """A part ran past its time cap."""


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise :class:`PartStopped` in the block once ``seconds`` have passed (main thread only)."""
    def stop(signum, frame):
        raise PartStopped

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)



def run_part(fn, cap_s: float, *args) -> tuple[dict, list]:
    """Run one part under its cap: its rows and ``{status, wall_s, cap_s, notes}``; never raises for a
    cap, a missing dependency, a device out of memory or an error of the part (status "failed": the
    next parts still run on the few minutes a device is lent for)."""
    rows, notes = [], []
    t = time.perf_counter()
    status = "done"
    try:
        with time_cap(cap_s):
            fn(*args, rows, notes)
    except PartStopped:
        status = "stopped"
        notes.append(f"stopped at its {cap_s:.0f} s cap; the rows before it are kept")
    except ImportError as err:
        status = "skipped"
        notes.append(f"missing dependency: {err}")
    except torch.cuda.OutOfMemoryError:
        status = "stopped"
        notes.append("out of device memory")
        torch.cuda.empty_cache()
    except Exception as err:
        status = "failed"
        traceback.print_exc()
        notes.append(f"failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
    return {"status": status, "wall_s": time.perf_counter() - t, "cap_s": cap_s, "notes": notes}, rows


def markdown(report: dict) -> str:
    d = report["device"]
    where = d.get("gpu") or f"CPU ({d['cpu_model']})"
    lines = [f"{where}, {d['cpu_count']} CPUs (load average {d['loadavg'][0]:.1f}), torch {d['torch']} (CUDA {d['cuda']}), {d['date_utc']}; "
             f"size {report['size']}, {report['wall_s']:.0f} s in all.", "",
             "| part | case | method | result | peak memory MiB | relative |", "|---|---|---|---:|---:|---|"]
    for r in report["rows"]:
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        lines.append(f"| {r['part']} | {r['case']} | {r['method']} | {r['value']:,.3g} {r['unit']} | {peak} | {r['relative']} |")
    lines.append("")
    for name, p in report["parts"].items():
        lines.append(f"- {name}: {p['status']}, {p['wall_s']:.1f} s of a {p['cap_s']:.0f} s cap"
                     + "".join(f"; {n}" for n in p["notes"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from ltclip.core.distributed import DistContext, resolve_device
    from ltclip.models.backbone import register_tiny_configs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="folder for device_check.json and device_check.md")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    size = SIZES[args.size]
    device = resolve_device(args.device, DistContext())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger().setLevel(logging.ERROR)  # random-weights warnings
    register_tiny_configs()
    caps = {p: size["caps_s"][p] for p in parts}
    print(f"device_check --size {args.size} on {device}: planned at most "
          + ", ".join(f"{p} {s} s" for p, s in caps.items()) + f" = {sum(caps.values())} s", flush=True)
    start = time.perf_counter()
    report: dict = {"size": args.size, "settings": {k: v for k, v in size.items() if k != "caps_s"}, "planned_s": caps,
                    "device": device_info(device), "parts": {}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        for name in parts:
            work = Path(tmp) / name
            work.mkdir()
            report["parts"][name], rows = run_part(FUNCTIONS[name], caps[name], size, device, work)
            report["rows"] += rows
            p = report["parts"][name]
            print(f"{name}: {p['status']} in {p['wall_s']:.1f} s" + "".join(f"; {n}" for n in p["notes"]), flush=True)
            save(report, args.out, time.perf_counter() - start)
    print(markdown(report))
    return report


def save(report: dict, out: Path, wall_s: float) -> None:
    """Write (again) DIR/device_check.json and .md with the parts done so far."""
    report["wall_s"] = wall_s
    report["device"]["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "device_check.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
