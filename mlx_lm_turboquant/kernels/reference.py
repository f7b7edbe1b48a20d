"""Pure-MLX attention on a TurboQuant cache: the oracle every fused kernel is tested
against, and the path used on the CPU.

Keys are never rebuilt in the original basis: q.k = (R q).(R k), so the query is
rotated once and scored against ``norm * centroid`` in the rotated basis. Values are
weighted in their rotated basis and the output is rotated back once. The tokens are
walked in blocks with an online softmax (flash-attention style), and queries in
chunks, so the transient memory is a few blocks, not a float copy of the cache.

Prod keys (Algorithm 2) add the QJL term: the rotated query is also sketched once, S q',
and each key contributes <S q', ||r|| sqrt(pi/2)/D sign(S r)>. Split schemes store each
head's channels outliers first: the query is put in that order before its (block-diagonal)
rotation, and the output is put back in the model's order after the values' rotation.
Centred keys (``c`` schemes) are stored less ``R_p mu``: each packed block's scores get
``q . R_p mu`` back, computed exactly in the model's basis (``codec.centring``).
"""

import mlx.core as mx

from ..codec.split import inverse_order, permute

BLOCK_TOKENS = 512
BLOCK_QUERIES = 128  # with 512-token blocks: a 4k prefill peaks below the fp16 cache's (docs/memory.md)
# On a GPU each block costs a few kernel launches whatever its size, so small blocks make
# prefill launch-bound: an 8k-token prefill of tq-llama-8k took 8.9 s with the CPU's blocks
# and 0.56 s with these on the H100 (fp16 cache: 0.05 s).
GPU_BLOCK_TOKENS = 4096
GPU_BLOCK_QUERIES = 1024
_NEG = -1e30  # finite, so a fully masked row gives uniform weights instead of NaN


def _mask_block(mask, q0, q1, k0, k1, L, T):
    """The part of ``mask`` for queries [q0, q1) and keys [k0, k1), as
    ``(bool_or_additive_array_or_None)`` broadcastable to ``[B, Hq, Lc, Tb]``."""
    if mask is None:
        return None
    if isinstance(mask, str):
        q_pos = mx.arange(T - L + q0, T - L + q1)[:, None]
        return q_pos >= mx.arange(k0, k1)[None, :]
    m = mask
    if m.shape[-2] != 1:
        m = m[..., q0:q1, :]
    if m.shape[-1] != 1:
        m = m[..., k0:k1]
    return m


def _to_grouped(x, n_kv_heads, n_rep):
    """``[B|1, Hq|1, ...]`` -> ``[B|1, H_kv|1, n_rep|1, ...]`` for broadcasting with GQA."""
    while x.ndim < 4:
        x = mx.expand_dims(x, 0)
    if x.shape[1] == 1:
        return mx.expand_dims(x, 2)
    return x.reshape(x.shape[0], n_kv_heads, n_rep, *x.shape[2:])


def block_sizes():
    """``(block_tokens, block_queries)`` for the default device."""
    if mx.default_device() == mx.gpu:
        return GPU_BLOCK_TOKENS, GPU_BLOCK_QUERIES
    return BLOCK_TOKENS, BLOCK_QUERIES


