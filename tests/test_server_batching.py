"""mlx_lm.server --kv-scheme turbo4 on loopback: continuous batching over compressed
batch caches, prefix reuse from the LRU prompt cache, compressed prompt-cache bytes.

The server runs in a subprocess started from this file (``python test_server_batching.py
serve ...``): the real ``mlx_lm.server`` main, plus a probe that logs what the LRU
prompt cache stores and the largest batch a compressed cache saw.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from _integration_env import stop_process_group, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MLX_TQ_SHARED", ROOT.parent / "shared"))
TEST_MODEL = SHARED / "models" / "tq-llama-8k"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
PROBE = "MLX_TQ_TEST_PROBE"

pytestmark = pytest.mark.slow

PROMPTS = [
    "Once upon a time there was",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "In",
    "import numpy as np\nimport mlx.core as mx\n",
    "class Cache:\n    def __init__(self):\n        self.keys = None",
    "A list of prime numbers: 2, 3, 5, 7, 11,",
    "The history of the city begins in the year",
]
LONG = "\n".join(
    f"    def method_{i}(self, x):\n        return x * {i} + self.offset" for i in range(24)
)
MAX_TOKENS = 12
# Greedy picks whose top two log-probabilities are closer than this (nat) may flip with the
# rounding of a different batch shape or cache layout; after a flip the texts part.
NEAR_TIE = 0.05


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(tmp_path, name, *extra):
    """An ``mlx_lm.server`` on 127.0.0.1, stopped (its whole process group) on exit."""
    if not TEST_MODEL.exists():
        pytest.skip(f"{TEST_MODEL} not found (set MLX_TQ_SHARED)")
    port, probe, log_path = _free_port(), tmp_path / f"{name}.probe", tmp_path / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_TQ_")}
    env.update(PYTHONPATH=str(ROOT), **{PROBE: str(probe)})
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    cmd = [sys.executable, __file__, "serve", "--model", str(TEST_MODEL), "--host", "127.0.0.1",
           "--port", str(port), *extra]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for_port(proc, port, 120, log_path, poll=0.3)
        yield port, probe, log_path
    finally:
        stop_process_group(proc)


def complete(port, prompt, max_tokens=MAX_TOKENS):
    """(text, usage, [(token, margin)]): each greedy token with the gap (nat) between the
    top two log-probabilities at its position."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}  # fmt: skip
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=180) as r:
        assert r.status == 200
        out = json.loads(r.read())
    steps = []
    for position in out["choices"][0]["logprobs"]["content"]:
        top = sorted(position["top_logprobs"], key=lambda t: -t["logprob"])
        steps.append((top[0]["id"], top[0]["logprob"] - top[1]["logprob"]))
    return out["choices"][0]["text"], out["usage"], steps


def same_greedy(a, b):
    """Whether two greedy runs of one prompt (``complete``'s steps) pick the same tokens up
    to the first near tie of either (NEAR_TIE), where they may part."""
    for (token_a, margin_a), (token_b, margin_b) in zip(a, b):
        if min(margin_a, margin_b) < NEAR_TIE:
            return True
        if token_a != token_b:
            return False
    return len(a) == len(b)


def concurrently(port, prompts):
    results, errors = [None] * len(prompts), []

    def one(i):
        try:
            results[i] = complete(port, prompts[i])
        except Exception as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(r is not None for r in results), errors
    return results


