"""``ltclip datasets ...`` and ``ltclip cache info``: what a dataset or a feature cache holds."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import console, data_config, data_options, guarded
from .generate import argument, command, extra

datasets_app = typer.Typer(help="Registered datasets: list, class profiles, image checks, the synthetic set.", no_args_is_help=True)
cache_app = typer.Typer(help="Feature caches written by `ltclip extract`.", no_args_is_help=True)


@datasets_app.command("list")
@guarded
def datasets_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """The registered datasets with classes and split sizes."""
    from rich.table import Table

    from ..data.registry import list_datasets

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
    console().print(table)
    typer.echo("Own data: --dataset custom --data-root R --train-list a.txt --test-list b.txt --classnames names.txt")


def datasets_info(values: dict) -> None:
    """Class-count profile of the train split: max/min per class, imbalance ratio, many/medium/few.

    Only the train split is needed (for `custom`: --train-list; no class names, no val/test list).
    """
    many, few, as_json = values["many"], values["few"], values["as_json"]
    data = data_config({**values, "dataset": values["name"]})
    from ..evaluation.profile import class_profile
    from ..data.registry import open_dataset

    ds = open_dataset(data, need_classnames=False)  # a profile / an image check needs no class names
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
    console().print(table)


def datasets_check(values: dict) -> None:
    """Every image of every split exists and decodes; lists bad files and exits 1 if any."""
    data = data_config({**values, "dataset": values["name"]})
    from ..evaluation.profile import check_images
    from ..data.registry import open_dataset
    from ..core.progress import RichProgress

    ds = open_dataset(data, need_classnames=False)  # a profile / an image check needs no class names
    total = sum(len(s) for s in ds.splits.values())
    progress = RichProgress()
    with progress.task(f"checking {ds.name}", total, "img") as advance:
        bad = check_images(ds, values["workers"], advance)
    for path, problem in bad:
        typer.echo(f"bad image: {path}: {problem}", err=True)
    if bad:
        typer.echo(f"{len(bad)} of {total} images are missing or corrupt", err=True)
        raise typer.Exit(1)
    typer.echo(f"all {total:,} images of {', '.join(ds.splits)} decode")


@datasets_app.command("make-synthetic")
@guarded
def datasets_make_synthetic(
    out: Annotated[str, typer.Argument(help="Output folder (images + split files + classnames.txt).", metavar="OUT")],
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 20,
    imbalance: Annotated[float, typer.Option(help="Max/min training images per class.")] = 100.0,
    max_per_class: Annotated[int, typer.Option(help="Training images of the largest class.")] = 200,
    val_per_class: Annotated[int, typer.Option(help="Validation images per class.")] = 20,
    test_per_class: Annotated[int, typer.Option(help="Test images per class.")] = 20,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same images).")] = 0,
    workers: Annotated[int, typer.Option(help="Parallel generator processes.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full description (class names, counts) as JSON.")] = False,
):
    """Draw the built-in long-tailed set of shapes × colours × textures."""
    from ..data.synthetic import make_synthetic

    summary = make_synthetic(
        out, classes=classes, imbalance=imbalance, max_per_class=max_per_class, val_per_class=val_per_class,
        test_per_class=test_per_class, size=size, seed=seed, workers=workers,
    )
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else _synthetic_summary(summary))


def _synthetic_summary(summary: dict) -> str:
    """A few lines: where the set is, its classes, images per split and the imbalance."""
    params, counts, images = summary["params"], summary["train_counts"], summary["images"]
    names = summary["classnames"]
    shown = ", ".join(names[:3]) + (f", …, {names[-1]}" if len(names) > 3 else "")
    done = "already there (same options): nothing redrawn" if summary["skipped"] else "written"
    return "\n".join([
        f"{summary['out_dir']}: synthetic set {done}",
        f"  {params['classes']} classes ({shown}), {params['size']} px",
        f"  train {images['train']:,} images, {counts[0]:,} → {counts[-1]:,} per class (imbalance {counts[0] / counts[-1]:.0f}); "
        f"val {images['val']:,}, test {images['test']:,} ({params['val_per_class']} and {params['test_per_class']} per class)",
        f"  use it: --dataset synthetic --data-root {summary['out_dir']}",
    ])


@cache_app.command("info")
@guarded
def cache_info(
    path: Annotated[str, typer.Argument(help="Cache folder (or one .h5 file).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Provenance, shapes, completeness and size on disk of a feature cache."""
    from ..artifacts.cache_info import describe_cache

    info = describe_cache(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.table import Table

    screen = console()
    table = Table(title=f"feature cache {path}")
    for col in ("file", "rows", "views", "embeds", "tokens", "token format", "bytes/image", "complete", "size"):
        table.add_column(col)
    for f in info["files"]:
        per_image = f"{f['bytes_per_image']:,}" if "bytes_per_image" in f else ""
        table.add_row(f["file"], f"{f['rows']:,}", str(f.get("views", "")), str(f.get("embeds", "")), str(f.get("tokens") or "—"),
                      f.get("token_format") or "—", per_image, str(f.get("complete", "")), f"{f['bytes'] / 2**20:,.1f} MiB")
    table.add_row("total", "", "", "", "", "", "", "", f"{info['bytes'] / 2**20:,.1f} MiB")
    screen.print(table)
    prov = Table(title="provenance")
    prov.add_column("attribute")
    prov.add_column("value")
    for key, value in info["provenance"].items():
        prov.add_row(key, str(value))
    screen.print(prov)


def _register_data_commands() -> None:
    """``datasets info`` and ``datasets check``: a dataset's options (DataConfig's fields) and their own."""
    name = argument("name", str, "Dataset name, or 'custom'.", default=...)
    data = data_options(skip=("dataset", "templates"))
    as_json = extra("as_json", bool, ("--json",), "Print JSON instead of a table.", default=False)
    info = [name, *data, extra("many", int, ("--many",), "Classes with more training images than this are 'many'.", default=100),
            extra("few", int, ("--few",), "Classes with fewer training images than this are 'few'.", default=20), as_json]
    datasets_app.command("info")(guarded(command("info", datasets_info.__doc__, info, datasets_info)))
    check = [name, *data, extra("workers", int, ("--workers",), "Parallel decoders.", default=8)]
    datasets_app.command("check")(guarded(command("check", datasets_check.__doc__, check, datasets_check)))


_register_data_commands()