def reference_sdpa(queries, cache, scale, mask=None, sinks=None,
                   block_tokens=None, block_queries=None):  # fmt: skip
    """Attention of ``queries`` ``[B, H_q, L, D_k]`` over the compressed ``cache``.

    Args:
        mask: ``None``, ``"causal"`` (the L queries are the last L cached tokens), or an
            array broadcastable to ``[B, H_q, L, T]``: bool (True = attend) or additive.
        sinks: optional ``[H_q]`` logits of attention sinks.

    Returns ``[B, H_q, L, D_v]`` in the queries' dtype.
    """
    B, n_q_heads, L, _ = queries.shape
    default_tokens, default_queries = block_sizes()
    block_tokens, block_queries = block_tokens or default_tokens, block_queries or default_queries
    keys, key_norms, values, value_norms = cache.fetch()
    n_kv_heads, T = values.shape[1], values.shape[2]
    if n_q_heads % n_kv_heads:
        raise ValueError(f"{n_q_heads} query heads cannot share {n_kv_heads} KV heads")
    n_rep = n_q_heads // n_kv_heads
    key_codec, value_codec = cache.key_codec, cache.value_codec
    prod = cache.scheme.variant == "prod"
    split = cache.scheme.variant == "split"

    q = queries.astype(mx.float32) * scale
    q = q.reshape(B, n_kv_heads, n_rep, L, -1)
    q_model = q  # the model's basis, for a centred cache's mean-key scores
    if split:
        q = permute(q, cache.key_channels)
    if key_codec is not None:
        q = key_codec.rotation.forward(q)  # once per query, never per key
    q_sketch = key_codec.sketch_queries(q) if prod else None  # S q', once per query
    if sinks is not None:
        sinks = sinks.astype(mx.float32).reshape(1, n_kv_heads, n_rep, 1, 1)
    if mask is not None and not isinstance(mask, str):
        mask = _to_grouped(mask, n_kv_heads, n_rep)

    # The last r tokens of a scheme with a window are read uncompressed, put in the same
    # channel order and rotated bases as the decoded blocks (r vectors, once per call).
    recent = getattr(cache, "recent", None)
    r = 0 if recent is None else recent[0].shape[2]
    if r:
        rk, rv = (x.astype(mx.float32) for x in recent)
        if split:
            rk, rv = permute(rk, cache.key_channels), permute(rv, cache.value_channels)
        rk = rk if key_codec is None else key_codec.rotation.forward(rk)
        rv = value_codec.rotation.forward(rv)

    mean_keys = getattr(cache, "mean_key_block", None)

    def blocks():
        """``(k0, k1, keys, values, QJL weights or None, mean keys or None)`` per block of
        tokens, rotated (the mean keys in the model's basis)."""
        for k0 in range(0, T - r, block_tokens):
            k1 = min(T - r, k0 + block_tokens)
            kb, kn = keys[:, :, k0:k1], None if key_norms is None else key_norms[:, :, k0:k1]
            w = None
            if key_codec is None:
                k = kb.astype(mx.float32)
            elif prod:
                k = key_codec.decode_mse_rotated(kb, kn)
                w = key_codec.residual_weights(kb, kn)
            else:
                k = key_codec.decode_rotated(kb, kn)
            v = value_codec.decode_rotated(values[:, :, k0:k1], value_norms[:, :, k0:k1])
            yield k0, k1, k, v, w, None if mean_keys is None else mean_keys(k0, k1)
        if r:
            yield T - r, T, rk, rv, None, None

    outputs = []
    for q0 in range(0, L, block_queries):
        q1 = min(L, q0 + block_queries)
        qc = q[..., q0:q1, :]
        m_run = l_run = acc = None
        for k0, k1, k, v, w, mk in blocks():
            s = qc @ mx.expand_dims(k, 2).swapaxes(-1, -2)  # [B, H_kv, n_rep, Lc, Tb]
            if w is not None:
                s = s + q_sketch[..., q0:q1, :] @ mx.expand_dims(w, 2).swapaxes(-1, -2)
            if mk is not None:
                s = s + q_model[..., q0:q1, :] @ mx.expand_dims(mk, 2).swapaxes(-1, -2)
            m = _mask_block(mask, q0, q1, k0, k1, L, T)
            if m is not None:
                s = mx.where(m, s, _NEG) if m.dtype == mx.bool_ else s + m.astype(s.dtype)
            s_max = s.max(axis=-1, keepdims=True)
            m_new = s_max if m_run is None else mx.maximum(m_run, s_max)
            p = mx.exp(s - m_new)
            pv = p @ mx.expand_dims(v, 2)
            if m_run is None:
                l_run, acc = p.sum(axis=-1, keepdims=True), pv
            else:
                alpha = mx.exp(m_run - m_new)
                l_run = l_run * alpha + p.sum(axis=-1, keepdims=True)
                acc = acc * alpha + pv
            m_run = m_new
        if sinks is not None:
            m_new = mx.maximum(m_run, sinks)
            alpha = mx.exp(m_run - m_new)
            l_run = l_run * alpha + mx.exp(sinks - m_new)
            acc = acc * alpha
        outputs.append(acc / l_run)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=3)
    out = value_codec.rotation.inverse(out)  # once per output row
    if split:
        out = permute(out, inverse_order(cache.value_channels))
    return out.reshape(B, n_q_heads, L, -1).astype(queries.dtype)
