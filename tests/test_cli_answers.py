"""A mistyped command answers at once: every case here is one error line (or help, or a list) from a
process that never imports torch. Timing is in benchmarks/bench_cli.py; here, the import itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ltclip.recipes.catalog import CATALOG_FILE, KINDS, build_catalog, catalog, registry

# (command line, exit code, what its one error line says; None: not an error)
CASES = [
    (["--help"], 0, None),
    (["train-head", "--help"], 0, None),
    (["list", "heads"], 0, None),
    (["list", "losses"], 0, None),
    (["list", "tuning"], 0, None),
    (["train-head", "-f", "typo", "-o", "r"], 2, "--features typo: no such cache folder"),
    (["train-head", "--from", "typo", "-o", "r", "--two-stage", "crt"], 2, "--from typo: no such run folder"),
    (["train-head", "-f", "cache", "-o", "r", "--from", "notrun", "--two-stage", "crt"], 2,
     "--from notrun: not a finished run (run.json missing)"),
    (["train-head", "-f", "cache", "-o", "r", "--head", "bogus"], 2, "--head 'bogus': unknown"),
    (["train-head", "-f", "cache", "-o", "r", "--loss", "focall"], 2, "--loss 'focall': unknown (did you mean focal?)"),
    (["train-head", "-f", "cache", "-o", "r", "--momentum", "5"], 2, "--momentum 5: must be in [0, 1)"),
    (["train-head", "-f", "cache", "-o", "r", "--epochs", "0"], 2, "--epochs 0: must be an integer >= 1"),
    (["finetune", "-o", "r", "--data-root", "typo"], 2, "--data-root typo: folder not found"),
    (["finetune", "-o", "r", "--pretrained", "typo.pt"], 2, "--pretrained typo.pt: checkpoint file not found"),
    (["finetune", "-o", "r", "--tune", "lorra"], 2, "--tune 'lorra': unknown (did you mean lora?)"),
    (["finetune", "-o", "r", "--lr", "-1"], 2, "--lr -1: must be > 0"),
    (["finetune", "-o", "r", "-d", "custom", "--train-list", "typo.txt"], 2, "--train-list typo.txt: file not found (looked in .)"),
    (["extract", "-o", "f", "--from-run", "typo"], 2, "--from-run typo: no such run folder"),
    (["extract", "-o", "f", "--manifest-dir", "typo"], 2, "--manifest-dir typo: folder not found"),
    (["extract", "-o", "f", "--classnames", "typo.txt"], 2, "--classnames typo.txt: file not found"),
    (["extract", "-o", "f", "--batch-size", "0"], 2, "--batch-size 0: must be an integer >= 1"),
    (["predict", "typo", "a.jpg"], 2, "typo: no such run folder"),
    (["predict", "run", "typo.jpg"], 2, "typo.jpg: no such file or folder"),
    (["predict", "--zero-shot", "-f", "typo", "a.jpg"], 2, "--features typo: no such cache folder"),
    (["export", "typo", "-o", "x.pt"], 2, "typo: no such run folder"),
    (["eval", "--zero-shot", "-f", "typo"], 2, "--features typo: no such cache folder"),
    (["eval", "--data-root", "typo", "run"], 2, "--data-root typo: folder not found"),
    (["sweep", "-f", "typo", "--grid", "lr=1,2"], 2, "--features typo: no such cache folder"),
    (["sweep", "-f", "cache", "--grid", "features=cache,typo"], 2, "--features typo: no such cache folder"),
]

# Runs every case in one process, in order; prints, per case, its exit code, stderr and whether torch was imported.
PROGRAM = """
import contextlib, io, json, sys
from ltclip.cli import app
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            app(args)
            code = 0
        except SystemExit as stop:
            code = stop.code
    out.append([code, err.getvalue(), "torch" in sys.modules])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_mistakes_answer_without_importing_torch(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "notrun").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    done = subprocess.run([sys.executable, "-c", PROGRAM, json.dumps([args for args, _, _ in CASES])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for (args, code, message), (exit_code, stderr, torch_loaded) in zip(CASES, json.loads(done.stdout)):
        assert not torch_loaded, f"ltclip {' '.join(args)} imported torch"
        assert exit_code == code, (args, stderr)
        if message is not None:
            lines = stderr.strip().splitlines()
            assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], (args, stderr)


@pytest.mark.parametrize("kind", KINDS)
def test_the_catalog_is_the_registries(kind):
    """``catalog.json`` (what `ltclip list` shows and option values are checked against, without torch)
    is what the registries say now; after registering a method, `make catalog` remakes it."""
    assert catalog()[kind] == build_catalog()[kind], f"{CATALOG_FILE} is stale: run `make catalog`"
    assert [entry["name"] for entry in catalog()[kind]] == registry(kind).names()
