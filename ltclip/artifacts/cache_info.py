"""Summaries of a feature-cache folder for ``ltclip cache info``."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import LtclipError
from .store import FeatureCache, load_text_embeddings

PROVENANCE_KEYS = ("model", "pretrained", "checkpoint_sha256", "quick_gelu", "preprocess", "dataset", "ltclip_version", "schema_version", "num_classes")


def describe_cache(path: str | Path) -> dict:
    """Per-file rows/shapes/token format/completeness/size (on disk, and per image: embeddings,
    token rows and their scales, all views) and the shared provenance attributes; ``bytes`` is the total."""
    path = Path(path)
    # train.h5 first: the other files are checked against it, so its own damage is named as its own
    files = sorted(path.glob("*.h5"), key=lambda f: (f.name != "train.h5", f.name)) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise LtclipError(f"{path}: no feature cache here (expected train.h5/val.h5/test.h5); run `ltclip extract`")
    out, provenance = [], {}
    for f in files:
        if f.name == "text.h5":
            text = load_text_embeddings(f)
            out.append({"file": f.name, "rows": len(text.classnames), "embeds": list(text.embeds.shape),
                        "templates": len(text.templates), "complete": True, "bytes": f.stat().st_size})
            continue
        with FeatureCache(f, allow_incomplete=True) as cache:
            attrs = cache.attrs
            per_image = cache.views * cache.embed_dim * cache.embed_dtype.itemsize + (cache.token_row_bytes or 0)
            out.append({
                "file": f.name, "split": attrs.get("split"), "rows": cache.num_rows, "views": cache.views,
                "embeds": [cache.num_rows, cache.views, cache.embed_dim],
                "tokens": list(cache.token_shape) if cache.has_tokens else None,
                "token_format": cache.token_format.describe() if cache.has_tokens else None,
                "stored_tokens": list(cache.codec.stored_shape) if cache.has_tokens else None,
                "bytes_per_image": per_image, "data_bytes": per_image * cache.num_rows,
                "complete": cache.complete, "bytes": cache.nbytes_on_disk, "manifest_sha256": attrs.get("manifest_sha256"),
            })
            provenance.update({k: attrs[k] for k in PROVENANCE_KEYS if k in attrs})
    return {"path": str(path), "files": out, "provenance": provenance, "bytes": sum(f["bytes"] for f in out)}
