"""benchmarks/device_check.py, the one prepared GPU measurement, run at its smallest size on the CPU."""

import json
import time

import pytest
import torch

from benchmarks import device_check
from benchmarks.device_parts import TUNE_MODES


@pytest.mark.slow
def test_every_part_measures_its_methods_side_by_side(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = device_check.main(["--size", "test", "--out", "out", "--device", "cpu"])

    saved = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert saved["rows"] == report["rows"] and saved["device"]["device"] == "cpu"
    assert saved["device"]["date_utc"] and saved["device"]["cpu_count"] >= 1
    assert saved["device"]["cuda"] == torch.version.cuda  # the toolkit's version, not a GPU's name or None
    assert {name: p["status"] for name, p in saved["parts"].items()} == dict.fromkeys(device_check.PARTS, "done")
    methods = {}
    for r in saved["rows"]:
        methods.setdefault(r["part"], []).append(r["method"])
        assert r["value"] > 0
    assert len(methods["extract"]) == 5 and methods["extract"][0].startswith("input pipeline")
    assert methods["extract"][-1].startswith("ltclip extract --decode device")
    assert len(methods["decoder"]) == 2
    assert methods["finetune"] == [f"--tune {t}, linear head" for t in TUNE_MODES]
    assert len(methods["prompt"]) == len(device_check.SIZES["test"]["prompt_classes"])
    faiss_row = saved["rows"][-1]
    assert faiss_row["method"].startswith("faiss") and "same neighbours: 100.0%" in faiss_row["relative"]
    table = (tmp_path / "out" / "device_check.md").read_text()
    assert "| part | case | method |" in table and table.count("\n| ") == 1 + len(saved["rows"])  # the header and a line per row


def test_a_part_past_its_cap_keeps_its_rows_and_the_run_goes_on():
    def slow_part(rows, notes):
        rows.append({"method": "first"})
        time.sleep(5)
        rows.append({"method": "never"})

    t = time.perf_counter()
    status, rows = device_check.run_part(slow_part, 0.2)
    assert time.perf_counter() - t < 2
    assert status["status"] == "stopped" and "0 s cap" in status["notes"][0]
    assert rows == [{"method": "first"}]


def test_a_missing_dependency_skips_the_part_with_a_note():
    def needs_faiss(rows, notes):
        import ltclip_no_such_module  # noqa: F401

    status, rows = device_check.run_part(needs_faiss, 5)
    assert status["status"] == "skipped" and "ltclip_no_such_module" in status["notes"][0] and rows == []


ROW = {"part": "decoder", "case": "c", "method": "before the error", "value": 1.0, "unit": "s", "peak_mib": None, "relative": ""}


def test_a_failing_part_is_a_note_and_the_parts_done_are_saved(tmp_path, monkeypatch, capsys):
    """An error in one part (a CUDA-only bug, say) must not cost the other parts of a short device loan."""
    def broken(size, device, work, rows, notes):
        rows.append(ROW)
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    written = []

    def no_faiss(size, device, work, rows, notes):  # the last part: what was saved before it ran
        written.append(json.loads((tmp_path / "out" / "device_check.json").read_text()))

    monkeypatch.setitem(device_check.FUNCTIONS, "decoder", broken)
    monkeypatch.setitem(device_check.FUNCTIONS, "faiss", no_faiss)
    monkeypatch.chdir(tmp_path)
    report = device_check.main(["--size", "test", "--out", "out", "--device", "cpu", "--parts", "decoder,faiss"])
    decoder = report["parts"]["decoder"]
    assert decoder["status"] == "failed" and decoder["notes"] == ["failed: RuntimeError: CUDA error: an illegal memory access was encountered"]
    assert report["parts"]["faiss"]["status"] == "done" and "Traceback" in capsys.readouterr().err
    assert list(written[0]["parts"]) == ["decoder"] and written[0]["rows"] == [ROW]


def test_an_unknown_part_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        device_check.main(["--size", "test", "--out", str(tmp_path), "--parts", "extract,gpu"])
    assert exit_info.value.code == 2 and "unknown gpu" in capsys.readouterr().err
    assert not (tmp_path / "device_check.json").exists()
