"""A mistyped command answers at once: every case here is one error line (or help, or a list) from a
process that never imports torch. Timing is in benchmarks/bench_cli.py; here, the import itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ltclip.config import (
    EvalConfig, ExportConfig, ExtractConfig, FinetuneConfig, PredictConfig, TrainHeadConfig, flatten, from_flat,
    to_dict,
)
from ltclip.config.fields import option_fields
from ltclip.core.errors import LtclipError
from ltclip.recipes.catalog import CATALOG_FILE, KINDS, build_catalog, catalog, registry

# (command line, exit code, what its one error line says; None: not an error)
CASES = [
    (["--help"], 0, None),
    (["train-head", "--help"], 0, None),
    (["list", "heads"], 0, None),
    (["list", "losses"], 0, None),
    (["list", "tuning"], 0, None),
    (["list", "recipes"], 0, None),
    (["train-head", "-f", "typo", "-o", "r"], 2, "--features typo: no such cache folder"),
    (["train-head", "--from", "typo", "-o", "r", "--two-stage", "crt"], 2, "--from typo: no such run folder"),
    (["train-head", "-f", "cache", "-o", "r", "--from", "notrun", "--two-stage", "crt"], 2,
     "--from notrun: not a finished run (run.json missing)"),
    (["train-head", "-f", "cache", "-o", "r", "--head", "bogus"], 2, "--head 'bogus': unknown"),
    (["train-head", "-f", "cache", "-o", "r", "--loss", "focall"], 2, "--loss 'focall': unknown (did you mean focal?)"),
    (["train-head", "-f", "cache", "-o", "r", "--momentum", "5"], 2, "--momentum 5: must be in [0, 1)"),
    (["train-head", "-f", "cache", "-o", "r", "--epochs", "0"], 2, "--epochs 0: must be an integer >= 1"),
    (["train-head", "-f", "cache", "-o", "r", "--eval-every-epochs", "0"], 2, "--eval-every-epochs 0: must be an integer >= 1"),
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
    (["train-head", "-f", "cache", "-o", "r", "--head-opt", "bogus=1"], 2, "--head-opt 'bogus' is not an option of head 'decoder'"),
    (["train-head", "-f", "cache", "-o", "r", "--head", "linear", "--head-opt", "scale"], 2, "--head-opt 'scale' must look like key=value"),
    (["train-head", "-f", "cache", "-o", "r", "--loss", "focal", "--loss-opt", "gamma=abc"], 2, "--loss-opt gamma='abc': expected float"),
    (["finetune", "-o", "r", "--tune-opt", "rank=4"], 2, "--tune-opt 'rank' is not an option of tuning mode 'frozen'"),
    (["finetune", "-o", "r", "--recipe", "lift", "--tune-opt", "rank=4"], 2,
     "--tune-opt 'rank' is not an option of tuning mode 'adaptformer'"),
    (["train-head", "-f", "cache", "-o", "r", "--recipe", "imbalance-vlm", "--loss", "focal", "--loss-opt", "tau=1"], 2,
     "--loss-opt 'tau' is not an option of loss 'focal'"),
    (["finetune", "-o", "r", "--recipe", "lifft"], 2, "--recipe 'lifft': unknown (did you mean lift?)"),
    (["finetune", "-o", "r", "--precision", "fp64"], 2, "--precision 'fp64': choose one of fp32, bf16, fp16, amp"),
    (["finetune", "-o", "r", "--train-crop", "mdaa"], 2, "--train-crop 'mdaa': choose one of random, mda"),
    (["extract", "-o", "f", "--test-views", "five"], 2, "--test-views 'five': choose one of center, flip, fivecrop, tencrop"),
    (["extract", "-o", "f", "--decode", "gpu"], 2, "--decode 'gpu': choose one of cpu, device"),
    (["train-head", "-f", "cache", "-o", "r", "--optimizer", "adam"], 2, "--optimizer 'adam': choose one of adamw, sgd"),
    (["export", "run", "-o", "x.pt", "--format", "onnx"], 2, "--format 'onnx': choose one of torchscript, export"),
    (["train-head", "-f", "cache", "-o", "r", "--select", "acc"], 2,
     "--select 'acc': choose one of top1, balanced_accuracy, many, medium, few, nll, ece, last"),
    (["finetune", "-o", "r", "--select", "acc"], 2, "--select 'acc': choose one of"),
    (["train-head", "-f", "cache", "-o", "r", "--device", "gpu"], 2, "--device 'gpu': choose one of auto, cpu, cuda, cuda:N"),
    (["export", "run", "-o", "x.pt", "--device", "cuda:one"], 2, "--device 'cuda:one': choose one of auto, cpu, cuda, cuda:N"),
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
    built = json.loads(json.dumps(build_catalog()[kind], ensure_ascii=False))  # as the file holds it
    assert catalog()[kind] == built, f"{CATALOG_FILE} is stale: run `make catalog`"
    assert [entry["name"] for entry in catalog()[kind]] == registry(kind).names()


REQUIRED_VALUES = {"out": "o", "features": "f", "from_run": "r"}
FIXED = [(cls, name, spec) for cls in (ExtractConfig, TrainHeadConfig, FinetuneConfig, EvalConfig, PredictConfig, ExportConfig)
         for name, (_, spec) in option_fields(cls).items() if spec.one_of]


@pytest.mark.parametrize("cls, name, spec", FIXED, ids=[f"{cls.__name__}.{name}" for cls, name, _ in FIXED])
def test_every_fixed_value_option_takes_its_set_and_refuses_the_rest(cls, name, spec):
    """Every option declared ``one_of``: each of its values builds a config; any other is one line naming the flag."""
    required = {k: v for k, v in REQUIRED_VALUES.items() if k in option_fields(cls)}
    for value in (v.replace(":N", ":1") for v in spec.one_of):  # cuda:N stands for cuda:0, cuda:1, ...
        assert flatten(to_dict(from_flat(cls, {**required, name: value}, owner="test")))[name] == value
    for bogus in ("bogus", *(v for v in spec.one_of if v.endswith(":N")), *(v.replace(":N", ":x") for v in spec.one_of if ":N" in v)):
        with pytest.raises(LtclipError, match=f"^{spec.flag_of(name)} '{bogus}': choose one of {', '.join(spec.one_of)}$"):
            from_flat(cls, {**required, name: bogus}, owner="test")
