import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# Third-party scheme plugins (entry points) are never loaded under tests.
os.environ.setdefault("MLX_TQ_NO_PLUGINS", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MLX_TQ_SHARED", ROOT.parent / "shared"))
TEST_MODEL = SHARED / "models" / "tq-llama-8k"
VAL_IDS = SHARED / "data" / "tq-llama-val-ids.npy"
DEMO_MODEL = ROOT / "models" / "tq-llama-8k-4bit"


def heavy_sinks(queries, keys, scale):
    """Attention sinks for the kernel tests: near the log of each query head's total weight,
    plus a standard normal, so a sink takes 10-90% of the weight in most draws (sinks around
    zero carry so little that a wrongly scaled sink passes)."""
    n_q = queries.shape[1]
    k = mx.repeat(keys.astype(mx.float32), n_q // keys.shape[1], axis=1)
    logits = (queries.astype(mx.float32) * scale) @ k.swapaxes(-1, -2)
    return mx.logsumexp(logits, axis=-1).mean(axis=(0, 2)) + mx.random.normal((n_q,))


def _require(path: Path):
    if path.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing: CI must run with ../shared beside the checkout")
    pytest.skip(f"{path} not found (set MLX_TQ_SHARED)")


@pytest.fixture(scope="session")
def real_model():
    """tq-llama-8k in float32 (fast on the CPU), with the attention patch active."""
    _require(TEST_MODEL)
    from mlx_lm import load

    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()
    model, tokenizer = load(str(TEST_MODEL))
    model.set_dtype(mx.float32)
    return model, tokenizer


@pytest.fixture(scope="session")
def val_ids():
    _require(VAL_IDS)
    return np.load(VAL_IDS)


@pytest.fixture
def patched():
    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()
    yield
