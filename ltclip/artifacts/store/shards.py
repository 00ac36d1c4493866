"""Joining the per-rank shard files of a multi-process extraction into one feature cache.

Rank ``r`` of ``R`` writes rows :func:`~ltclip.artifacts.store.shard_range` ``(N, r, R)`` to
:func:`~ltclip.artifacts.store.shard_path` ``(path, r)`` (``FeatureWriter.open(..., shard=(r, R))``);
:func:`join_shards` checks that the shards are complete, agree and tile ``[0, N)``, and copies them
block by block through the same writer, so the join resumes after a crash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.errors import LtclipError
from ._h5 import ABSENT, RESERVED, SHARD_KEYS, same, show
from .reader import FeatureCache
from .tokens import EncodedTokens
from .writer import FeatureWriter


def join_shards(
    shard_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    keep_shards: bool = False,
) -> Path:
    """Copy complete shard files into one cache at ``out_path`` (resumable), then delete them.

    Every shard must be complete, carry the same identity, and the shards' row ranges must tile
    ``[0, total_rows)`` exactly; the result equals what a single process would have written.
    """
    out_path = Path(out_path)
    for shard in map(Path, shard_paths):
        if not shard.exists():
            raise LtclipError(
                f"shard {shard} is missing; rerun the extraction with the same number of "
                "processes to resume"
            )
    shards = [FeatureCache(p) for p in shard_paths]
    try:
        shards.sort(key=lambda s: s.attrs.get("row_start", 0))
        _check_shards(out_path, shards)
        first = shards[0]
        paths = None if first.paths is None else [p for s in shards for p in s.paths]
        codec = first.codec
        tokens = {} if codec is None else {"token_shape": codec.seq_shape, "token_format": codec.format, "token_basis": codec.basis}
        writer = FeatureWriter.open(
            out_path,
            num_rows=first.attrs["total_rows"],
            embed_dim=first.embed_dim,
            block_size=first.attrs["block_size"],
            attrs={k: v for k, v in first.attrs.items() if k not in RESERVED},
            labels=np.concatenate([s.labels for s in shards]),
            classnames=first.classnames,
            paths=paths,
            views=first.views,
            pooled_dim=first.pooled_dim,
            **tokens,
        )
        names = ("embeds",) if codec is None else ("embeds", "tokens", "token_scales")[: 2 + (codec.format.scale != "none")]
        names += ("pooled",) if first.has_pooled else ()
        with writer:
            for block in writer.pending_blocks():
                start, stop = writer.block_range(block)
                parts = {name: [] for name in names}
                for s in shards:
                    lo = max(start, s.attrs["row_start"]) - s.attrs["row_start"]
                    hi = min(stop, s.attrs["row_stop"]) - s.attrs["row_start"]
                    if lo < hi:
                        for name in names:
                            parts[name].append(s.read_rows(name, lo, hi))
                joined = {name: np.concatenate(parts[name]) for name in names}
                tokens = None if codec is None else EncodedTokens(joined["tokens"], joined.get("token_scales"))
                writer.write_block(block, joined["embeds"], tokens, joined.get("pooled"))
            writer.finalise()
    finally:
        for s in shards:
            s.close()
    if not keep_shards:
        for shard in shard_paths:
            Path(shard).unlink()
    return out_path


def _check_shards(out_path: Path, shards: list[FeatureCache]) -> None:
    """Same identity, same shapes, and row ranges that tile [0, total_rows) exactly."""
    per_shard = {"row_start", "row_stop", "num_rows", "rows_completed"}
    first = shards[0]
    identity = {k: v for k, v in first.attrs.items() if k not in per_shard}
    for s in shards:
        if any(key not in s.attrs for key in SHARD_KEYS):
            raise LtclipError(f"{s.path} is not a shard file (no row_start/row_stop/total_rows)")
        if s.attrs["row_stop"] - s.attrs["row_start"] != s.num_rows:
            raise LtclipError(f"{s.path}: row_start/row_stop do not match its {s.num_rows} rows")
        for key in sorted(set(identity) | set(s.attrs) - per_shard):
            if not same(identity.get(key, ABSENT), s.attrs.get(key, ABSENT)):
                raise LtclipError(
                    f"shards of {out_path} differ: {first.path} has {key}="
                    f"{show(identity.get(key, ABSENT))}, {s.path} has "
                    f"{key}={show(s.attrs.get(key, ABSENT))}; delete the shards and rerun"
                )
        if (s.embed_dim, s.token_shape, s.pooled_dim, s.classnames) != (
            first.embed_dim, first.token_shape, first.pooled_dim, first.classnames
        ):
            raise LtclipError(
                f"shards of {out_path} differ in shape or class names ({first.path}, {s.path}); "
                "delete the shards and rerun"
            )
    row = 0
    for s in shards:
        if s.attrs["row_start"] != row:
            raise LtclipError(
                f"shards of {out_path} do not cover rows [0, {identity['total_rows']}): "
                f"{s.path} starts at row {s.attrs['row_start']}, expected {row}; "
                "pass every shard of one run"
            )
        row = s.attrs["row_stop"]
    if row != identity["total_rows"]:
        raise LtclipError(
            f"shards of {out_path} end at row {row} of {identity['total_rows']}: a shard is "
            "missing; pass every shard of one run"
        )
