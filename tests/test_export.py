"""`ltclip export`: one file (TorchScript or torch.export) whose logits are `ltclip.load(RUN).model`'s, loadable
with plain torch, its metadata (class names, preprocessing) enough to reproduce `ltclip predict`; LoRA merged
into the weights; refusals as one-line errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import ltclip
from conftest import TINY_MODEL
from test_predict import invoke, ok, one_error_line, test_images, world  # noqa: F401  (world: the fixture)

RTOL = 1e-5


@pytest.fixture(scope="module")
def lora_run(synthetic_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "lora"
    ok("finetune", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
       "--tune", "lora", "--head", "linear", "--epochs", "1", "--batch-size", "32", "--lr", "1e-2", "--workers", "0",
       "--device", "cpu", "--out", run)
    return run


def load_export(path: Path) -> tuple[torch.nn.Module, dict]:
    """The model and metadata of an exported file, read with torch alone."""
    files = {"ltclip.json": ""}
    if path.suffix == ".pt2":
        model = torch.export.load(str(path), extra_files=files).module()
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
            model = torch.jit.load(str(path), _extra_files=files)
    return model, json.loads(files["ltclip.json"])


def stored_preprocessing(meta: dict) -> T.Compose:
    """The preprocessing docs/predict.md tells another program to apply, built from the metadata alone."""
    p = meta["preprocess"]
    return T.Compose([T.Resize(p["resize"], interpolation=T.InterpolationMode(p["interpolation"])), T.CenterCrop(p["size"]),
                      T.ToTensor(), T.Normalize(p["mean"], p["std"])])


def assert_export_is_the_classifier(path: Path, clf, images: list[Path]) -> dict:
    """Same logits as ``clf.model`` on the same inputs at batch sizes other than the traced one, and with the
    stored preprocessing applied to image files, the logits `ltclip predict` computes on them."""
    exported, meta = load_export(path)
    assert meta["classnames"] == clf.classnames and meta["num_classes"] == len(clf.classnames) == 10
    height, width = meta["preprocess"]["size"]
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
            expected = clf.model(x)
            np.testing.assert_allclose(exported(x).numpy(), expected.numpy(), rtol=RTOL, atol=RTOL * float(expected.abs().max()))
        x = torch.stack([stored_preprocessing(meta)(Image.open(p).convert("RGB")) for p in images])
        got = exported(x).numpy()
    reference = clf.logits(images)
    np.testing.assert_allclose(got, reference, rtol=RTOL, atol=RTOL * float(np.abs(reference).max()))
    return meta


@pytest.mark.slow  # runs trained on a cache (the predict fixture) and three exports: ~15 s
@pytest.mark.parametrize("kind", ["linear", "decoder", "lws", "zero-shot"])
def test_a_cache_run_exports_to_torchscript_with_the_same_logits(world, synthetic_root, kind, tmp_path):
    out = tmp_path / "model.pt"
    if kind == "zero-shot":
        ok("export", "--zero-shot", "--features", world["cache"], "--out", out)
        clf = ltclip.load(features=world["cache"], device="cpu")
    else:
        ok("export", world["runs"][kind], "--out", out, "--batch-size", "3")
        clf = ltclip.load(world["runs"][kind], device="cpu")
    meta = assert_export_is_the_classifier(out, clf, test_images(synthetic_root)[:12])
    assert meta["format"] == "torchscript" and meta["lora_weights_merged"] == 0
    keys = list(load_export(out)[0].state_dict())
    assert any(".conv1." in k for k in keys) and not [k for k in keys if "token_embedding" in k or "text_projection" in k]
    assert meta["source"]["kind"] == {"linear": "head", "decoder": "head", "lws": "second_stage"}.get(kind, kind)
    pre = meta["preprocess"]
    assert pre["size"] == [32, 32] and pre["resize"] == 32 and pre["interpolation"] == "bicubic" and len(pre["mean"]) == 3


@pytest.mark.slow  # a LoRA finetune and two exports: ~10 s
def test_a_lora_run_exports_with_the_update_merged_into_plain_weights(lora_run, synthetic_root, tmp_path):
    clf = ltclip.load(lora_run, device="cpu")
    assert any("parametrizations" in k for k in clf.model.state_dict())  # the run itself holds LoRA factors
    images = test_images(synthetic_root)[:12]
    for out in (tmp_path / "lora.pt", tmp_path / "lora.pt2"):
        ok("export", lora_run, "--out", out, *(["--format", "export"] if out.suffix == ".pt2" else []))
        meta = assert_export_is_the_classifier(out, clf, images)
        assert meta["lora_weights_merged"] == 2 and meta["format"] == ("export" if out.suffix == ".pt2" else "torchscript")
        assert meta["preprocess"]["resize"] == 36 and meta["preprocess"]["interpolation"] == "bilinear"  # the run's test view
    keys = list(load_export(tmp_path / "lora.pt")[0].state_dict())
    assert keys and not [k for k in keys if "parametrizations" in k or ".A" in k or k.endswith(".B")]
    assert not [k for k in torch.export.load(str(tmp_path / "lora.pt2")).state_dict if "parametrizations" in k]


@pytest.mark.slow  # a fresh interpreter importing torch: ~3 s
def test_the_file_loads_with_plain_torch_and_no_ltclip(world, tmp_path):
    out = tmp_path / "model.pt"
    ok("export", world["runs"]["linear"], "--out", out)
    code = ("import sys, json, torch; sys.modules['ltclip'] = None\n"  # any import of ltclip now fails
            f"files = {{'ltclip.json': ''}}; m = torch.jit.load({str(out)!r}, _extra_files=files)\n"
            "meta = json.loads(files['ltclip.json']); h, w = meta['preprocess']['size']\n"
            "print(tuple(m(torch.zeros(4, 3, h, w)).shape), len(meta['classnames']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "(4, 10) 10"


@pytest.mark.slow  # uses the predict fixture's runs
def test_bad_exports_are_one_line_errors_that_write_nothing(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = world["runs"]["linear"]
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"keep me")
    one_error_line(invoke("export", run, "--out", taken), "--out", "exists", "choose another --out")
    assert taken.read_bytes() == b"keep me"
    record = (run / "run.json").read_bytes()
    one_error_line(invoke("export", run, "--out", run / "run.json"), "--out", "would replace run.json")
    assert (run / "run.json").read_bytes() == record
    out = tmp_path / "out.pt"
    one_error_line(invoke("export", run, "--out", out, "--format", "onnx"), "--format 'onnx'", "choose one of torchscript, export")
    one_error_line(invoke("export", run, "--out", out, "--zero-shot", "--features", world["cache"]), "--zero-shot", "no run")
    one_error_line(invoke("export", run, "--out", out, "--features", world["cache"]), "--features", "drop --features")
    one_error_line(invoke("export", "--out", out), "name a run folder")
    one_error_line(invoke("export", run, "--out", out, "--batch-size", "0"), "--batch-size")
    assert not out.exists()


class BatchDependent(torch.nn.Module):
    """A model whose Python branch on the batch size a trace freezes: its trace is wrong on another batch."""

    def forward(self, x):
        scale = 2.0 if x.shape[0] == 2 else 1.0
        return x.mean((2, 3)) * scale


def test_a_trace_that_does_not_reproduce_the_model_is_refused_in_one_line():
    from ltclip.artifacts.export import _traced
    from ltclip.core.errors import LtclipError

    example, check = torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)
    with pytest.raises(LtclipError, match=r"RUN cannot be exported as torchscript: on a batch of 3 its trace gives other "
                                          r"logits than the model \(the tracer warned: .*\); it can still be used"):
        _traced(BatchDependent(), example, check, "torchscript", "RUN")
