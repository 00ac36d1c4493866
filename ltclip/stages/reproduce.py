"""The paper's table on one dataset, in one command (``ltclip reproduce``, ``make reproduce``).

A plan is a list of steps, each an ``ltclip`` command line and the output that shows it is done:
``extract`` (train/val/test + text), the zero-shot row, one run per row of the paper (stage-1
decoders, second stages on the CE run, the linear probe, fine-tuning and prompt tuning), an
``eval`` of each run and one report in the paper's layout (rows = methods; Many / Medium / Few /
All). Every step whose output is complete is skipped, and a training run that was interrupted
after a checkpoint continues with ``--resume``, so rerunning the same command after any
interruption carries on where it stopped.

The steps run through a caller's ``invoke(args, distributed) -> exit code`` (the CLI passes its
own app), so each does exactly what the same ``ltclip`` command line does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.atomic import atomic_path
from ..config import ExtractConfig, ReproduceConfig as Settings
from ..core.errors import LtclipError
from ..artifacts.store import FeatureCache
from ..artifacts.workspace import RUN_FILE, slug
from ..recipes import load_recipe

PAPER_COLUMNS = ("many", "medium", "few", "top1")  # the paper's table: Many / Medium / Few / All


@dataclass(frozen=True)
class Row:
    """One row of the table: its label, its run folder's name and the command that trains it."""

    label: str
    run: str
    args: tuple[str, ...]
    stage: str = "stage1"  # stage1 (train-head on the cache), second (train-head --from), images (finetune)
    recipe: str | None = None  # the row's own recipe (default: the plan's)
    table_views: bool = False  # evaluated as its paper's tables are: FiveCrop after Resize(224 + expand)


def _decoder(label: str, run: str, *args: str) -> Row:
    return Row(f"Decoder + {label}", run, ("--head", "decoder", *args))


def _second(label: str, method: str) -> Row:
    return Row(f"Decoder + CE → {label}", f"decoder-ce-{method}", ("--two-stage", method), stage="second")


# The rows of Wang et al.'s table (IJCV 2023), with the hyper-parameters of the imbalance-vlm recipe.
# GRW uses the exponent of the paper's code (1.2; exponent 1 is CBW); LDAM s = 1 on plain logits (the
# paper's code takes s = 30 but never applies it), without DRW as the paper ran it; LDAM-DRW, its
# usual form (re-weighting over the last 20 % of training, Cao et al.), is a row of its own.
PAPER_ROWS = (
    Row("Linear probe", "linear-probe", ("--head", "linear", "--loss", "ce")),
    Row("Fine-tuning (full)", "finetune-full", ("--tune", "full", "--head", "linear", "--loss", "ce"), stage="images"),
    Row("Prompt tuning (CoOp)", "prompt-tuning", ("--tune", "frozen", "--head", "prompt", "--loss", "ce"), stage="images"),
    _decoder("CE", "decoder-ce", "--loss", "ce"),
    _decoder("CBS", "decoder-cbs", "--loss", "ce", "--sampler", "class-balanced"),
    _decoder("CBW", "decoder-cbw", "--loss", "cbw"),
    _decoder("Focal", "decoder-focal", "--loss", "focal"),
    _decoder("Balanced Softmax", "decoder-bs", "--loss", "balanced_softmax"),
    _decoder("GRW", "decoder-grw", "--loss", "grw", "--loss-opt", "exponent=1.2"),
    _decoder("LADE", "decoder-lade", "--loss", "lade"),
    _decoder("LDAM", "decoder-ldam", "--loss", "ldam", "--loss-opt", "s=1"),
    _decoder("LDAM-DRW", "decoder-ldam-drw", "--loss", "ldam", "--loss-opt", "s=1", "--loss-opt", "drw_at=0.8"),
    _second("cRT", "crt"),
    _second("LWS", "lws"),
    _second("DisAlign", "disalign"),
    _second("MARC", "marc"),
)
# LIFT (Shi et al., ICML 2024) and LIFT+ (arXiv 2504.13282), each set by its recipe, evaluated as their
# tables are: test-time ensembling, FiveCrop after Resize(224 + expand), logits averaged.
LIFT_ROWS = (Row("LIFT (AdaptFormer)", "lift-adaptformer", (), stage="images", recipe="lift", table_views=True),
             Row("LIFT+", "lift-plus", (), stage="images", recipe="lift+", table_views=True))