def read_probe(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_server_batches_compressed_caches_and_reuses_prefixes(tmp_path):
    long_prompt = LONG + "\n\nclass Next:"
    follow_up = LONG + "\n\nclass Other(Next):"  # shares the whole LONG prefix
    prompts = PROMPTS[:7] + [long_prompt]

    # The last layer stays fp16 here: with every layer compressed (the default gives the
    # last one turbo8v4) the second prompt's greedy text differs batched and alone, a
    # near-tie (margin 0.008 nat) flipped by float16 rounding that quantization amplifies,
    # not a batch-cache bug (docs/server.md; test_batch_divergence.py pins the mechanism).
    scheme = ("--kv-scheme", "turbo4", "--kv-layers", "!-1")
    # One request at a time, nothing reused: the reference outputs.
    with serve(tmp_path, "alone", *scheme, "--prompt-cache-size", "0") as (
        port, probe, _,
    ):  # fmt: skip
        alone = [complete(port, p) for p in prompts]
        cold_follow_up = complete(port, follow_up)
        assert all(u["prompt_tokens_details"]["cached_tokens"] == 0 for _, u, _ in alone)
        assert cold_follow_up[1]["prompt_tokens_details"]["cached_tokens"] == 0
        assert max(e["batch"] for e in read_probe(probe) if "batch" in e) == 1

    with serve(tmp_path, "batched", *scheme) as (port, probe, log):
        batched = concurrently(port, prompts)
        # The same greedy tokens, up to a near tie (a shifted or mixed-up row would change
        # them at once, far from any tie), and most texts the same to the end.
        for i, (b, a) in enumerate(zip(batched, alone)):
            assert same_greedy(b[2], a[2]), (prompts[i], b[0], a[0], b[2], a[2])
        assert sum(b[0] == a[0] for b, a in zip(batched, alone)) >= len(prompts) - 2
        events = read_probe(probe)
        # The eight requests ran together on compressed batch caches.
        assert max(e["batch"] for e in events if "batch" in e) >= 4
        warm_follow_up = complete(port, follow_up)
        assert same_greedy(warm_follow_up[2], cold_follow_up[2])
        n_long = batched[-1][1]["prompt_tokens"]
        assert warm_follow_up[1]["prompt_tokens_details"]["cached_tokens"] >= n_long - 8
        text = log.read_text()
    assert "turbo4 (--kv-scheme) on" in text and "no continuous batching" not in text

    # The LRU prompt cache holds compressed single caches, sized to their tokens.
    inserts = [e for e in read_probe(probe) if e.get("event") == "insert"]
    assert len(inserts) >= len(prompts)
    for e in inserts:
        plain = compressed = 0
        for kind, nbytes, tokens, heads, k_dim, itemsize in e["layers"]:
            if kind == "TurboQuantKVCache":
                # turbo4: 4-bit indices plus an fp16 norm, for keys and for values
                assert nbytes == tokens * 2 * heads * (k_dim * 4 // 8 + 2)
                compressed += 1
            else:
                assert kind == "KVCache" and nbytes >= tokens * 2 * heads * k_dim * itemsize
                plain += 1
        assert (compressed, plain) == (5, 1)  # --kv-layers '!-1' keeps the last layer
        fp16_bytes = e["tokens_cached"] * 6 * 2 * heads * k_dim * 2
        assert e["nbytes"] < fp16_bytes / 2


# -- the server process ---------------------------------------------------------------


def _install_probe(path):
    """Log LRU inserts (class, bytes, tokens of each layer) and batch sizes to ``path``."""
    import mlx_lm.models.cache as cache_module

    from mlx_lm_turboquant.batch_cache import BatchTurboQuantKVCache

    lock, biggest = threading.Lock(), [0]

    def log(record):
        with lock, open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    insert = cache_module.LRUPromptCache.insert_cache

    def insert_cache(self, model, tokens, prompt_cache, **kwargs):
        layers = []
        for c in prompt_cache:
            heads = c.values.shape[1] if c.values is not None else 0
            k_dim = getattr(c, "k_dim", None) or (c.keys.shape[-1] if c.keys is not None else 0)
            itemsize = c.keys.itemsize if type(c) is cache_module.KVCache else 0
            layers.append([type(c).__name__, c.nbytes, c.size(), heads, k_dim, itemsize])
        log({"event": "insert", "tokens_cached": prompt_cache[0].size(), "layers": layers,
             "nbytes": sum(c.nbytes for c in prompt_cache)})  # fmt: skip
        return insert(self, model, tokens, prompt_cache, **kwargs)

    cache_module.LRUPromptCache.insert_cache = insert_cache
    update = BatchTurboQuantKVCache.update_and_fetch

    def update_and_fetch(self, keys, values):
        if keys.shape[0] > biggest[0]:
            biggest[0] = keys.shape[0]
            log({"batch": keys.shape[0]})
        return update(self, keys, values)

    BatchTurboQuantKVCache.update_and_fetch = update_and_fetch


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()
    _install_probe(os.environ[PROBE])
    from mlx_lm.server import main

    sys.argv = ["mlx_lm.server", *sys.argv[2:]]
    main()
