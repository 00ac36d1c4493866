"""How fast the command line answers: mistakes, --help and `ltclip list`, against a bare ``import typer, rich``.

``python -m benchmarks.bench_cli [--repeats N] [--out DIR]``: each command runs as a fresh process,
the commands interleaved round by round (this machine is noisy, so each round times all of them
under the same load); prints the median wall time of each, its excess over the bare import, and
whether it imported torch; writes DIR/cli.json (default bench_out/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINES = {"import typer, rich": "import typer, rich", "import torch": "import torch"}
COMMANDS = {
    "ltclip --help": ["--help"],
    "ltclip train-head --help": ["train-head", "--help"],
    "ltclip list heads": ["list", "heads"],
    "ltclip list tuning": ["list", "tuning"],
    "ltclip list recipes": ["list", "recipes"],
    "train-head --features (missing)": ["train-head", "-f", "typo", "-o", "r"],
    "train-head --head (unknown)": ["train-head", "-f", "cache", "-o", "r", "--head", "bogus"],
    "train-head --momentum 5": ["train-head", "-f", "cache", "-o", "r", "--momentum", "5"],
    "train-head --lr abc": ["train-head", "-f", "cache", "-o", "r", "--lr", "abc"],
    "finetune --data-root (missing)": ["finetune", "-o", "r", "--data-root", "typo"],
    "finetune --tune (unknown)": ["finetune", "-o", "r", "--tune", "lorra"],
    "finetune --recipe lift --tune-opt (wrong key)": ["finetune", "-o", "r", "--recipe", "lift", "--tune-opt", "rank=4"],
    "train-head --device gpu": ["train-head", "-f", "cache", "-o", "r", "--device", "gpu"],
    "train-head --select acc": ["train-head", "-f", "cache", "-o", "r", "--select", "acc"],
    "extract --classnames (missing)": ["extract", "-o", "f", "--classnames", "typo.txt"],
    "predict RUN (missing)": ["predict", "typo", "a.jpg"],
    "export RUN (missing)": ["export", "typo", "-o", "x.pt"],
    "eval RUN (missing)": ["eval", "typo"],
}
# Run inside the timed process: the command, then whether torch was imported (on stderr's last line).
PROGRAM = ("import sys\nfrom ltclip.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
           "print('torch' in sys.modules, file=sys.stderr)")


def _time(argv: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    runs = {name: [sys.executable, "-c", code] for name, code in BASELINES.items()}
    runs |= {name: [sys.executable, "-c", PROGRAM, *cmd] for name, cmd in COMMANDS.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    torch_loaded: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cache").mkdir()
        for _ in range(repeats):
            for name, command in runs.items():
                seconds, last = _time(command, Path(tmp))
                times[name].append(seconds)
                torch_loaded[name] = last
    bare = statistics.median(times["import typer, rich"])
    rows = []
    print("| command | median s | over `import typer, rich` | imports torch |\n|---|---:|---:|---|")
    for name, values in times.items():
        median = statistics.median(values)
        loaded = torch_loaded[name] if name in COMMANDS else ("yes" if "torch" in name else "no")
        rows.append({"command": name, "median_s": median, "over_bare_s": median - bare, "imports_torch": loaded})
        print(f"| {name} | {median:.2f} | {median - bare:+.2f} | {'yes' if loaded in ('True', 'yes') else 'no'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli.json").write_text(json.dumps({"repeats": repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