# LIFT's configs/model/*.yaml: expand 24 for ViT-B/16 (Resize 248), 21 for ViT-L/14 (Resize 245).
TABLE_RESIZE = {"ViT-L-14": 245, "ViT-L-14-quickgelu": 245}
PLANS = {"imbalance-vlm": PAPER_ROWS, "lift": LIFT_ROWS}
REPORT_NAMES = {"imbalance-vlm": "table", "lift": "table-lift"}


def default_out(dataset: str, model: str, pretrained: str) -> Path:
    """``experiments/<dataset>-<model>-<pretrained>``."""
    return Path("experiments") / slug(f"{dataset}-{Path(model).name}-{Path(pretrained).stem if Path(pretrained).is_file() else pretrained}")


def _options(**values) -> list[str]:
    """``--name value`` for every value given (``True``: a bare flag)."""
    out = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        out += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


@dataclass
class Step:
    """One command of the plan: ``done()`` says whether its output is complete (then it is skipped)."""

    name: str
    args: list[str]
    done: Callable[[], bool]
    distributed: bool = False  # runs under the launcher (torchrun) when one is given
    resume: Callable[[], bool] = field(default=lambda: False)


class Plan:
    """The steps of one recipe's table on one dataset, and where each writes."""

    def __init__(self, settings: Settings):
        if settings.recipe not in PLANS:
            raise LtclipError(f"--recipe {settings.recipe!r}: ltclip reproduce knows {', '.join(PLANS)}")
        self.s = settings
        self.out = Path(settings.out)
        self.features = self.out / "features"
        self.runs = self.out / "runs"
        self.rows = PLANS[settings.recipe]
        self.report = self.out / f"{REPORT_NAMES[settings.recipe]}.md"
        self.zero_shot = self.out / "zero_shot.json"

    # ------------------------------------------------------------------ command lines

    def _data(self) -> list[str]:
        s = self.s
        return _options(dataset=s.dataset, data_root=s.data_root, manifest_dir=s.manifest_dir, imbalance=s.imbalance,
                        download=s.download)

    def _training(self) -> list[str]:
        s = self.s
        return _options(epochs=s.epochs, steps=s.steps, batch_size=s.batch_size, precision=s.precision, device=s.device)

    def row_args(self, row: Row) -> list[str]:
        """The ``ltclip`` command line that trains ``row`` into its run folder."""
        out = ["--out", str(self.runs / row.run)]
        if row.stage == "second":
            return ["train-head", "--from", str(self.runs / "decoder-ce"), *row.args, *out, *self._training()]
        recipe = ["--recipe", row.recipe or self.s.recipe]
        if row.stage == "images":
            return ["finetune", *self._data(), *_options(model=self.s.model, pretrained=self.s.pretrained, workers=self.s.workers),
                    *recipe, *row.args, *out, *self._training()]
        if row.args[:2] == ("--head", "decoder"):
            return ["train-head", "--features", str(self.features), *recipe, *row.args, *out, *self._training()]
        return ["train-head", "--features", str(self.features), *row.args, *out, *self._training()]  # the linear probe: ltclip's defaults

    # ------------------------------------------------------------------ steps

    def steps(self) -> list[Step]:
        s = self.s
        extract = ["extract", *self._data(), *_options(model=s.model, pretrained=s.pretrained, out=self.features,
                                                       precision=s.precision, device=s.device, workers=s.workers)]
        if self._extract_options():  # imbalance-vlm: the seed code's normalisation and test view
            extract += ["--recipe", s.recipe]
        steps = [Step("extract", extract, self._cache_complete, distributed=True)]
        steps.append(Step("zero-shot", ["eval", "--zero-shot", "--features", str(self.features), "--json", str(self.zero_shot),
                                        *_options(device=s.device)],
                          lambda: _newer(self.zero_shot, [self.features / "test.h5", self.features / "text.h5"])))
        for row in self.rows:
            folder = self.runs / row.run
            steps.append(Step(row.run, self.row_args(row), lambda f=folder: (f / RUN_FILE).is_file(), distributed=True,
                              resume=lambda f=folder: (f / "last.pt").is_file()))
        for row in self.rows:
            folder = self.runs / row.run
            views = ["--test-views", "fivecrop", "--eval-resize", str(TABLE_RESIZE.get(s.model, 248))] if row.table_views else []
            steps.append(Step(f"eval {row.run}", ["eval", str(folder), *views,
                                                  *_options(device=s.device, workers=s.workers if row.stage == "images" else None)],
                              lambda f=folder: _newer(f / "eval.json", [f / RUN_FILE])))
        return steps

    def _extract_options(self) -> dict:
        """The plan's recipe's ``[extract]`` values (imbalance-vlm's; none for lift, whose cache serves only
        the zero-shot row: CLIP as its authors preprocess it)."""
        return load_recipe(self.s.recipe).stages.get("extract", {})

    def _cache_complete(self) -> bool:
        """The cache is whole (every split file validates and is complete, text embeddings written last
        by ``extract.json``), and made by this model for this dataset; a cache of another is refused."""
        record = self.features / "extract.json"
        splits = [p for p in sorted(self.features.glob("*.h5")) if p.name != "text.h5"]
        if not record.is_file() or not (self.features / "text.h5").is_file() or not splits:
            return False
        config = json.loads(record.read_text(encoding="utf-8")).get("config", {})
        made = {"model": config.get("model"), "pretrained": config.get("pretrained"), "dataset": config.get("data", {}).get("dataset")}
        wanted = {"model": self.s.model, "pretrained": self.s.pretrained, "dataset": self.s.dataset}
        defaults = ExtractConfig(out="")
        for key, value in self._extract_options().items():  # a cache read otherwise than the recipe says
            made[key], wanted[key] = config.get(key, getattr(defaults, key)), value
        differ = [k for k in wanted if str(made[k]) != str(wanted[k])]
        if differ:
            raise LtclipError(f"{self.features} was extracted with another {', '.join(differ)} "
                              f"({', '.join(f'{k}={made[k]}' for k in differ)}); pass another --out")
        try:
            for path in splits:
                FeatureCache(path).close()
        except LtclipError:
            return False
        return True

    # ------------------------------------------------------------------ report

    def results(self) -> list[dict]:
        """Zero-shot CLIP, then every row's stored evaluation labelled as in the paper."""
        results = json.loads(self.zero_shot.read_text(encoding="utf-8"))["results"]
        for row in self.rows:
            result = json.loads((self.runs / row.run / "eval.json").read_text(encoding="utf-8"))
            results.append({**result, "name": row.label, "method": result.get("name")})
        return results

    def write_report(self) -> Path:
        """``table.md`` (the paper's layout), ``results.json`` and ``results.csv`` beside it."""
        from ..evaluation.report import markdown_table, write_csv, write_json

        results = self.results()
        s = self.s
        title = f"# {s.dataset}: {s.model} ({s.pretrained}), recipe {s.recipe}\n\n"
        with atomic_path(self.report) as tmp:
            tmp.write_text(title + markdown_table(results, columns=PAPER_COLUMNS), encoding="utf-8")
        write_json(results, self.report.with_suffix(".json"))
        write_csv(results, self.report.with_suffix(".csv"))
        return self.report

    def report_inputs(self) -> list[Path]:
        return [self.zero_shot] + [self.runs / row.run / "eval.json" for row in self.rows]


