"""HDF5 feature store: the cache schema, a resumable (and sharded) writer, a validating reader,
and the class text embeddings.

The layout and the crash-safety protocol are documented in ``docs/artifacts.md``. Modules:
``writer`` (:class:`FeatureWriter`, :func:`write_arrays`, the shard layout), ``blocks``
(:class:`BlockWriter`: rows in any order in, whole blocks out to a writer), ``shards``
(:func:`join_shards`), ``reader`` (:class:`FeatureCache`), ``tokens`` (token formats: pooling, PCA,
int8/fp8), ``text`` (``text.h5``) and ``_h5`` (the HDF5 plumbing and the file header they share).
"""

from ._h5 import FEATURES_KIND, SCHEMA_VERSION, TEXT_KIND
from .blocks import BlockWriter
from .reader import FeatureCache
from .shards import join_shards
from .text import TextEmbeddings, load_text_embeddings, save_text_embeddings, zero_shot_text
from .tokens import TOKEN_DTYPES, TOKEN_SCALES, EncodedTokens, PcaFit, TokenCodec, TokenFormat
from .writer import FeatureWriter, amend_attribute, shard_path, shard_range, write_arrays

__all__ = [
    "FEATURES_KIND",
    "SCHEMA_VERSION",
    "TEXT_KIND",
    "TOKEN_DTYPES",
    "TOKEN_SCALES",
    "BlockWriter",
    "EncodedTokens",
    "PcaFit",
    "TokenCodec",
    "TokenFormat",
    "FeatureCache",
    "FeatureWriter",
    "TextEmbeddings",
    "amend_attribute",
    "join_shards",
    "load_text_embeddings",
    "zero_shot_text",
    "save_text_embeddings",
    "shard_path",
    "shard_range",
    "write_arrays",
]
