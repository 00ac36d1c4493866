"""``ltclip extract``, ``ltclip eval`` and ``ltclip list``.

Option names are the config fields' names and their defaults are read from the configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import EvalConfig, ExtractConfig
from ..core.errors import LtclipError
from ..artifacts.workspace import RUNS_DIR, WORKSPACE_FILE, default_features_dir, finished_runs, record_features, recorded_features
from .common import (
    REGISTRIES, Classnames, ConfigFile, DataRoot, DatasetName, Download, Imbalance, ManifestDir, SubsetSeed, Templates,
    TestList, TrainList, ValList, given, guarded, is_main_process, registry, say_default,
)

_X, _E = ExtractConfig(out=""), EvalConfig()


def extract(
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder: train.h5, val.h5, test.h5, text.h5 (default: features/DATASET-MODEL-PRETRAINED).")] = None,
    config: ConfigFile = None,
    dataset: DatasetName = None,
    data_root: DataRoot = None,
    manifest_dir: ManifestDir = None,
    train_list: TrainList = None,
    val_list: ValList = None,
    test_list: TestList = None,
    classnames: Classnames = None,
    templates: Templates = None,
    imbalance: Imbalance = None,
    download: Download = None,
    subset_seed: SubsetSeed = None,
    splits: Annotated[Optional[list[str]], typer.Option("--splits", help="Splits to extract, comma-separated or repeated (default: every split the dataset has).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="open_clip model name (or local-dir:/path).")] = _X.model,
    pretrained: Annotated[str, typer.Option("--pretrained", "-p", help="open_clip tag, checkpoint file, or 'none' (random).")] = _X.pretrained,
    preprocess_from: Annotated[Optional[str], typer.Option("--preprocess-from", help="Tag whose preprocessing a checkpoint file needs.")] = None,
    tokens: Annotated[bool, typer.Option("--tokens/--no-tokens", help="Also store the ViT token sequence (the decoder head needs it).")] = _X.tokens,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = _X.batch_size,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader decode workers (default: this process's share of the CPUs, at most 8).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = _X.device,
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16 (autocast).")] = _X.precision,
    test_views: Annotated[str, typer.Option("--test-views", help="center, flip, fivecrop or tencrop views of val/test images.")] = _X.test_views,
    train_views: Annotated[int, typer.Option("--train-views", help="K seeded augmented views per training image (0: the model's preprocessing).")] = _X.train_views,
    bad_images: Annotated[str, typer.Option("--bad-images", help="fail, or skip (logged; zero features).")] = _X.bad_images,
    block_size: Annotated[int, typer.Option("--block-size", help="Rows written (and resumed) together.")] = _X.block_size,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the train views.")] = _X.seed,
    from_run: Annotated[Optional[str], typer.Option("--from-run", help="A finetuned run: extract with its encoder (its model and weights).")] = None,
    token_pool: Annotated[int, typer.Option("--token-pool", help="Average the patch tokens over K×K windows (CLS kept; 1: no pooling).")] = _X.token_pool,
    token_dtype: Annotated[str, typer.Option("--token-dtype", help="Token storage: float16, int8 or fp8 (e4m3), the last two with a scale.")] = _X.token_dtype,
    token_scale: Annotated[Optional[str], typer.Option("--token-scale", help="int8/fp8 scale per 'token' (default) or per 'channel'.")] = None,
    token_pca: Annotated[int, typer.Option("--token-pca", help="Store tokens as W PCA coordinates (basis fitted on train tokens; 0: off).")] = _X.token_pca,
    token_pca_sample: Annotated[int, typer.Option("--token-pca-sample", help="Train images whose tokens fit the PCA basis.")] = _X.token_pca_sample,
):
    """Run the frozen CLIP image encoder once; write embeddings (+ tokens) to a resumable HDF5 cache."""
    values = given(locals(), drop=("config",))
    from ..config import from_flat
    from ..core.progress import RichProgress
    from ..stages.extract import run_extract

    values["splits"] = tuple(s.strip() for item in splits or () for s in item.split(",") if s.strip())
    if out is None:
        weights = (Path(from_run).name, "finetuned") if from_run else (model, pretrained)
        values["out"] = str(default_features_dir(values.get("dataset", _X.data.dataset), *weights))
        say_default("--out", values["out"])
    cfg = from_flat(ExtractConfig, values, owner="extract")
    progress = RichProgress()
    summary = run_extract(cfg, progress)
    for item in summary["splits"]:
        progress.log(f"{item['split']}: {item['status']} ({item['rows']:,} rows)")
    progress.log(f"cache: {summary['out']}")
    if is_main_process():
        progress.log(f"{record_features(Path(summary['out']))} now names this cache for `ltclip train-head` and `ltclip eval`")


def evaluate(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Run folders from `ltclip train-head`.")] = None,
    config: ConfigFile = None,
    split: Annotated[str, typer.Option("--split", help="Split of each run's cache to evaluate.")] = _E.split,
    features: Annotated[Optional[str], typer.Option("--features", "-f", help="Cache folder for the baselines.")] = None,
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="Zero-shot CLIP with the cache's text embeddings.")] = _E.zero_shot,
    knn: Annotated[int, typer.Option("--knn", help="kNN baseline with K neighbours from the train cache (0: off).")] = _E.knn,
    ncm: Annotated[bool, typer.Option("--ncm", help="Nearest-class-mean baseline.")] = _E.ncm,
    retrieval_mix: Annotated[float, typer.Option("--retrieval-mix", help="Blend each run with kNN votes: weight alpha in [0, 1].")] = _E.retrieval_mix,
    retrieval_k: Annotated[int, typer.Option("--retrieval-k", help="Neighbours for --retrieval-mix.")] = _E.retrieval_k,
    temperature: Annotated[float, typer.Option("--temperature", help="kNN vote temperature.")] = _E.temperature,
    views: Annotated[str, typer.Option("--views", help="Test views: mean (average logits) or first.")] = _E.views,
    data_root: Annotated[Optional[str], typer.Option("--data-root", help="Images of finetuned runs (default: the run's own data root).")] = None,
    test_views: Annotated[str, typer.Option("--test-views", help="Views of each image for finetuned runs: center, flip, fivecrop or tencrop.")] = _E.test_views,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Image decode workers for finetuned runs.")] = None,
    many: Annotated[int, typer.Option("--many", help="Classes with more training images than this are 'many'.")] = _E.many,
    few: Annotated[int, typer.Option("--few", help="Classes with fewer training images than this are 'few'.")] = _E.few,
    backend: Annotated[str, typer.Option("--backend", help="kNN search: auto, faiss or torch.")] = _E.backend,
    batch_size: Annotated[int, typer.Option("--batch-size")] = _E.batch_size,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = _E.device,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Allow runs of different datasets in one report.")] = _E.allow_mixed,
    report: Annotated[Optional[str], typer.Option("--report", help="Markdown table to write.")] = None,
    json: Annotated[Optional[str], typer.Option("--json", help="JSON results to write.")] = None,
    csv: Annotated[Optional[str], typer.Option("--csv", help="CSV results to write.")] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", help="PNG of accuracy by shot group per method; the per-class figure goes beside it (NAME_per_class.png).")] = None,
):
    """Shot-group metrics (many/medium/few/all) for runs and zero-shot / kNN / NCM baselines."""
    values = given(locals(), drop=("config",))
    from ..config import from_flat
    from ..evaluation.report import markdown_table
    from ..stages.evaluate import run_eval

    if not runs and not (zero_shot or knn or ncm):
        values["runs"] = tuple(str(r) for r in finished_runs())
        if not values["runs"]:
            raise LtclipError(f"nothing to evaluate: no run folders given and no finished run under {RUNS_DIR}/")
        say_default("runs", f"the {len(values['runs'])} finished runs under {RUNS_DIR}/")
    if features is None and (zero_shot or knn or ncm) and recorded_features() is not None:
        values["features"] = str(recorded_features())
        say_default("--features", f"{values['features']}, named by ./{WORKSPACE_FILE}")
    cfg = from_flat(EvalConfig, values, owner="eval")
    typer.echo(markdown_table(run_eval(cfg)))


def list_registered(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(REGISTRIES)}, recipes.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="With `tuning`: count each mode's trainable parameters on this open_clip model.")] = None,
):
    """Registered methods of one kind: name, options with their defaults, and what it is."""
    if kind not in (*REGISTRIES, "recipes"):
        raise LtclipError(f"ltclip list {kind!r}: choose one of {', '.join(REGISTRIES)}, recipes")
    if model is not None and kind != "tuning":
        raise LtclipError("--model: only `ltclip list tuning` counts parameters on a model")
    if kind == "recipes":
        return _list_recipes()
    from ..recipes import MAX_LENGTHENING

    reg = registry(kind)
    counts = _trainable_counts(model, reg.names()) if model else {}
    for name in reg.names():
        options = " ".join(f"{k}={v}" for k, v in reg.options(name).items())
        count = f"{counts[name]:>12,} " if counts else ""
        typer.echo(f"{name:16s} {count}{options:34s} {reg.summary(name)}".rstrip())
        if kind == "two-stage" and reg.get(name).defaults:
            typer.echo(f"{'':16s} train-head --from defaults: " + " ".join(f"{k}={v}" for k, v in reg.get(name).defaults.items()))
        if kind == "heads" and reg.get(name).defaults:
            head = reg.get(name)
            by_opts: dict[str, list[str]] = {}  # losses with the same defaults share one phrase
            for loss, opts in head.loss_defaults.items():
                by_opts.setdefault(" ".join(f"{k}={v}" for k, v in opts.items()), []).append(loss)
            extra = [f"with --loss {' or '.join(losses)}: {opts}" for opts, losses in by_opts.items()]
            extra += [f"at least {head.min_steps} steps on small caches (up to {MAX_LENGTHENING}× the epochs)"] if head.min_steps else []
            typer.echo(f"{'':16s} train-head defaults: " + " ".join(f"{k}={v}" for k, v in head.defaults.items())
                       + "".join(f"; {e}" for e in extra))


def _list_recipes() -> None:
    """Each recipe: its summary, then per stage the options it sets."""
    from ..recipes import list_recipes, load_recipe

    for name in list_recipes():
        recipe = load_recipe(name)
        typer.echo(f"{name:16s} {recipe.summary}")
        for stage, options in recipe.stages.items():
            opts = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())
            heads = "".join(f"; head {h}: {' '.join(o)}" for h, o in recipe.head_opts[stage].items())
            typer.echo(f"{'':16s} {stage}: {opts}{heads}")
        if recipe.loss_opts:
            typer.echo(f"{'':16s} loss options: " + "; ".join(f"{loss}: {' '.join(o)}" for loss, o in recipe.loss_opts.items()))


def _trainable_counts(model: str, modes: list[str]) -> dict[str, int]:
    """Trainable encoder parameters of each tuning mode (default options) on ``model`` (random weights)."""
    import copy
    import logging

    from ..models.backbone import load_backbone
    from ..models.tuning import apply_tuning, count_trainable

    logging.getLogger("ltclip.models.backbone").setLevel(logging.ERROR)  # weights do not matter for a count
    base = load_backbone(model, "none").model
    counts = {}
    for mode in modes:
        tuned = copy.deepcopy(base)
        apply_tuning(tuned, mode, {})
        counts[mode] = count_trainable(tuned)
    return counts


def register(app: typer.Typer) -> None:
    app.command("extract")(guarded(extract))
    app.command("eval")(guarded(evaluate))
    app.command("list")(guarded(list_registered))
