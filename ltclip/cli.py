"""The ``ltclip`` command line: parses options, builds a config, calls one stage. No logic here.

Heavy libraries (torch, open_clip) are imported inside commands, so ``--help``, ``--version``
and argument errors answer at once.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import LtclipError

app = typer.Typer(
    name="ltclip",
    help="CLIP-style vision-language models for long-tailed image classification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)
datasets_app = typer.Typer(help="Registered datasets: list, class profiles, image checks, the synthetic set.", no_args_is_help=True)
cache_app = typer.Typer(help="Feature caches written by `ltclip extract`.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(cache_app, name="cache")


def guarded(fn):
    """Turn project errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LtclipError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"ltclip {__version__}")
        raise typer.Exit()


def _load_config(ctx: typer.Context, param, value: Optional[str]):
    """``--config FILE``: its keys become the command's defaults (explicit options still win)."""
    if value:
        from .config import load_config_file

        try:
            data = load_config_file(value)
        except LtclipError as err:
            raise typer.BadParameter(str(err)) from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
        known = {p.name for p in ctx.command.params} - {"config"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise typer.BadParameter(f"{value}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# Options shared by every command that reads a dataset.
DatasetName = Annotated[str, typer.Option("--dataset", "-d", help="Registered dataset (`ltclip datasets list`) or 'custom'.")]
DataRoot = Annotated[str, typer.Option("--data-root", help="Folder the split files' image paths are relative to.")]
ManifestDir = Annotated[Optional[str], typer.Option("--manifest-dir", help="Folder holding the split files (default: the data root).")]
TrainList = Annotated[Optional[str], typer.Option("--train-list", help="Your own train split file ('relative/path label' lines).")]
ValList = Annotated[Optional[str], typer.Option("--val-list", help="Your own val split file.")]
TestList = Annotated[Optional[str], typer.Option("--test-list", help="Your own test split file.")]
Classnames = Annotated[Optional[str], typer.Option("--classnames", help="Class-name file ('key name' or one name per line, or categories JSON).")]
Templates = Annotated[Optional[str], typer.Option("--templates", help="Prompt templates: openai_imagenet, simple, synthetic, cifar, or a file.")]
Imbalance = Annotated[float, typer.Option("--imbalance", help="CIFAR-100-LT imbalance ratio (10, 50, 100).")]
Download = Annotated[bool, typer.Option("--download", help="Let torchvision download CIFAR-100 (needs internet).")]
ManyThreshold = Annotated[int, typer.Option("--many", help="Classes with more training images than this are 'many'.")]
FewThreshold = Annotated[int, typer.Option("--few", help="Classes with fewer training images than this are 'few'.")]
ConfigFile = Annotated[Optional[str], typer.Option("--config", callback=_load_config, is_eager=True, help="TOML or YAML file of option values.")]


def _data_config(dataset, data_root, manifest_dir, train_list, val_list, test_list, classnames, templates, imbalance, download, seed=0):
    from .config import DataConfig

    return DataConfig(dataset, data_root, manifest_dir, train_list, val_list, test_list, classnames, templates, imbalance, download, seed)


def _open_dataset(*options):
    """The dataset the shared data options name (``datasets info`` / ``check``)."""
    from .data.registry import open_dataset

    return open_dataset(_data_config(*options))


def _console():
    from rich.console import Console

    return Console()


# ---------------------------------------------------------------- datasets
@datasets_app.command("list")
@guarded
def datasets_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """The registered datasets with classes and split sizes."""
    from rich.table import Table

    from .data.registry import list_datasets

    specs = list_datasets()
    if as_json:
        typer.echo(json.dumps([{"name": s.name, "title": s.title, "classes": s.num_classes, "sizes": s.sizes, "get": s.get} for s in specs], indent=2))
        return
    table = Table(title="Registered datasets")
    for col in ("name", "title", "classes", "train", "val", "test"):
        table.add_column(col, justify="right" if col in ("classes", "train", "val", "test") else "left")
    for s in specs:
        sizes = [f"{s.sizes[k]:,}" if k in s.sizes else "—" for k in ("train", "val", "test")]
        table.add_row(s.name, s.title, str(s.num_classes or "from files"), *sizes)
    _console().print(table)
    typer.echo("Own data: --dataset custom --data-root R --train-list a.txt --test-list b.txt --classnames names.txt")


@datasets_app.command("info")
@guarded
def datasets_info(
    name: Annotated[str, typer.Argument(help="Dataset name, or 'custom'.")],
    data_root: DataRoot = ".",
    manifest_dir: ManifestDir = None,
    train_list: TrainList = None,
    val_list: ValList = None,
    test_list: TestList = None,
    classnames: Classnames = None,
    imbalance: Imbalance = 100.0,
    download: Download = False,
    many: ManyThreshold = 100,
    few: FewThreshold = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Class-count profile of the train split: max/min per class, imbalance ratio, many/medium/few."""
    from .data.profile import class_profile

    ds = _open_dataset(name, data_root, manifest_dir, train_list, val_list, test_list, classnames, None, imbalance, download)
    prof = class_profile(ds.train_counts(), many, few)
    prof = {"dataset": ds.name, **prof, "splits": {k: len(v) for k, v in ds.splits.items()}}
    if as_json:
        typer.echo(json.dumps(prof, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{ds.name}: train class profile")
    table.add_column("property")
    table.add_column("value", justify="right")
    rows = [
        ("classes", f"{prof['classes']:,}"),
        ("max / min per class", f"{prof['max_per_class']:,} / {prof['min_per_class']:,}"),
        ("imbalance ratio", f"{prof['imbalance_ratio']:.1f}"),
        (f"many (> {many})", str(prof["many"])),
        (f"medium ({few}–{many})", str(prof["medium"])),
        (f"few (< {few})", str(prof["few"])),
    ] + [(f"{k} images", f"{v:,}") for k, v in prof["splits"].items()]
    for row in rows:
        table.add_row(*row)
    _console().print(table)


@datasets_app.command("check")
@guarded
def datasets_check(
    name: Annotated[str, typer.Argument(help="Dataset name, or 'custom'.")],
    data_root: DataRoot = ".",
    manifest_dir: ManifestDir = None,
    train_list: TrainList = None,
    val_list: ValList = None,
    test_list: TestList = None,
    classnames: Classnames = None,
    imbalance: Imbalance = 100.0,
    download: Download = False,
    workers: Annotated[int, typer.Option("--workers", help="Parallel decoders.")] = 8,
):
    """Every image of every split exists and decodes; lists bad files and exits 1 if any."""
    from .progress import RichProgress

    from .data.profile import check_images

    ds = _open_dataset(name, data_root, manifest_dir, train_list, val_list, test_list, classnames, None, imbalance, download)
    total = sum(len(s) for s in ds.splits.values())
    progress = RichProgress()
    with progress.task(f"checking {ds.name}", total, "img") as advance:
        bad = check_images(ds, workers, advance)
    for path, problem in bad:
        typer.echo(f"bad image: {path}: {problem}", err=True)
    if bad:
        typer.echo(f"{len(bad)} of {total} images are missing or corrupt", err=True)
        raise typer.Exit(1)
    typer.echo(f"all {total:,} images of {', '.join(ds.splits)} decode")


@datasets_app.command("make-synthetic")
@guarded
def datasets_make_synthetic(
    out: Annotated[str, typer.Argument(help="Output folder (images + split files + classnames.txt).")],
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 20,
    imbalance: Annotated[float, typer.Option(help="Max/min training images per class.")] = 100.0,
    max_per_class: Annotated[int, typer.Option(help="Training images of the largest class.")] = 200,
    val_per_class: Annotated[int, typer.Option(help="Validation images per class.")] = 20,
    test_per_class: Annotated[int, typer.Option(help="Test images per class.")] = 20,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same images).")] = 0,
    workers: Annotated[int, typer.Option(help="Parallel generator processes.")] = 1,
):
    """Draw the built-in long-tailed set of shapes × colours × textures."""
    from .data.synthetic import make_synthetic

    summary = make_synthetic(
        out, classes=classes, imbalance=imbalance, max_per_class=max_per_class, val_per_class=val_per_class,
        test_per_class=test_per_class, size=size, seed=seed, workers=workers,
    )
    typer.echo(json.dumps(summary, indent=2, default=str))


# ---------------------------------------------------------------- stages
@app.command("extract")
@guarded
def extract(
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder: train.h5, val.h5, test.h5, text.h5.")],
    config: ConfigFile = None,
    dataset: DatasetName = "synthetic",
    data_root: DataRoot = ".",
    manifest_dir: ManifestDir = None,
    train_list: TrainList = None,
    val_list: ValList = None,
    test_list: TestList = None,
    classnames: Classnames = None,
    templates: Templates = None,
    imbalance: Imbalance = 100.0,
    download: Download = False,
    splits: Annotated[str, typer.Option("--splits", help="Comma-separated splits to extract (default: every split the dataset has).")] = "",
    model: Annotated[str, typer.Option("--model", "-m", help="open_clip model name (or local-dir:/path).")] = "ViT-B-16",
    pretrained: Annotated[str, typer.Option("--pretrained", "-p", help="open_clip tag, checkpoint file, or 'none' (random).")] = "openai",
    preprocess_from: Annotated[Optional[str], typer.Option("--preprocess-from", help="Tag whose preprocessing a checkpoint file needs.")] = None,
    tokens: Annotated[bool, typer.Option("--tokens/--no-tokens", help="Also store the ViT token sequence (the decoder head needs it).")] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 256,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader decode workers.")] = 4,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16 (autocast).")] = "fp32",
    test_views: Annotated[str, typer.Option("--test-views", help="center, fivecrop or tencrop views of val/test images.")] = "center",
    train_views: Annotated[int, typer.Option("--train-views", help="K seeded augmented views per training image (0: the model's preprocessing).")] = 0,
    bad_images: Annotated[str, typer.Option("--bad-images", help="fail, or skip (logged; zero features).")] = "fail",
    block_size: Annotated[int, typer.Option("--block-size", help="Rows written (and resumed) together.")] = 1024,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the train views.")] = 0,
):
    """Run the frozen CLIP image encoder once; write embeddings (+ tokens) to a resumable HDF5 cache."""
    from .config import ExtractConfig
    from .progress import RichProgress
    from .stages.extract import run_extract

    data = _data_config(dataset, data_root, manifest_dir, train_list, val_list, test_list, classnames, templates, imbalance, download)
    cfg = ExtractConfig(
        data=data, out=out, splits=tuple(s.strip() for s in splits.split(",") if s.strip()), model=model, pretrained=pretrained,
        preprocess_from=preprocess_from, tokens=tokens, batch_size=batch_size, workers=workers, device=device,
        precision=precision, test_views=test_views, train_views=train_views, bad_images=bad_images,
        block_size=block_size, seed=seed,
    )
    progress = RichProgress()
    summary = run_extract(cfg, progress)
    for item in summary["splits"]:
        progress.log(f"{item['split']}: {item['status']} ({item['rows']:,} rows)")
    progress.log(f"cache: {summary['out']}")


@cache_app.command("info")
@guarded
def cache_info(
    path: Annotated[str, typer.Argument(help="Cache folder (or one .h5 file).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Provenance, shapes, completeness and size on disk of a feature cache."""
    from .cache_info import describe_cache

    info = describe_cache(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.table import Table

    console = _console()
    table = Table(title=f"feature cache {path}")
    for col in ("file", "rows", "views", "embeds", "tokens", "complete", "size"):
        table.add_column(col)
    for f in info["files"]:
        table.add_row(f["file"], f"{f['rows']:,}", str(f.get("views", "")), str(f.get("embeds", "")), str(f.get("tokens") or "—"),
                      str(f.get("complete", "")), f"{f['bytes'] / 2**20:,.1f} MiB")
    console.print(table)
    prov = Table(title="provenance")
    prov.add_column("attribute")
    prov.add_column("value")
    for key, value in info["provenance"].items():
        prov.add_row(key, str(value))
    console.print(prov)


def _not_built(stage: str):
    typer.echo(f"error: `ltclip {stage}` is not built yet in this version", err=True)
    raise typer.Exit(2)


def _choices(kind: str) -> str:
    """The registered names of ``kind`` for help texts (read from the registries, imported lazily)."""
    import importlib

    module, attr = {"loss": ("ltclip.losses", "LOSSES"), "head": ("ltclip.models.heads", "HEADS"),
                    "sampler": ("ltclip.data.samplers", "SAMPLERS"), "two-stage": ("ltclip.two_stage", "TWO_STAGE")}[kind]
    return ", ".join(getattr(importlib.import_module(module), attr).names())


def _check_choice(kind: str, value: str | None) -> None:
    if value is not None and value not in _choices(kind).split(", "):
        import difflib

        close = difflib.get_close_matches(value, _choices(kind).split(", "), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LtclipError(f"--{kind} {value!r}: unknown{hint}; choose one of {_choices(kind)}")


@app.command("train-head")
@guarded
def train_head(
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder (config, checkpoints, train_log.jsonl, model.pt).")],
    config: ConfigFile = None,
    features: Annotated[str, typer.Option("--features", "-f", help="Feature cache folder from `ltclip extract`.")] = "",
    head: Annotated[str, typer.Option("--head", help="decoder, linear, cosine, mlp or text-init (`ltclip list heads`).")] = "decoder",
    head_opts: Annotated[list[str], typer.Option("--head-opt", help="Head option key=value (repeatable), e.g. depth=3.")] = [],
    loss: Annotated[str, typer.Option("--loss", help="Loss name (`ltclip list losses`).")] = "ce",
    loss_opts: Annotated[list[str], typer.Option("--loss-opt", help="Loss option key=value (repeatable), e.g. tau=1.")] = [],
    sampler: Annotated[str, typer.Option("--sampler", help="instance, class-balanced, sqrt or progressive.")] = "instance",
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (one epoch = as many draws as training rows).")] = 10,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Total optimiser steps instead of --epochs.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw or sgd.")] = "adamw",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, step or constant.")] = "cosine",
    warmup: Annotated[float, typer.Option("--warmup", help="Linear warm-up, in epochs.")] = 0.0,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm (0: off).")] = 0.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    max_ram: Annotated[Optional[str], typer.Option("--max-ram", help="Stream token caches larger than this, e.g. 8G (default: half of the available memory).")] = None,
    val_split: Annotated[str, typer.Option("--val-split", help="Split for model selection.")] = "val",
    from_run: Annotated[Optional[str], typer.Option("--from", help="Finished first-stage run for --two-stage / --posthoc-la.")] = None,
    two_stage: Annotated[Optional[str], typer.Option("--two-stage", help="crt, lws, tau-norm, disalign, marc or ncm.")] = None,
    two_stage_opts: Annotated[list[str], typer.Option("--two-stage-opt", help="Second-stage option key=value (repeatable).")] = [],
    posthoc_la: Annotated[bool, typer.Option("--posthoc-la", help="Post-hoc logit adjustment, tau chosen on val.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
):
    """Train a decoder/linear head with an imbalance-aware loss on a feature cache (or a second stage)."""
    from .config import TrainHeadConfig
    from .progress import RichProgress
    from .stages.train_head import run_train_head

    _check_choice("head", head)
    _check_choice("loss", loss)
    _check_choice("sampler", sampler)
    _check_choice("two-stage", two_stage)
    if not features and not from_run:
        raise LtclipError("--features DIR is required (or --from RUN for a second stage)")
    cfg = TrainHeadConfig(
        features=features, out=out, head=head, head_opts=tuple(head_opts), loss=loss, loss_opts=tuple(loss_opts),
        sampler=sampler, epochs=epochs, steps=steps, batch_size=batch_size, optimizer=optimizer, lr=lr,
        weight_decay=weight_decay, momentum=momentum, schedule=schedule, warmup=warmup, grad_clip=grad_clip, seed=seed,
        device=device, max_ram=max_ram, val_split=val_split, from_run=from_run, two_stage=two_stage,
        two_stage_opts=tuple(two_stage_opts), posthoc_la=posthoc_la,
    )
    progress = RichProgress()
    result = run_train_head(cfg, progress, resume=resume)
    best = result["best"] or {}
    tail = f", best val balanced accuracy {best['val_balanced_accuracy']:.2f}% (epoch {best['epoch']})" if best.get("val_balanced_accuracy") is not None and best.get("epoch") is not None else ""
    progress.log(f"run: {result['out']}{tail}")


@app.command("list")
@guarded
def list_registered(kind: Annotated[str, typer.Argument(help="losses, heads, samplers or two-stage.")]):
    """Names (and options with defaults) of the registered losses, heads, samplers, two-stage methods."""
    singular = {"losses": "loss", "heads": "head", "samplers": "sampler", "two-stage": "two-stage"}
    if kind not in singular:
        raise LtclipError(f"ltclip list {kind!r}: choose losses, heads, samplers or two-stage")
    import importlib

    defaults_of = {"losses": ("ltclip.losses", "loss_defaults"), "heads": ("ltclip.models.heads", "head_defaults"),
                   "two-stage": ("ltclip.two_stage", "two_stage_defaults")}.get(kind)
    for name in _choices(singular[kind]).split(", "):
        options = getattr(importlib.import_module(defaults_of[0]), defaults_of[1])(name) if defaults_of else {}
        typer.echo(f"{name:20s} {' '.join(f'{k}={v}' for k, v in options.items())}".rstrip())


@app.command("finetune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune():
    """Fine-tune the backbone end to end (full, last-k blocks, prompts, LoRA)."""
    _not_built("finetune")


@app.command("eval")
@guarded
def evaluate(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Run folders from `ltclip train-head`.")] = None,
    config: ConfigFile = None,
    split: Annotated[str, typer.Option("--split", help="Split of each run's cache to evaluate.")] = "test",
    features: Annotated[Optional[str], typer.Option("--features", "-f", help="Cache folder for the baselines.")] = None,
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="Zero-shot CLIP with the cache's text embeddings.")] = False,
    knn: Annotated[int, typer.Option("--knn", help="kNN baseline with K neighbours from the train cache (0: off).")] = 0,
    ncm: Annotated[bool, typer.Option("--ncm", help="Nearest-class-mean baseline.")] = False,
    retrieval_mix: Annotated[float, typer.Option("--retrieval-mix", help="Blend each run with kNN votes: weight alpha in [0, 1].")] = 0.0,
    retrieval_k: Annotated[int, typer.Option("--retrieval-k", help="Neighbours for --retrieval-mix.")] = 10,
    temperature: Annotated[float, typer.Option("--temperature", help="kNN vote temperature.")] = 0.07,
    views: Annotated[str, typer.Option("--views", help="Test views: mean (average logits) or first.")] = "mean",
    many: ManyThreshold = 100,
    few: FewThreshold = 20,
    backend: Annotated[str, typer.Option("--backend", help="kNN search: auto, faiss or torch.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1024,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Allow runs of different datasets in one report.")] = False,
    report: Annotated[Optional[str], typer.Option("--report", help="Markdown table to write.")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="JSON results to write.")] = None,
    csv_out: Annotated[Optional[str], typer.Option("--csv", help="CSV results to write.")] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", help="PNG of per-class accuracy vs training frequency.")] = None,
):
    """Shot-group metrics (many/medium/few/all) for runs and zero-shot / kNN / NCM baselines."""
    from .config import EvalConfig
    from .report import markdown_table
    from .stages.evaluate import run_eval

    cfg = EvalConfig(
        runs=tuple(runs or ()), features=features, split=split, zero_shot=zero_shot, knn=knn, ncm=ncm,
        retrieval_mix=retrieval_mix, retrieval_k=retrieval_k, temperature=temperature, views=views, many=many, few=few,
        backend=backend, batch_size=batch_size, device=device, allow_mixed=allow_mixed, report=report, json=json_out,
        csv=csv_out, plot=plot,
    )
    results = run_eval(cfg)
    typer.echo(markdown_table(results))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
