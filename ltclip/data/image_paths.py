"""The image files a user names: files, folders searched for images, and the lines of a list file."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import LtclipError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_paths(paths: tuple[str, ...], list_file: str | None) -> list[Path]:
    """The images named: files as given, folders searched recursively for image extensions, and the
    lines of ``--list`` (relative paths: to the list's folder; blank lines and ``#`` comments skipped)."""
    if not paths and not list_file:
        raise LtclipError("no images named: pass image files or folders after the run (or --list FILE)")
    named = [(Path(p), p) for p in paths]
    if list_file:
        listed = Path(list_file)
        try:
            lines = listed.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise LtclipError(f"--list {list_file}: cannot read it ({type(err).__name__}); pass a text file of image paths") from None
        named += [(listed.parent / line.strip(), f"--list {list_file}: {line.strip()}") for line in lines
                  if line.strip() and not line.lstrip().startswith("#")]
    found: list[Path] = []
    for path, shown in named:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.exists():
            found.append(path)
        else:
            raise LtclipError(f"{shown}: no such file or folder; pass image files or folders of images")
    if not found:
        where = ", ".join([*paths, *([f"--list {list_file}"] if list_file else [])])
        raise LtclipError(f"no images found in {where} (looked for {', '.join(IMAGE_EXTENSIONS)}); pass image files or folders")
    return found
