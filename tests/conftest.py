import logging

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _restore_megatrain_logger():
    """Tests that run main() configure logging for a process (own handler, no propagation); put the
    logger back so later tests' caplog sees megatrain's records whatever the test order."""
    logger = logging.getLogger("megatrain")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def build_pattern_dataset(prefix: str, vocab: int = 512, docs: int = 200, seed: int = 0) -> str:
    """A small dataset a model can learn: each document counts upward from a random start with a
    random stride (mod vocab), so next-token loss can fall well below ln(vocab)."""
    from megatrain.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, vocab) as b:
        for _ in range(docs):
            n = int(rng.integers(20, 120))
            start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 4))
            b.add_sequence((start + stride * np.arange(n)) % vocab)
            b.end_document()
        b.finalize(eod_id=0)
    return prefix


@pytest.fixture(scope="session")
def pattern_dataset(tmp_path_factory) -> str:
    return build_pattern_dataset(str(tmp_path_factory.mktemp("data") / "pattern"))
