"""Data: tokenizer, Megatron indexed datasets (.bin/.idx + sidecar), GPT sampling, blends, loader, demo corpus.

Knows nothing of the model: what goes out are int64 token windows and (tokens, labels) micro-batches.
"""

from megatrain.data.indexed import (  # noqa: F401
    DataFormatError,
    IndexedDataset,
    IndexedDatasetBuilder,
    merge_datasets,
    read_sidecar,
)