def _newer(output: Path, inputs: Sequence[Path]) -> bool:
    """``output`` exists and is at least as new as each of ``inputs`` that exists."""
    if not output.is_file():
        return False
    stamp = output.stat().st_mtime
    return all(stamp >= p.stat().st_mtime for p in inputs if p.exists())


def run_plan(settings: Settings, invoke: Callable[[list[str], bool], int], log: Callable[[str], None]) -> Path:
    """Run every step of the plan that is not done yet, then write the report; returns its path.

    A failing step stops the plan with one line; rerunning continues from that step.
    """
    plan = Plan(settings)
    for step in plan.steps():
        if step.done():
            log(f"skip {step.name}: done")
            continue
        args = step.args + (["--resume"] if step.resume() else [])
        log(f"run  {step.name}: ltclip {' '.join(args)}")
        start = time.perf_counter()
        code = invoke(args, step.distributed)
        log(f"done {step.name} in {time.perf_counter() - start:.1f} s" if not code else f"failed {step.name}")
        if code:
            raise LtclipError(f"step {step.name} failed (exit {code}): `ltclip {' '.join(args)}`; fix what it said and "
                              "rerun the same command (finished steps are skipped)", exit_code=code)
    if _newer(plan.report, plan.report_inputs()):
        log(f"skip report: {plan.report} is up to date")
    else:
        log(f"report: {plan.write_report()}")
    return plan.report
