"""Reports: table numbers and bold cells parsed back, CSV/JSON round trips, the figures, row labels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from ltclip.core.errors import LtclipError
from ltclip.evaluation.metrics import evaluate
from ltclip.evaluation.plots import GROUP_BARS, plot_per_class, plot_shot_groups, write_plots
from ltclip.evaluation.report import COLUMNS, markdown_table, method_name, write_csv, write_json

COUNTS = [400, 250, 150, 101, 100, 60, 30, 20, 19, 8, 3, 1]


def make_result(name: str, kind: str, seed: int, strength: float) -> dict:
    rng = np.random.default_rng(seed)
    c = len(COUNTS)
    labels = np.arange(200) % (c - 1)  # the last class is absent from the eval set
    logits = rng.standard_normal((200, c))
    logits[np.arange(200), labels] += strength * np.log(np.asarray(COUNTS, float))[labels]
    result = evaluate(logits, labels, COUNTS)
    return {**result, "name": name, "kind": kind, "dataset": "synthetic", "split": "test", "run_dir": f"runs/{name}",
            "train_counts": COUNTS}


@pytest.fixture
def results() -> list[dict]:
    return [
        make_result("linear · ce · instance", "run", 1, 0.6),
        make_result("decoder · balanced_softmax · class-balanced", "run", 2, 1.0),
        make_result("zero-shot", "zero-shot", 3, 0.3),
    ]


def parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the first Markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split(" | ")]
    return split(lines[0]), [split(line) for line in lines[2:]]


def unbold(cell: str) -> tuple[str, bool]:
    bold = cell.startswith("**") and cell.endswith("**")
    return (cell[2:-2] if bold else cell), bold


def test_table_numbers_equal_the_inputs_and_zero_shot_comes_first(results):
    columns = ("many", "medium", "few", "top1", "top5", "balanced_accuracy", "macro_f1", "nll", "ece")
    text = markdown_table(results, columns=columns)
    assert text.splitlines()[0] == "**synthetic / test** — 200 images"
    header, rows = parse_table(text)
    assert header == ["Method"] + [COLUMNS[c].header for c in columns]
    assert [row[0] for row in rows] == ["zero-shot", results[0]["name"], results[1]["name"]]
    by_name = {r["name"]: r for r in results}
    for row in rows:
        for cell, key in zip(row[1:], columns):
            shown, _ = unbold(cell)
            assert float(shown) == pytest.approx(by_name[row[0]][key], abs=0.5 * 10 ** -COLUMNS[key].decimals)
            assert len(shown.split(".")[1]) == COLUMNS[key].decimals


def test_input_order_is_kept_without_zero_shot_first(results):
    _, rows = parse_table(markdown_table(results, zero_shot_first=False))
    assert [row[0] for row in rows] == [r["name"] for r in results]


def test_bold_marks_the_best_shown_value_per_column():
    same = {"dataset": "d", "split": "s"}
    rows = [
        {"name": "a", "kind": "run", **same, "many": 50.0, "few": None, "top1": 70.04, "ece": 3.5},
        {"name": "b", "kind": "run", **same, "many": 60.0, "few": 10.0, "top1": 70.01, "ece": 2.25},
        {"name": "c", "kind": "zero-shot", **same, "many": 55.0, "few": 5.0, "top1": 69.0, "ece": 2.25},
    ]
    _, table = parse_table(markdown_table(rows, columns=("many", "few", "top1", "ece")))
    bold = {row[0]: [unbold(cell)[1] for cell in row[1:]] for row in table}
    assert bold == {
        "c": [False, False, False, True],  # ECE: the minimum wins, and the tie is bold twice
        "a": [False, False, True, False],  # 70.04 and 70.01 both read 70.0: a tie
        "b": [True, True, True, True],
    }
    assert dict((row[0], row[2]) for row in table)["a"] == "—"


def test_one_table_per_dataset_and_split_and_pipes_escaped(results):
    other = {**results[0], "split": "val", "name": "a|b"}
    text = markdown_table(results + [other])
    assert "**synthetic / test**" in text and "**synthetic / val**" in text
    assert "| a\\|b |" in text


def test_unknown_column_is_refused(results):
    with pytest.raises(LtclipError, match="unknown report column"):
        markdown_table(results, columns=("top1", "top3"))


def test_json_round_trip_equals_the_inputs(results, tmp_path):
    path = write_json(results, tmp_path / "report.json")
    loaded = json.loads(path.read_text())["results"]
    expected = json.loads(json.dumps(results))  # tuples (confusions) read back as lists
    assert loaded == expected
    assert loaded[0]["per_class"][-1] is None
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_json_refuses_nan(results, tmp_path):
    with pytest.raises(LtclipError, match="NaN"):
        write_json([{**results[0], "nll": float("nan")}], tmp_path / "report.json")
    assert not list(tmp_path.iterdir())


def test_csv_round_trip_equals_the_inputs(results, tmp_path):
    results[1]["seed"] = np.int64(7)  # extra scalar keys become columns; numpy scalars are written plainly
    path = write_csv(results, tmp_path / "report.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["name", "kind", "dataset", "split", "run_dir", *COLUMNS, "num_samples", "seed"]
    for row, result in zip(rows, results):
        for key, cell in row.items():
            want = result.get(key)
            if key in COLUMNS:
                assert (None if cell == "" else float(cell)) == want  # full precision
            elif key in ("num_samples", "seed"):
                assert (None if cell == "" else int(cell)) == want
            else:
                assert cell == want
    assert list(tmp_path.iterdir()) == [path]


def png_pixels(path) -> np.ndarray:
    """The RGB pixels of a valid PNG file."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("plot", [plot_per_class, plot_shot_groups])
