"""Rows in, finished blocks out: :class:`BlockWriter` collects rows that arrive in any order (a
DataLoader's batches, which need not line up with blocks) and hands each block to its
:class:`~ltclip.artifacts.store.FeatureWriter` once every row of it has arrived.

A block is written whole and only then recorded as done (the writer's crash-safe protocol, see
``docs/artifacts.md``), so the rows of a half-filled block live only here: a killed run loses them
and a rerun computes them again. A writer reopened on an unfinished file asks for the rows of the
blocks not yet done, from the first unfinished block on (:meth:`BlockWriter.pending_rows`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .tokens import EncodedTokens
from .writer import FeatureWriter


class _Block:
    """The rows of one block received so far, per dataset, and which of them have arrived."""

    def __init__(self, size: int, arrays: dict[str, np.ndarray]):
        self.arrays = {name: np.empty((size, *a.shape[1:]), a.dtype) for name, a in arrays.items()}
        self.arrived = np.zeros(size, bool)


class BlockWriter:
    """Feeds rows, given with their row indices in any order, to ``writer`` block by block.

    Row indices are rows of the whole split (file row + ``writer.row_start``, as for a shard), the
    indices :meth:`pending_rows` lists. :meth:`add` buffers rows and writes every block whose rows
    have all arrived (the last block may be shorter than ``block_size``); ``pending_blocks()`` and
    ``done`` say what is left, counting the blocks already done when the file was opened.
    """

    def __init__(self, writer: FeatureWriter):
        self.writer = writer
        self._pending = set(writer.pending_blocks())
        self._open: dict[int, _Block] = {}  # blocks with some rows arrived

    def pending_blocks(self) -> list[int]:
        """The blocks not written yet, in increasing order."""
        return sorted(self._pending)

    @property
    def done(self) -> bool:
        """Whether every block of the file is written."""
        return not self._pending

    def pending_rows(self) -> list[int]:
        """The split rows of the blocks not written yet, in increasing order: what is left to compute
        (rows of a block that arrived without completing it are listed too)."""
        start = self.writer.row_start
        return [start + r for b in sorted(self._pending) for r in range(*self.writer.block_range(b))]

    def add(self, rows: Sequence[int] | np.ndarray, embeds, tokens: EncodedTokens | None = None, pooled=None) -> list[int]:
        """Take rows ``rows`` (split row indices) of ``embeds`` ((n, D) or (n, V, D)) and, for a file
        with tokens, their :class:`EncodedTokens` in the file's format ((n, [V,] T', W')), for a file
        with pooled features those ((n, [V,] W)); write the
        blocks they complete, in increasing order, and return them. A row may arrive only once; rows
        that are refused (out of range, twice, of a written block) leave every block as it was."""
        local = np.asarray(rows, dtype=np.int64).reshape(-1) - self.writer.row_start
        arrays = self._arrays(local.size, embeds, tokens, pooled)
        written = []
        for block, pick in self._by_block(local):
            offsets = local[pick] - block * self.writer.block_size
            if self._receive(block, offsets, {name: a[pick] for name, a in arrays.items()}):
                written.append(block)
        return written

    def _by_block(self, local: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``(block, positions in local of its rows)`` per block that file rows ``local`` fall in,
        in increasing order; refuses rows out of range, twice, or of a block already written."""
        writer, start = self.writer, self.writer.row_start
        if local.size and (local.min() < 0 or local.max() >= writer.num_rows):
            raise IndexError(f"rows must lie in [{start}, {start + writer.num_rows}) of {writer.path}")
        unique, counts = np.unique(local, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"row {start + unique[counts > 1][0]} of {writer.path} arrived twice")
        of_block = local // writer.block_size
        groups = []
        for block in np.unique(of_block).tolist():
            pick = np.flatnonzero(of_block == block)
            if block not in self._pending:
                first = start + block * writer.block_size
                raise ValueError(f"block {block} of {writer.path} (from row {first}) is already written")
            if block in self._open:
                again = local[pick][self._open[block].arrived[local[pick] - block * writer.block_size]]
                if again.size:
                    raise ValueError(f"row {start + again[0]} of {writer.path} arrived twice")
            groups.append((block, pick))
        return groups

    def _arrays(self, n: int, embeds, tokens: EncodedTokens | None, pooled) -> dict[str, np.ndarray]:
        """``n`` given rows per dataset, each in its stored dtype and row shape."""
        writer = self.writer
        if (tokens is None) == writer.has_tokens:
            raise ValueError(f"{writer.path} {'needs' if tokens is None else 'has no'} tokens")
        if (pooled is None) == writer.has_pooled:
            raise ValueError(f"{writer.path} {'needs' if pooled is None else 'has no'} pooled features")
        arrays = {"embeds": writer.as_rows("embeds", embeds, n)}
        if pooled is not None:
            arrays["pooled"] = writer.as_rows("pooled", pooled, n)
        if tokens is not None:
            arrays["tokens"] = writer.as_rows("tokens", tokens.values, n)
            if (tokens.scales is None) != (writer.codec.format.scale == "none"):
                raise ValueError(f"{writer.path} stores tokens as {writer.codec.format.describe()}: "
                                 f"token scales {'missing' if tokens.scales is None else 'not expected'}")
            if tokens.scales is not None:
                arrays["token_scales"] = writer.as_rows("token_scales", tokens.scales, n)
        return arrays

    def _receive(self, block: int, offsets: np.ndarray, arrays: dict[str, np.ndarray]) -> bool:
        """Put rows ``offsets`` of ``block`` in place; write the block if that completes it."""
        if block not in self._open:
            lo, hi = self.writer.block_range(block)
            self._open[block] = _Block(hi - lo, arrays)
        buffer = self._open[block]
        for name, a in arrays.items():
            buffer.arrays[name][offsets] = a
        buffer.arrived[offsets] = True
        if not buffer.arrived.all():
            return False
        parts = buffer.arrays
        tokens = EncodedTokens(parts["tokens"], parts.get("token_scales")) if "tokens" in parts else None
        self.writer.write_block(block, parts["embeds"], tokens, parts.get("pooled"))
        del self._open[block]
        self._pending.remove(block)
        return True
