"""nano's pretraining data: sources and the ``--data`` spec (``sources``), tokenized memory-mapped
shards cached by content (``shards``), and the stateless batch plan with blends, phases and packing
(``batches``). The built-in corpus lives in ``synthetic``.

Importing this package does not import torch (only ``BatchPlan.batch`` / ``eval_batches`` do).
"""

from __future__ import annotations

from .batches import PERIOD, BatchPlan, Phase, blend_phase, permute, phase_bounds
from .shards import (
    FORMAT_VERSION,
    TokenSource,
    describe_source,
    open_shard,
    prepare_source,
    prepare_sources,
    pretraining_eos_id,
    sample_texts_for_tokenizer,
    source_key,
    tokenizer_hash,
    train_bpe_tokenizer,
)
from .sources import (
    SHARD_FORMAT,
    TEXT_EXTENSIONS,
    DataError,
    Progress,
    SourceSpec,
    is_shard_dir,
    iter_documents,
    parse_data_spec,
)

__all__ = [
    "DataError", "SourceSpec", "parse_data_spec", "iter_documents", "is_shard_dir", "Progress",
    "sample_texts_for_tokenizer", "train_bpe_tokenizer", "TEXT_EXTENSIONS", "SHARD_FORMAT",
    "TokenSource", "prepare_source", "prepare_sources", "open_shard", "source_key", "pretraining_eos_id",
    "tokenizer_hash", "describe_source", "FORMAT_VERSION",
    "Phase", "BatchPlan", "blend_phase", "permute", "phase_bounds", "PERIOD",
]