def test_plot_is_a_png(results, tmp_path, plot):
    path = plot(results, tmp_path / "figure.png")
    assert path.stat().st_size > 20_000
    pixels = png_pixels(path)
    assert pixels.shape[1] > 500 and pixels.shape[0] > 300
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # bars or points, lines and text, not a blank canvas
    assert list(tmp_path.iterdir()) == [path]


def test_write_plots_writes_the_bars_and_the_per_class_figure_beside_them(results, tmp_path):
    bars, per_class = write_plots(results, tmp_path / "accuracy.png")
    assert (bars, per_class) == (tmp_path / "accuracy.png", tmp_path / "accuracy_per_class.png")
    assert sorted(tmp_path.iterdir()) == [bars, per_class]
    assert png_pixels(per_class).shape[:2] == (396, 1344)  # one panel per result, three in a row
    assert plot_per_class(results + results[:1], tmp_path / "four.png") and png_pixels(tmp_path / "four.png").shape[0] == 720


def colour_pixels(path, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(png_pixels(path).astype(int) - rgb).sum(axis=-1) < 6).sum())


def test_bar_lengths_are_proportional_to_the_values(tmp_path):
    few_colour = dict(GROUP_BARS)["few"]
    row = {"name": "m", "kind": "run", "dataset": "d", "split": "s", "many": None, "medium": None, "top1": None}
    short = plot_shot_groups([{**row, "few": 40.0}], tmp_path / "short.png")
    long = plot_shot_groups([{**row, "few": 80.0}], tmp_path / "long.png")
    none = plot_shot_groups([{**row, "few": None}], tmp_path / "none.png")
    legend = colour_pixels(none, few_colour)  # no bar: only the legend's patch has the colour
    bar = {k: colour_pixels(p, few_colour) - legend for k, p in (("short", short), ("long", long))}
    assert bar["long"] == pytest.approx(2 * bar["short"], rel=0.05)
    assert bar["short"] > 10 * legend > 0


def test_plot_needs_train_counts_matching_the_classes(results, tmp_path):
    with pytest.raises(LtclipError, match="train_counts"):
        plot_per_class([{k: v for k, v in results[0].items() if k != "train_counts"}], tmp_path / "a.png")
    with pytest.raises(LtclipError, match="11 train counts but 12"):
        plot_per_class([{**results[0], "train_counts": COUNTS[:-1]}], tmp_path / "b.png")
    assert not list(tmp_path.iterdir())


def test_binned_curve_means_every_class_once():
    from ltclip.evaluation.plots import _binned_mean

    counts = np.array([1, 2, 3, 10, 30, 100, 300, 1000], float)
    acc = np.arange(8, dtype=float) * 10
    x, y = _binned_mean(counts, acc, bins=1)
    assert y.tolist() == [acc.mean()] and x[0] == pytest.approx(np.exp(np.log(counts).mean()))
    x, y = _binned_mean(counts, acc, bins=100)  # more bins than classes: one class per bin
    assert x == pytest.approx(counts) and y.tolist() == acc.tolist()
    assert _binned_mean(np.full(3, 5.0), np.array([0.0, 50, 100]), bins=4)[1].tolist() == [50.0]


@pytest.mark.parametrize(
    "config, name",
    [
        ({"head": "decoder", "loss": "balanced_softmax", "sampler": "class-balanced", "two_stage": "crt"},
         "decoder · balanced_softmax · class-balanced → crt"),
        ({"head": "linear", "loss": "ce", "sampler": "instance", "two_stage": None, "posthoc_la": False},
         "linear · ce · instance"),
        ({"head": {"name": "decoder", "depth": 3}, "loss": {"name": "ldam", "drw": True}, "sampler": "instance",
          "two_stage": "none", "posthoc_la": 1.0}, "decoder · ldam · instance + LA τ=1"),
        ({"head": "cosine", "loss": "ce", "posthoc_la": True}, "cosine · ce + LA"),
        ({"head": "linear", "loss": "ce", "two_stage": {"name": "lws"}, "posthoc_la": {"tau": 0.5}},
         "linear · ce → lws + LA τ=0.5"),
        ({"head": "cosine", "head_opts": ["init_scale=1"], "loss": "ldam", "loss_opts": ["s=1", "drw_epoch=8"],
          "sampler": "instance"}, "cosine(init_scale=1) · ldam(s=1, drw_epoch=8) · instance"),
        ({"head": "linear", "head_opts": [], "loss": "ce", "loss_opts": []}, "linear · ce"),
        ({"head": "cosine", "head_opts": {"init_scale": 1.0}, "loss": "ldam", "loss_opts": {"s": 1.0, "drw_epoch": 8},
          "sampler": "instance"}, "cosine(init_scale=1.0) · ldam(s=1.0, drw_epoch=8) · instance"),
    ],
)
def test_method_name(config, name):
    assert method_name(config) == name
    assert method_name(dict(reversed(config.items()))) == name  # key order does not matter


def test_method_name_needs_a_method():
    with pytest.raises(LtclipError, match="no head, loss or sampler"):
        method_name({"two_stage": "crt"})
