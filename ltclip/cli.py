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
        ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in data.items()}}
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


def _open_dataset(cfg):
    from .data.registry import load_dataset

    return load_dataset(
        cfg.dataset,
        cfg.data_root,
        manifest_dir=cfg.manifest_dir,
        split_files=cfg.split_files(),
        classnames_file=cfg.classnames,
        templates=cfg.templates,
        imbalance=cfg.imbalance,
        download=cfg.download,
        seed=cfg.seed,
    )


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

    cfg = _data_config(name, data_root, manifest_dir, train_list, val_list, test_list, classnames, None, imbalance, download)
    ds = _open_dataset(cfg)
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

    cfg = _data_config(name, data_root, manifest_dir, train_list, val_list, test_list, classnames, None, imbalance, download)
    ds = _open_dataset(cfg)
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
    splits: Annotated[str, typer.Option("--splits", help="Comma-separated splits to extract.")] = "train,val,test",
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


@app.command("train-head", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_head():
    """Train a decoder/linear head with an imbalance-aware loss on a feature cache."""
    _not_built("train-head")


@app.command("finetune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune():
    """Fine-tune the backbone end to end (full, last-k blocks, prompts, LoRA)."""
    _not_built("finetune")


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def evaluate():
    """Shot-group metrics for runs and zero-shot / kNN baselines; reports and plots."""
    _not_built("eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
