"""Token formats: how a cache shrinks the vision transformer's token sequences, and how it restores them.

A format is applied in this order when writing and undone in reverse when reading:

1. **pooling** ``pool = k``: CLS is kept, the patch grid (g × g) is averaged over k × k windows,
   leaving ``1 + (g/k)²`` tokens (k must divide g);
2. **PCA** ``pca = W'``: each token ``x`` is stored as ``(x - mean) @ components.T`` (W' coordinates),
   with the basis fitted on train tokens and stored in the cache; reading reconstructs
   ``z @ components + mean``, so the head sees the model's width W either way;
3. **storage dtype**: float16, or int8 / fp8 (e4m3, stored as its raw bytes in uint8) with a
   float32 scale per token (``scale="token"``: max |value| of the token / 127 or 448) or per
   channel (``scale="channel"``: max over the row's tokens).

Encoding and decoding are torch functions that run wherever their tensors are: extraction encodes
on the model's device, readers decode on the training device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ...config.values import TOKEN_DTYPES, TOKEN_SCALES
from ...core.errors import LtclipError

_QMAX = {"int8": 127.0, "fp8": 448.0}  # fp8: e4m3's largest finite value
STORED_DTYPES = {"float16": np.dtype(np.float16), "int8": np.dtype(np.int8), "fp8": np.dtype(np.uint8)}
_FP8 = getattr(torch, "float8_e4m3fn", None)
BASIS_DATASETS = ("token_pca_mean", "token_pca_components")  # the PCA basis in a cache file


class EncodedTokens(NamedTuple):
    """Stored token rows: ``values`` (..., T', W') in the stored dtype and their float32 ``scales``
    ((..., T') per token, (..., W') per channel) or None for float16."""

    values: np.ndarray
    scales: np.ndarray | None


@dataclass(frozen=True)
class TokenFormat:
    """How token sequences are stored; the default is the model's sequence in float16."""

    pool: int = 1
    dtype: str = "float16"
    scale: str = "none"  # "token" or "channel" for int8/fp8
    pca: int = 0  # stored width; 0 keeps the model's width

    @classmethod
    def from_options(cls, pool: int = 1, dtype: str = "float16", scale: str | None = None, pca: int = 0) -> "TokenFormat":
        """The format the extract options ``--token-pool/--token-dtype/--token-scale/--token-pca`` ask for."""
        if dtype not in TOKEN_DTYPES:
            raise LtclipError(f"--token-dtype {dtype!r}: expected one of {', '.join(TOKEN_DTYPES)}")
        if dtype == "fp8" and _FP8 is None:
            raise LtclipError(f"--token-dtype fp8: this torch {torch.__version__} has no float8_e4m3fn; use int8")
        if dtype == "float16" and scale is not None:
            raise LtclipError(f"--token-scale {scale}: float16 tokens have no scale; drop it or pass --token-dtype int8 or fp8")
        if scale is not None and scale not in TOKEN_SCALES:
            raise LtclipError(f"--token-scale {scale!r}: expected one of {', '.join(TOKEN_SCALES)}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise LtclipError(f"--token-pool {pool!r}: expected an integer >= 1 (1: no pooling)")
        if isinstance(pca, bool) or not isinstance(pca, int) or pca < 0:
            raise LtclipError(f"--token-pca {pca!r}: expected an integer >= 0 (0: no PCA)")
        return cls(pool=pool, dtype=dtype, scale=scale or ("none" if dtype == "float16" else "token"), pca=pca)

    @property
    def is_plain(self) -> bool:
        """Stored values are the tokens themselves (no pooling, PCA or scale)."""
        return self.pool == 1 and self.pca == 0 and self.dtype == "float16"

    def check(self, seq_shape: tuple[int, int]) -> None:
        """Refuse a format the model's sequence ``(T, W)`` cannot take, naming the option."""
        tokens, width = seq_shape
        if self.pool > 1:
            grid = math.isqrt(tokens - 1)
            if grid * grid != tokens - 1:
                raise LtclipError(f"--token-pool {self.pool}: {tokens} tokens are not CLS + a square patch grid; use --token-pool 1")
            if grid % self.pool:
                fits = [k for k in range(1, grid + 1) if grid % k == 0]
                raise LtclipError(f"--token-pool {self.pool}: must divide the {grid}×{grid} patch grid; choose one of {fits}")
        if self.pca >= width:
            raise LtclipError(f"--token-pca {self.pca}: must be below the token width {width} (0: no PCA)")

    def stored_shape(self, seq_shape: tuple[int, int]) -> tuple[int, int]:
        """``(T', W')`` of the stored rows of a ``(T, W)`` sequence."""
        tokens, width = seq_shape
        if self.pool > 1:
            tokens = 1 + ((math.isqrt(tokens - 1)) // self.pool) ** 2
        return tokens, self.pca or width

    def scale_shape(self, seq_shape: tuple[int, int]) -> tuple[int] | None:
        """Trailing shape of the per-row scales, or None."""
        stored = self.stored_shape(seq_shape)
        return None if self.scale == "none" else ((stored[0],) if self.scale == "token" else (stored[1],))

    def attrs(self, seq_shape: tuple[int, int]) -> dict:
        """The file attributes that record the format (with the model's sequence length)."""
        return {"token_dtype": self.dtype, "token_pca": self.pca, "token_pool": self.pool, "token_scale": self.scale,
                "token_source_tokens": int(seq_shape[0])}

    @classmethod
    def from_attrs(cls, path, attrs: dict) -> "TokenFormat":
        """The format a file records; files without token attributes hold plain tokens."""
        if "token_dtype" not in attrs:
            return cls()
        dtype, scale = attrs.get("token_dtype"), attrs.get("token_scale", "none")
        if dtype not in TOKEN_DTYPES or scale not in ("none",) + TOKEN_SCALES or (scale == "none") != (dtype == "float16"):
            raise LtclipError(f"{path} stores tokens as {dtype!r} with scale {scale!r}, a format this ltclip cannot read; upgrade ltclip")
        if dtype == "fp8" and _FP8 is None:
            raise LtclipError(f"{path} stores fp8 tokens but this torch {torch.__version__} has no float8_e4m3fn; upgrade torch")
        return cls(pool=int(attrs.get("token_pool", 1)), dtype=dtype, scale=scale, pca=int(attrs.get("token_pca", 0)))

    def describe(self) -> str:
        parts = [self.dtype if self.scale == "none" else f"{self.dtype} per-{self.scale}"]
        if self.pool > 1:
            parts.append(f"pool {self.pool}×{self.pool}")
        if self.pca:
            parts.append(f"PCA {self.pca}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- the transforms


def pool_tokens(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """CLS followed by the k × k averages of the patch grid, row-major: (..., T, W) -> (..., 1 + (g/k)², W)."""
    if k == 1:
        return tokens
    *lead, count, width = tokens.shape
    grid = math.isqrt(count - 1)
    flat = tokens.reshape(-1, count, width)
    patches = flat[:, 1:].reshape(-1, grid, grid, width).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(patches, k).flatten(2).transpose(1, 2)
    return torch.cat([flat[:, :1], pooled], 1).reshape(*lead, -1, width)


class PcaFit:
    """Accumulates token statistics in float64 and gives the top principal directions."""

    def __init__(self, width: int):
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.outer = torch.zeros(width, width, dtype=torch.float64)

    def add(self, tokens: torch.Tensor) -> None:
        x = tokens.reshape(-1, tokens.shape[-1]).to("cpu", torch.float64)
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def basis(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``(mean (W,), components (width, W))`` float32: orthonormal rows, largest variance first,
        each signed so that its largest entry is positive (the same basis on every run)."""
        if self.count < 2:
            raise LtclipError("--token-pca: needs tokens of at least one training image to fit the basis")
        mean = self.total / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        _, vectors = torch.linalg.eigh(cov)
        top = vectors[:, -width:].flip(1).T
        sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        return mean.float().numpy(), (top * sign).float().numpy()


class TokenCodec:
    """A format with its PCA basis: encodes model tokens into stored rows and decodes them back."""

    def __init__(self, fmt: TokenFormat, seq_shape: tuple[int, int], basis: tuple[np.ndarray, np.ndarray] | None = None):
        if (basis is None) != (fmt.pca == 0):
            raise ValueError("a PCA format needs its basis (mean, components), and only it")
        self.format, self.seq_shape = fmt, tuple(seq_shape)
        self.stored_shape = fmt.stored_shape(self.seq_shape)
        self.decoded_shape = (self.stored_shape[0], self.seq_shape[1])
        self.basis = basis
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _basis_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = tuple(torch.from_numpy(a).to(device) for a in self.basis)
        return self._on[device]

    def encode(self, tokens: torch.Tensor) -> EncodedTokens:
        """Stored rows of model tokens (..., T, W), computed on their device, returned as numpy."""
        values, scales = self.encode_tensors(tokens)
        return EncodedTokens(values.cpu().numpy(), None if scales is None else scales.cpu().numpy())

    def encode_tensors(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode` as tensors on the tokens' device: ``(values, scales or None)`` (tensor ops
        only, so a traced model that stores and reads tokens, ``decode(*encode_tensors(t))``, keeps them)."""
        fmt = self.format
        z = pool_tokens(tokens.float(), fmt.pool)
        if fmt.pca:
            mean, components = self._basis_on(z.device)
            z = (z - mean) @ components.T
        if fmt.dtype == "float16":
            return z.half(), None
        axis = -1 if fmt.scale == "token" else -2
        qmax = _QMAX[fmt.dtype]
        scales = z.abs().amax(dim=axis) / qmax
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        y = (z / scales.unsqueeze(axis)).clamp(-qmax, qmax)
        values = y.round().to(torch.int8) if fmt.dtype == "int8" else y.to(_FP8).view(torch.uint8)
        return values, scales

    def decode(self, values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """float32 tokens (..., T', W) from stored rows, on their device."""
        fmt = self.format
        z = values.view(_FP8).float() if fmt.dtype == "fp8" else values.float()
        if scales is not None:
            z = z * scales.float().unsqueeze(-1 if fmt.scale == "token" else -2)
        if fmt.pca:
            mean, components = self._basis_on(z.device)
            z = torch.addmm(mean, z.reshape(-1, fmt.pca), components).reshape(*z.shape[:-1], -1)
        return z
