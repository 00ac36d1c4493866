"""Run every benchmark one after another (never side by side: they would time each other).

``python -m benchmarks.run_all [--quick]``; each benchmark prints its table and writes
``bench_out/<name>.json``.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("bench_cli", "bench_extract", "bench_train_head", "bench_streaming", "bench_token_cache", "bench_finetune", "bench_eval", "bench_learning", "bench_sweep")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for name in BENCHMARKS:
        print(f"\n## {name}\n", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(list(argv))


if __name__ == "__main__":
    main()
