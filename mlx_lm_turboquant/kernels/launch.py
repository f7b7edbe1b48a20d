"""Backend-neutral launch logic: template choice, token splits, input preparation.

``cuda.py`` and ``metal.py`` pass their kernel factory in; a function here returns
``None`` when the shapes are outside what the kernels cover (the caller then takes
the pure-MLX path), never a wrong answer.
"""

import math
import os
import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

import mlx.core as mx
import numpy as np

MAX_QUERIES = 8  # decode and speculative verification; longer prefill uses the reference
MAX_ROWS = 64  # query rows sharing one KV head in one block (n_rep * L)
# Blocks per attention call, at most: one wave of the tensor-core kernel on an H100 (132 SMs,
# 3 blocks each, by registers or BULK_BLOCKS_PER_SM; 8 KV heads take 49 spans each, 392
# blocks: 384 left 12 SMs with 2, turbo4 65.6 -> 64.5 us at 128k tokens); and at least
# MIN_SPAN tokens per block, so a short context takes a few long blocks instead of a second
# wave of short ones (turbo4, 4k tokens: 0.035 ms with 64 blocks against 0.061 ms with 512;
# docs/kernels.md).
TARGET_BLOCKS = 396
MIN_SPAN = 512
# turbo3's tensor-core build (3-bit keys and values, not centred) takes two thirds of that,
# two blocks per SM: on the H100 at 32k tokens 24.4-24.7 us against 25.2-26.0 with 396
# blocks, the same within 1% at 4k and 128k (docs/kernels.md, session 21). Other builds
# gained nothing from other counts (turbo4: 264-528 blocks, session 18).
FEWER_BLOCKS_SHARE = (2, 3)
PREFETCH_WORDS = 48  # registers per thread holding the next tile
# On sm_90 and later the tensor-core kernel's warps take their token rows by bulk copies
# into shared memory, BULK_STEPS steps ahead (source.ATTENTION_TC), where a step's 16 rows
# are at least BULK_MIN_BYTES: on the H100, 4-bit codes at D = 128 (2112 bytes a step)
# gained (turbo4 67.0 -> 64.7 us at 128k tokens, turbo4c 118.7 -> 96.2 us) and 2- and 3-bit
# codes lost (turbo2 63.1 -> 67.8, turbo3 77.5 -> 81.2); 2 steps ahead was as fast as 3
# or 4 for turbo4 and faster for turbo4c (docs/kernels.md). BULK_COPIES False: loads, as on
# other GPUs (e.g. to compare). All read at every call.
BULK_COPIES = True
BULK_STEPS = 2
BULK_MIN_BYTES = 2048
# Blocks of a bulk-copy build an SM may hold (TARGET_BLOCKS assumes 3): a build whose
# registers would let a 4th in asks for enough shared memory to keep it out. turbo4 at 128
# registers took 65.9 us at 128k tokens with room for 4 blocks per SM against 65.0 with 3
# (384 blocks; docs/kernels.md). SM_SHARED_BYTES: an H100's (and sm_100's) per SM.
BULK_BLOCKS_PER_SM = 3
SM_SHARED_BYTES = 228 * 1024
_NEG = -1e30  # a masked score, as in reference.py
TENSOR_CORES_ENV = "MLX_TQ_TENSOR_CORES"


def tensor_cores_enabled() -> bool:
    """``MLX_TQ_TENSOR_CORES`` = 1 (default) or 0: whether the CUDA tensor-core attention
    may be used where it applies (0 keeps the portable kernel, e.g. to compare them)."""
    value = os.environ.get(TENSOR_CORES_ENV, "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{TENSOR_CORES_ENV}={value!r}; allowed: 0, 1")
    return value == "1"


class _KernelPlan:
    """Template arguments of a plan: its fields, then the per-launch ones. Subclasses are
    frozen dataclasses (hashable by their fields, so ``template`` is memoized per plan)."""

    def _extra_template(self):
        return []

    @lru_cache(maxsize=None)  # built once per configuration: decode calls this per layer
    def template(self, q_dtype, scale, mask_mode=0, mb=False, mh=False, ml=False):
        """Template arguments; the query dtype keeps kernel names unique per dtype (mlx's CUDA
        backend names a kernel by its template arguments alone)."""
        t = [(k, getattr(self, k)) for k in self.__dataclass_fields__]
        scale_bits = int(np.array(scale, np.float32).view(np.int32))
        return t + self._extra_template() + [
            ("SCALE_BITS", scale_bits), ("QT", q_dtype), ("MASK_MODE", mask_mode),
            ("MB", mb), ("MH", mh), ("ML", ml)]  # fmt: skip


@dataclass(frozen=True)
class AttentionPlan(_KernelPlan):
    """Compile-time shape of one attention kernel instance."""

    D: int
    R: int
    L: int
    NREP: int
    NT: int
    TILE: int
    KBITS: int
    KEY_BF16: bool
    WK: int
    VBITS: int
    WV: int
    VSPLIT: bool
    RW: int
    Q_SH: bool
    PACKED: bool  # one row per token (see cache.TurboQuantKVCache.packed)
    CENTRED: bool = False  # keys stored less R_t mu (see source._CENTRE_PAIRS)
    RDIMS: int = 0  # channels RoPE turns (centred caches)
    RTRAD: bool = False  # RoPE's layout: adjacent channel pairs
    max_splits = None  # the separate reduce merges any number of spans

    def _extra_template(self):
        return [("PREP_Q", self.Q_SH)]


THREADS = 128  # four warps per block
VALUE_REGISTERS = 64  # value accumulators per lane (rows x coordinates) at most


def _rope_fields(rope, D, multiple):
    """``(CENTRED, RDIMS, RTRAD)`` for ``rope`` = ``(dims, traditional)`` of a centred cache
    (None: not centred), or None where the kernel cannot take it (``dims`` not a multiple
    of ``multiple``, or more than D)."""
    if rope is None:
        return False, 0, False
    dims, traditional = rope
    if dims % multiple or not 0 < dims <= D:
        return None
    return True, dims, bool(traditional)


@lru_cache(maxsize=None)
def attention_plan(
    D, n_rep, L, key_bits, key_dtype, value_bits, shared_bytes, packed=False, rope=None
) -> Optional[AttentionPlan]:
    """The kernel configuration for these shapes, or None where the kernels do not apply.
    ``rope``: ``(dims, traditional)`` of a centred cache's RoPE frame, else None."""
    R = n_rep * L
    centring = _rope_fields(rope, D, 2)
    if centring is None:
        return None
    if D % 32 or not 32 <= D <= 512 or L > MAX_QUERIES or R > MAX_ROWS:
        return None
    if key_bits == 0 and (packed or key_dtype not in (mx.float16, mx.bfloat16)):
        return None
    if D * value_bits > 32 * 32:  # a lane's value codes must fit in one 32-bit field
        return None
    NT = THREADS
    vcpl = D // 32
    # Values: every warp holds every row (and the warps split the tokens) when the
    # accumulators fit in registers, else each warp holds a share of the rows.
    vsplit = R * vcpl <= VALUE_REGISTERS
    rw = R if vsplit else -(-R // (NT // 32))
    if rw * vcpl > VALUE_REGISTERS:
        return None
    kbits = key_bits if key_bits else 16
    WK, WV = D * kbits // 32, D * value_bits // 32
    q_sh = D * R * 4 <= shared_bytes // 3
    if vsplit and not q_sh:  # the warps sum their outputs in the query's shared space
        return None
    if centring[0] and not q_sh:  # the block needs the query in the model's basis
        return None
    n_pairs = centring[1] // 2
    nkc = 1 << min(kbits, 8) if kbits < 16 else 1
    tables = nkc * (32 if nkc <= 16 else 1) + (1 << value_bits) * 32
    for tile in (128, 64, 32):
        # The next tile waits in registers (tile * words / NT per thread): keep that small.
        if tile > 32 and tile * (WK + WV) > PREFETCH_WORDS * NT:
            continue
        words = tile * ((WK | 1) + WV) + 1
        floats = (D * R if q_sh else 4) + R * tile + tables + 4 * R
        floats += 2 * n_pairs * (R + 9 + tile // 8)  # centring: Y, turn, tables
        if 4 * (words + floats) <= shared_bytes:
            return AttentionPlan(
                D, R, L, n_rep, NT, tile, kbits, key_dtype == mx.bfloat16,
                WK, value_bits, WV, vsplit, rw, q_sh, packed, *centring,
            )  # fmt: skip
    return None


TC_THREADS = 128
# Spans of the tensor-core kernel are whole warp steps (16 tokens), not whole block steps: a
# span's last block step may leave warps idle, but coarser spans leave whole SMs with more
# tokens than others (32k tokens, 8 KV heads: 47 spans of 704 tokens against 48 of 688).
TC_TILE = 16


@dataclass(frozen=True)
class TensorCorePlan(_KernelPlan):
    """Compile-time shape of one tensor-core attention kernel (``source.ATTENTION_TC``)."""

    D: int
    R: int
    L: int
    NREP: int
    NT: int
    KBITS: int
    VBITS: int
    WK: int
    WV: int
    SAME_TABLE: bool
    PACKED: bool
    CENTRED: bool = False
    RDIMS: int = 0
    RTRAD: bool = False
    PREFETCH: bool = False  # token rows requested into L2 ahead of the loop (source.ATTENTION_TC)
    WIDE: bool = False  # table rows of 256 bytes: a byte of codes is an address (ATTENTION_TC)
    BULK: int = 0  # steps of token rows each warp has in flight by bulk copies (0: loads)
    TILE = TC_TILE
    Q_SH = True

    @property
    def table_words(self) -> int:
        """32-bit words of the block's table space (``big_sh`` in ``source.ATTENTION_TC``, its
        dynamic shared memory): the centroid-pair tables, later the warps' results, then the
        merge's arrays. Wide rows hold the value table beside the keys' (upper 128 bytes)."""
        ktab = 1 << 2 * self.KBITS
        vtab = 0 if self.SAME_TABLE else 1 << 2 * self.VBITS
        tables = 64 * max(ktab, vtab) if self.WIDE else 32 * (ktab + vtab)
        return max(tables, (self.NT // 32) * (self.R * self.D + 2 * self.R))

    @property
    def dynamic_words(self) -> int:
        """32-bit words of the kernel's dynamic shared memory: the table space, then with
        BULK each warp's stage buffers (BULK steps of 16 token rows)."""
        stages = (self.NT // 32) * self.BULK * 16 * (self.WK + self.WV + 1)
        return self.table_words + stages

    @property
    def static_words(self) -> int:
        """32-bit words of its static shared memory, at most: the query (q_sh), its rows'
        maxima (qmax_sh), zmax_sh and c0_sh, the centroids (cent_sh), the copies' barriers,
        and for centring the B fragments (ctab_sh) and the per-step turns (dstep_sh)."""
        words = self.D * self.R + 3 * self.R + 32 + 2 * (self.NT // 32) * max(self.BULK, 1)
        return words + (2 * (self.RDIMS // 16) * 64 + self.RDIMS if self.CENTRED else 4)

    @property
    def shared_request(self) -> int:
        """Bytes of dynamic shared memory to launch it with: its dynamic words, with bulk
        copies enough to hold an SM to BULK_BLOCKS_PER_SM blocks, and more than 48000
        where static and dynamic pass 48 KiB together (mlx lets a kernel take more than 48
        KiB only when its dynamic part alone is above 48000 bytes)."""
        dynamic = 4 * self.dynamic_words
        if self.BULK:  # then one more block than BULK_BLOCKS_PER_SM does not fit
            dynamic = max(dynamic, SM_SHARED_BYTES // (BULK_BLOCKS_PER_SM + 1))
        if dynamic <= 48000 < 4 * (self.dynamic_words + self.static_words):
            return 48016
        return dynamic

    @property
    def max_splits(self) -> int:
        """Spans the kernel's fused merge can weigh: R weights per span beside the merged
        rows and the sums in the table space."""
        R = self.R
        return (self.table_words - R * self.D - R) // R


@lru_cache(maxsize=None)
def tensor_core_plan(D, n_rep, L, key_bits, value_bits, same_table, shared_bytes,
                     packed=False, rope=None, wide_bytes=0, bulk=(0, 0)):  # fmt: skip
    """The tensor-core kernel's configuration, or None where it does not apply (the portable
    kernel then runs): head dims 64 or 128, up to 8 query rows per KV head, 2- to 4-bit
    codes for keys and values (8-bit and float keys need more precision than fp16 inputs to
    the tensor cores keep; prod and split formats never reach the kernels); a centred
    cache's RoPE must turn a multiple of 16 channels (whole k-chunks of pairs).
    ``wide_bytes``: shared memory a block may take on a GPU of sm_90 or later (0: another
    one): with ``bulk`` = (steps, min_bytes), token rows arrive by bulk copies that many
    steps ahead (``BULK``) where a step's rows are at least min_bytes (steps 0: never; see
    BULK_STEPS), else with 4-bit codes the tables take wide rows (``WIDE``, twice the
    table space); otherwise narrow rows and loads, within ``shared_bytes``."""
    R = n_rep * L
    centring = _rope_fields(rope, D, 16)
    if centring is None:
        return None
    if D not in (64, 128) or R > 8 or L > MAX_QUERIES:
        return None
    if not (2 <= key_bits <= 4 and 2 <= value_bits <= 4):
        return None
    same = bool(same_table) and key_bits == value_bits
    # Prefetching token rows ahead pays (H100, 128k tokens: turbo4 69.6 -> 67.4 us, turbo4c
    # 147.9 -> 133.3 us; turbo3 65.2 -> 60.7 us since its loop took base-2 exponentials,
    # where before it had cost turbo3 registers and time, 80.1 -> 85.4 us).
    prefetch = packed
    plan = TensorCorePlan(D, R, L, n_rep, TC_THREADS, key_bits, value_bits,
                          D * key_bits // 32, D * value_bits // 32, same, packed,
                          *centring, prefetch)  # fmt: skip
    options = [replace(plan, WIDE=True)] if 4 in (key_bits, value_bits) else []
    steps, min_bytes = bulk
    if packed and steps and 16 * 4 * (plan.WK + plan.WV + 1) >= min_bytes:
        # fewer steps where shared memory is short (at least 2: one landing, one in use)
        options[:0] = [replace(plan, BULK=n, PREFETCH=False) for n in range(steps, 1, -1)]
    for option in options if wide_bytes else []:
        if 4 * (option.dynamic_words + option.static_words) <= wide_bytes:
            return option
    return plan if 4 * (plan.dynamic_words + plan.static_words) <= shared_bytes else None


def split_tokens(T: int, n_blocks: int, tile: int, target_blocks=None, min_span=None,
                 max_splits=None):  # fmt: skip
    """(tokens per span, number of spans): at most ``target_blocks`` blocks (the same number
    of spans for each of the ``n_blocks`` rows: a block more than one wave holds would run
    in a second), whole tiles per span, at least ``min_span`` tokens per span (defaults:
    TARGET_BLOCKS, MIN_SPAN), and at most ``max_splits`` spans where given."""
    target_blocks = TARGET_BLOCKS if target_blocks is None else target_blocks
    min_span = MIN_SPAN if min_span is None else min_span
    n_tiles = -(-T // tile)
    splits = max(1, target_blocks // n_blocks)
    tiles_per_span = max(1, -(-min_span // tile), -(-n_tiles // splits))
    if max_splits is not None:
        tiles_per_span = max(tiles_per_span, -(-n_tiles // max_splits))
    span = tiles_per_span * tile
    return span, -(-T // span)


def _prepare_mask(mask, B, n_q_heads, L, T):
    """(mode, array, MB, MH, ML): mask as an additive float32 ``[B|1, H_q|1, L|1, T]``."""
    if mask is None:
        return 0, None, False, False, False
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        return (1 if L > 1 else 0), None, False, False, False
    m = mask
    if m.dtype == mx.bool_:
        m = mx.where(m, 0.0, _NEG)
    m = m.astype(mx.float32)
    while m.ndim < 4:
        m = mx.expand_dims(m, 0)
    if m.ndim > 4:
        return None
    mB, mH, mL, mT = m.shape
    if mB not in (1, B) or mH not in (1, n_q_heads) or mL not in (1, L) or mT not in (1, T):
        return None
    m = mx.broadcast_to(m, (mB, mH, mL, T))
    return 2, m, mB != 1, mH != 1, mL != 1


@lru_cache(maxsize=1024)
def _layout(cap, n_blocks, tile, n_kv_heads, target_blocks, min_span, max_splits):
    """``(n_splits, [capacity, span, n_splits, n_kv_heads])`` for the kernels. Spans follow
    the capacity, not the token count, so this array (and the launch shape) only changes
    when the cache grows, a step of 256 tokens; spans past the last token do nothing.
    Memoized: every layer and step of one capacity shares one device array (a new host
    array per call costs a transfer on CUDA before the launch can read it)."""
    span, n_splits = split_tokens(cap, n_blocks, tile, target_blocks, min_span, max_splits)
    return n_splits, mx.array([cap, span, n_splits, n_kv_heads], dtype=mx.int32)


builds = 0  # kernel configurations set up so far; kernels.run evaluates a new one eagerly


def _count_build():
    global builds
    builds += 1


epoch = 0  # counts forget_configurations calls: set-ups bound before it are stale (kernels.Lane)


def forget_configurations():
    """Drop the memoized set-ups, so each configuration counts as new again."""
    global epoch
    epoch += 1
    _launch.cache_clear()
    _encode_graph.cache_clear()
    _append_graph.cache_clear()
    for chain in list(_CHAINS.values()):
        chain.fast = chain.append = None


_TOKEN_COUNTS = {}  # token count -> int32 [1] device array, shared by every layer and cache
_MAX_TOKEN_COUNTS = 64
_COUNTS = None  # int32 arange written on the device; count n is the view _COUNTS[n:n + 1]


def device_tokens(cache) -> mx.array:
    """How many tokens attention reads, as an int32 ``[1]`` array on the device. Every layer
    of a step reads the same count, so one array serves them all.

    The count is a one-element view into an arange that the GPU wrote, never an array of
    its own: mlx's CUDA allocator puts arrays of up to 8 bytes in one pool of managed memory
    that the host writes whenever it makes a scalar, and a kernel's first read after such a
    write waits on a page fault (measured on the H100: turbo4 attention at 32k tokens 52 ->
    37 us of GPU time per call, 15 us of it the first read of the count).
    """
    return device_count(cache.attended_tokens)


def device_count(n: int) -> mx.array:
    """``n`` as an int32 ``[1]`` array the GPU wrote (see :func:`device_tokens`)."""
    global _COUNTS
    count = _TOKEN_COUNTS.get(n)
    if count is None:
        if _COUNTS is None or _COUNTS.size <= n:
            _COUNTS = mx.arange(max(1 << 16, 1 << n.bit_length()), dtype=mx.int32)
        count = _COUNTS[n : n + 1]
        if len(_TOKEN_COUNTS) >= _MAX_TOKEN_COUNTS:
            del _TOKEN_COUNTS[next(iter(_TOKEN_COUNTS))]  # the oldest entry
        _TOKEN_COUNTS[n] = count
    return count


_DUMMIES = {}


def _dummy(dtype=mx.float32):
    """A one-element array for an input a configuration does not read."""
    if dtype not in _DUMMIES:
        _DUMMIES[dtype] = mx.zeros((1,), dtype)
    return _DUMMIES[dtype]


class _Chain:
    """A cache's launches in order: ``last`` is the output of the last launch that touched
    the cache (attention, or an encode that wrote its token rows in place), and every launch
    takes it as an input it never reads. mlx orders GPU work by data alone: two launches that
    only read the same counter, or one that writes rows in place and one that reads them,
    could otherwise run at once. ``counter``: the tensor-core kernel's fused merge, one zero
    per (batch, KV head) that each launch counts up and its last block resets. Separate
    caches have separate chains and stay free to overlap."""

    __slots__ = ("counter", "last", "fast", "append", "__weakref__")

    def __init__(self):
        self.counter = None
        self.last = None
        # decode_attention's last set-up: (key, setup, n_splits, meta, replay), replay as
        # replay_attention takes it; append_rows's last one, as replay_append takes it.
        self.fast = None
        self.append = None


_CHAINS = weakref.WeakKeyDictionary()  # cache -> _Chain; a copied cache starts its own


def _chain(cache, n_blocks=0) -> _Chain:
    """The cache's chain, with a counter of at least ``n_blocks`` zeros where asked."""
    chain = _CHAINS.get(cache)
    if chain is None:
        chain = _CHAINS[cache] = _Chain()
    if n_blocks and (chain.counter is None or chain.counter.size < n_blocks):
        # From a host buffer: a real zeroed allocation, never a lazy broadcast; at least
        # 16 bytes, so never in mlx's CUDA pool of small host-written arrays (device_tokens).
        chain.counter = mx.array(np.zeros(max(n_blocks, 4), np.uint32))
    return chain


class _Launch(NamedTuple):
    """Everything about one layer's attention launches that does not change per step."""

    graph: Callable
    tile: int
    n_blocks: int  # batch x KV heads
    rot: mx.array  # the key rotation's matrix (the tensor-core kernel: its signs)
    kcent: mx.array
    vcent: mx.array
    rot_t: mx.array  # the value rotation's matrix_t (the tensor-core kernel: its signs)
    float_keys: bool
    outside_query: bool  # the query is too large for shared memory: scaled (and rotated) here
    key_codec: object
    max_splits: Optional[int]  # the fused merge's limit (tensor-core kernel), else None
    fewer_blocks: bool = False  # FEWER_BLOCKS_SHARE of TARGET_BLOCKS (turbo3's build)


def _plan(kernel, shared_bytes, key_codec, value_codec, key_dtype, n_rep, L, D, tensor_cores,
          packed, rope=None, wide_bytes=0, bulk=(0, 0)):  # fmt: skip
    """(op, plan): the tensor-core kernel where it applies and the backend has it, else the
    portable one; (None, None) where neither covers the shapes."""
    # The tensor-core kernel rotates by Walsh-Hadamard transforms from the rotations' signs.
    sylvester = key_codec is not None and key_codec.rotation.sylvester
    if tensor_cores and sylvester and value_codec.rotation.sylvester \
            and kernel("attention_tc") is not None:  # fmt: skip
        same = key_codec.codebook is value_codec.codebook
        plan = tensor_core_plan(D, n_rep, L, key_codec.bits, value_codec.bits, same,
                                shared_bytes, packed, rope, wide_bytes, bulk)  # fmt: skip
        if plan is not None:
            return "attention_tc", plan
    if kernel("attention") is None:
        return None, None
    key_bits = 0 if key_codec is None else key_codec.bits
    plan = attention_plan(D, n_rep, L, key_bits, key_dtype, value_codec.bits, shared_bytes,
                          packed, rope)  # fmt: skip
    return ("attention", plan) if plan is not None else (None, None)


@lru_cache(maxsize=4096)  # a few entries per layer: decode looks its layer up every step
def _launch(kernel, shared_bytes, key_codec, value_codec, key_dtype, n_kv_heads, B, n_q_heads,
            L, D, q_dtype, scale, mode, mb, mh, ml, has_sinks, compiled, tensor_cores,
            packed, rope=None, wide_bytes=0, bulk=(0, 0)):  # fmt: skip
    _count_build()
    if kernel("reduce") is None or n_q_heads % n_kv_heads:
        return None
    n_rep = n_q_heads // n_kv_heads
    op, plan = _plan(kernel, shared_bytes, key_codec, value_codec, key_dtype, n_rep, L, D,
                     tensor_cores, packed, rope, wide_bytes, bulk)  # fmt: skip
    if plan is None:
        return None
    BH = B * n_kv_heads
    q_in = q_dtype if plan.Q_SH else mx.float32
    template = tuple(plan.template(q_in, scale, mode, mb, mh, ml))
    graph = _attention_graph(kernel, op, plan, template, (B, n_q_heads, L, D), has_sinks,
                             q_dtype, compiled)  # fmt: skip
    if key_codec is None:
        rot = kcent = _dummy()
    else:
        rot, kcent = key_codec.rotation.matrix, key_codec.centroids
    rot_t = value_codec.rotation.matrix_t
    if op == "attention_tc":  # its rotations are transforms: the signs are all it reads
        rot, rot_t = key_codec.rotation.signs, value_codec.rotation.signs
    fewer = op == "attention_tc" and plan.KBITS == plan.VBITS == 3 and not plan.CENTRED
    return _Launch(graph, plan.TILE, BH, rot, kcent, value_codec.centroids, rot_t,
                   key_codec is None, not plan.Q_SH, key_codec, plan.max_splits,
                   fewer)  # fmt: skip


def target_blocks(setup) -> int:
    """Blocks per attention call, at most, for a launch set-up (TARGET_BLOCKS, or its
    FEWER_BLOCKS_SHARE for the builds that run faster so)."""
    share, whole = FEWER_BLOCKS_SHARE if setup.fewer_blocks else (1, 1)
    return TARGET_BLOCKS * share // whole


def decode_attention(
    kernel, shared_bytes, queries, cache, scale, mask=None, sinks=None, compiled=False,
    tensor_cores=None, wide_bytes=0,
):
    """Fused attention of ``queries`` ``[B, H_q, L, D]`` over a TurboQuantKVCache.

    Returns ``[B, H_q, L, D]`` in ``queries.dtype``, or None when these shapes are not
    covered (see :func:`attention_plan`) or the backend is missing. With ``compiled`` the
    two launches are replayed from an ``mx.compile`` graph when no mask array is given,
    which saves most of the host time of a decode step. ``tensor_cores`` (default: the
    ``MLX_TQ_TENSOR_CORES`` setting) lets the tensor-core kernel run where it applies;
    ``wide_bytes`` is its shared memory per block on sm_90 and later, for bulk copies or
    wide table rows (see :func:`tensor_core_plan`; the backend knows its device).
    """
    packed = getattr(cache, "_packed", None)  # not `packed`: that waits on rows written in place
    chain = _chain(cache)
    tensor_cores_arg = tensor_cores
    if tensor_cores is None:
        tensor_cores = tensor_cores_enabled()
    fast_key = None
    if mask is None and sinks is None and packed is not None \
            and getattr(cache, "rope_frame", None) is None:  # fmt: skip
        # Decode repeats one configuration per layer: the set-up of the last call is reused
        # while nothing it depends on changed (the lookups below cost host time per layer).
        fast_key = (kernel, shared_bytes, queries.shape, queries.dtype, scale, compiled,
                    tensor_cores, wide_bytes, _settings(), cache.scheme, cache.layer_index,
                    cache.v_dim, packed.shape)  # fmt: skip
        if chain.fast is not None and chain.fast[0] == fast_key:
            _, setup, n_splits, meta, _ = chain.fast
            return _run_rows(setup, chain, cache, queries, scale, packed, meta, n_splits)
    B, n_q_heads, L, D = queries.shape
    if cache.v_dim != D:
        return None
    T = cache.attended_tokens
    masking = _prepare_mask(mask, B, n_q_heads, L, T)
    if masking is None:
        return None
    mode, mask_arr, mb, mh, ml = masking
    stored = cache.values if packed is None else packed
    n_kv_heads, cap = stored.shape[1:3]
    frame = getattr(cache, "rope_frame", None)  # set for centred caches only
    if frame is not None and cache.key_mean is None:
        return None  # nothing stored yet: no mean to add back
    setup = _launch(
        kernel, shared_bytes, cache.key_codec, cache.value_codec,
        mx.uint32 if packed is not None else cache.keys.dtype,
        n_kv_heads, B, n_q_heads, L, D, queries.dtype, scale, mode, mb, mh, ml,
        sinks is not None, compiled and mask_arr is None, tensor_cores, packed is not None,
        None if frame is None else (frame.dims, frame.traditional), wide_bytes, _bulk(),
    )  # fmt: skip
    if setup is None:
        return None
    n_splits, meta = _layout(cap, setup.n_blocks, setup.tile, n_kv_heads, target_blocks(setup),
                             MIN_SPAN, setup.max_splits)  # fmt: skip
    if fast_key is not None:
        # What a replay must find unchanged; only a set-up taking the tensor-core setting
        # from the environment may be replayed (a caller's explicit choice is not checked).
        replay = None
        if tensor_cores_arg is None:
            replay = (queries.shape, queries.dtype, scale, packed, _settings(), setup, n_splits,
                      meta)  # fmt: skip
        chain.fast = (fast_key, setup, n_splits, meta, replay)
    if packed is not None:  # one array of rows holds codes and norms of keys and values
        keys = values = packed
        key_norms = value_norms = _dummy(mx.float16)
    else:
        keys = cache.keys.view(mx.uint32) if setup.float_keys else cache.keys
        key_norms = cache.value_norms if setup.float_keys else cache.key_norms
        values, value_norms = cache.values, cache.value_norms
    if setup.max_splits is not None:
        _chain(cache, setup.n_blocks)  # the fused merge's counter
    kmean = omega = None
    if frame is not None:  # [B, H_kv, 1, D]: read as B * H_kv rows of D, no reshape per call
        kmean, omega = cache.key_mean, frame.omega
    return _run(setup, chain, queries, scale, keys, values, key_norms, value_norms, mask_arr,
                device_tokens(cache), meta, kmean, omega, sinks, n_splits)  # fmt: skip


def _run(setup, chain, queries, scale, keys, values, key_norms, value_norms, mask, count, meta,
         kmean, omega, sinks, n_splits):  # fmt: skip
    """One attention launch of ``setup`` (:func:`_launch`), after the cache's last launch."""
    q = queries
    if setup.outside_query:  # once per query, never per key
        q = queries.astype(mx.float32) * scale
        if setup.key_codec is not None:
            q = setup.key_codec.rotation.forward(q)
    # The full-capacity buffers go in as they are (row-contiguous, so never copied).
    out = setup.graph(
        q, setup.rot, keys, key_norms, values, value_norms, setup.kcent, setup.vcent,
        _dummy() if mask is None else mask, count, meta, _dummy() if kmean is None else kmean,
        _dummy() if omega is None else omega,
        _dummy() if sinks is None else sinks.astype(mx.float32), setup.rot_t,
        _dummy(mx.uint32) if chain.counter is None else chain.counter,
        _dummy() if chain.last is None else chain.last, n_splits,
    )  # fmt: skip
    chain.last = out
    return out


def _settings() -> tuple:
    """The module settings and environment a recorded set-up depends on (decode_attention's
    reused set-up and replay_attention)."""
    return (TARGET_BLOCKS, FEWER_BLOCKS_SHARE, MIN_SPAN, _bulk(),
            os.environ.get(TENSOR_CORES_ENV))  # fmt: skip


def replay_attention(replay, chain, cache, queries, scale):
    """The attention launch of a set-up ``decode_attention`` recorded on ``cache`` (its
    ``chain.fast[-1]``), for decode steps that repeat it: None where the queries, the scale,
    the rows buffer or the settings differ (the caller then takes the full path). Only the
    set-up's backend may call this (kernels.Lane checks that); no mask, no sinks."""
    q_shape, q_dtype, q_scale, rows, settings, setup, n_splits, meta = replay
    if (queries.shape != q_shape or queries.dtype != q_dtype or scale != q_scale
            or cache._packed is not rows or _settings() != settings):  # fmt: skip
        return None
    return _run_rows(setup, chain, cache, queries, scale, rows, meta, n_splits)


def _run_rows(setup, chain, cache, queries, scale, rows, meta, n_splits):
    """:func:`_run` on a cache's token rows, with no mask, mean, sinks or separate norms."""
    d16 = _dummy(mx.float16)
    return _run(setup, chain, queries, scale, rows, rows, d16, d16, None,
                device_tokens(cache), meta, None, None, None, n_splits)  # fmt: skip


def _bulk() -> tuple:
    """``tensor_core_plan``'s ``bulk`` from BULK_COPIES, BULK_STEPS and BULK_MIN_BYTES."""
    return (BULK_STEPS, BULK_MIN_BYTES) if BULK_COPIES else (0, 0)


@lru_cache(maxsize=None)
def _attention_graph(kernel, op, plan, template, out_shape, has_sinks, out_dtype, compiled):
    """The launches of one attention configuration (pass 1 and the reduce, or the tensor-core
    kernel that does both) as a function of arrays only (so a compiled graph can never bake
    in one layer's rotation or one step's token count)."""
    fused = op == "attention_tc"
    attn = kernel(op, plan.shared_request) if fused else kernel(op)  # dynamic shared
    reduce = kernel("reduce")
    R, D = plan.R, plan.D
    BH = out_shape[0] * out_shape[1] // plan.NREP  # batch x KV heads
    reduce_template = [("D", D), ("R", R), ("L", plan.L), ("NREP", plan.NREP),
                       ("HAS_SINKS", has_sinks), ("OutT", out_dtype)]  # fmt: skip

    def run(q, rot, keys, key_norms, values, value_norms, kcent, vcent, mask, pos, meta, kmean,
            omega, sinks, rot_t, counter, after, n_splits):  # fmt: skip
        inputs = [q, rot, keys, key_norms, values, value_norms, kcent, vcent, mask, pos, meta,
                  kmean, omega]  # fmt: skip
        partials = [(BH, n_splits, R, D), (BH, n_splits, R, 2)]
        if fused:
            _, _, out = attn(
                inputs=inputs + [sinks, rot_t, counter, after],
                template=list(template) + [("HAS_SINKS", has_sinks)],
                grid=(n_splits * plan.NT, BH, 1),
                threadgroup=(plan.NT, 1, 1),
                output_shapes=partials + [out_shape],
                output_dtypes=[mx.float32, mx.float32, out_dtype],
            )
            return out
        o_part, ml_part = attn(
            inputs=inputs + [after],
            template=list(template),
            grid=(n_splits * plan.NT, BH, 1),
            threadgroup=(plan.NT, 1, 1),
            output_shapes=partials,
            output_dtypes=[mx.float32, mx.float32],
        )
        (out,) = reduce(
            inputs=[o_part, ml_part, sinks, rot_t, meta],
            template=reduce_template,
            grid=(BH * R * D, 1, 1),
            threadgroup=(D, 1, 1),
            output_shapes=[out_shape],  # rows (batch, KV head, rep, query) = [B, H_q, L, D]
            output_dtypes=[out_dtype],
        )
        return out

    return mx.compile(run) if compiled else run


def _rows(x):
    """``x`` as the kernel reads it: rows of D in a float dtype (contiguous rows come from
    the launch itself, so no reshape node)."""
    if x.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        x = x.astype(mx.float32)
    return x


def _encodable(key_codec, keys, value_codec, values) -> bool:
    """Whether the encode kernel's core takes ``keys`` (and ``values``, unless None): head
    dims a multiple of 32 up to 1024 that the codecs were built for, and values of the keys'
    shape and dtype with the same norm correction."""
    D = keys.shape[-1]
    if D % 32 or not 32 <= D <= 1024 or D != key_codec.dim:
        return False
    return values is None or (
        tuple(values.shape) == tuple(keys.shape)
        and value_codec.dim == D
        and values.dtype == keys.dtype
        and value_codec.norm_correction == key_codec.norm_correction
    )


def encode_kv(kernel, key_codec, keys, value_codec, values, rows=False, compiled=False):
    """Fused twin of ``key_codec.encode(keys)`` and ``value_codec.encode(values)`` in one
    launch: ``(packed_k, norms_k, packed_v, norms_v)``, or None where it does not apply.
    With ``values`` None only the keys are encoded (and the last two items are None). With
    ``rows`` the result is one array of token rows instead (see :func:`encode_rows`). With
    ``compiled`` a decode-sized launch (at most MAX_QUERIES tokens per head) is replayed
    from an ``mx.compile`` graph."""
    *lead, D = keys.shape
    pair = values is not None
    if kernel("encode") is None or not _encodable(key_codec, keys, value_codec, values):
        return None
    xk = _rows(keys)
    vc = value_codec if pair else key_codec
    xv = _rows(values) if pair else xk
    decode_sized = not lead or lead[-1] <= MAX_QUERIES
    graph = _encode_graph(kernel, tuple(lead), D, xk.dtype, key_codec.bits, key_codec.words,
                          vc.bits, vc.words, key_codec.norm_correction, pair, rows,
                          compiled and decode_sized)  # fmt: skip
    out = graph(xk, xv, key_codec.rotation.matrix, vc.rotation.matrix, key_codec.boundaries,
                vc.boundaries, key_codec.centroids, vc.centroids)  # fmt: skip
    if rows:
        return out[0]
    return tuple(out) if pair else (out[0], out[1], None, None)


@lru_cache(maxsize=256)  # prefill lengths vary: bounded
def _encode_graph(kernel, lead, D, in_dtype, kbits, kwords, vbits, vwords, norm_corr, pair, rows,
                  compiled):  # fmt: skip
    """The encode launch of one configuration as a function of arrays only (the codecs'
    rotations, boundaries and centroids are inputs, so one graph serves every layer)."""
    _count_build()
    k = kernel("encode")
    N = math.prod(lead)
    v_lead = list(lead) if pair and not rows else [1]
    row_words = kwords + vwords + 1
    template = [("D", D), ("KBITS", kbits), ("KW", kwords), ("VBITS", vbits), ("VW", vwords),
                ("NORM_CORR", norm_corr), ("PACKED", rows), ("InT", in_dtype)]  # fmt: skip
    output_shapes = [(*lead, row_words if rows else kwords), tuple(v_lead if rows else lead),
                     (*v_lead, vwords), tuple(v_lead)]  # fmt: skip

    def run(xk, xv, rot_k, rot_v, bnd_k, bnd_v, cent_k, cent_v):
        return k(
            inputs=[xk, xv, rot_k, rot_v, bnd_k, bnd_v, cent_k, cent_v],
            template=template,
            grid=(N * D, 2 if pair else 1, 1),  # keys and values in separate blocks
            threadgroup=(D, 1, 1),
            output_shapes=output_shapes,
            output_dtypes=[mx.uint32, mx.float16, mx.uint32, mx.float16],
        )

    return mx.compile(run) if compiled else run


def encode_rows(kernel, key_codec, keys, value_codec, values, compiled=False):
    """Fused twin of ``codec.packing.token_rows`` over both encodes: ``[..., KW + VW + 1]``
    uint32 rows (key codes, value codes, both fp16 norms in the last word), or None."""
    if values is None:
        raise ValueError("encode_rows needs values as well as keys")
    return encode_kv(kernel, key_codec, keys, value_codec, values, rows=True, compiled=compiled)


def append_rows(kernel, key_codec, keys, value_codec, values, cache, compiled=False):
    """The fused encode of ``keys`` and ``values`` ``[B, H_kv, L, D]`` written in place into
    the cache's token rows at row ``cache.offset`` (which the caller then advances): returns
    the launch's ``done`` array, or None where this does not apply (no rows, no room, more
    than MAX_QUERIES new tokens, or shapes the encode does not take). Later launches on the
    cache are ordered after it through the cache's chain (:class:`_Chain`); anything else
    that reads the rows must evaluate ``done`` first (the cache does)."""
    rows = getattr(cache, "_packed", None)
    if rows is None or keys.ndim != 4 or kernel("append") is None:
        return None
    B, H, L, D = keys.shape
    prev, cap = cache.offset, rows.shape[2]
    kw, vw = key_codec.words, value_codec.words
    if (L > MAX_QUERIES or prev + L > cap or rows.dtype != mx.uint32
            or tuple(rows.shape) != (B, H, cap, kw + vw + 1)):  # fmt: skip
        return None
    if not _encodable(key_codec, keys, value_codec, values):
        return None
    xk, xv = _rows(keys), _rows(values)
    graph = _append_graph(kernel, B * H, L, D, xk.dtype, key_codec.bits, kw, value_codec.bits,
                          vw, key_codec.norm_correction, compiled)  # fmt: skip
    chain = _chain(cache)
    consts = (key_codec.rotation.matrix, value_codec.rotation.matrix, key_codec.boundaries,
              value_codec.boundaries, key_codec.centroids, value_codec.centroids)  # fmt: skip
    cap_count = device_count(cap)
    done = _launch_append(graph, chain, xk, xv, consts, rows, prev, cap_count)
    chain.append = None  # this call's set-up, where a replay may repeat it (float inputs)
    if xk is keys and xv is values:
        chain.append = (keys.shape, keys.dtype, values.shape, values.dtype, rows, cap, graph,
                        consts, cap_count)  # fmt: skip
    return done


def replay_append(replay, chain, cache, keys, values):
    """The in-place encode of a set-up ``append_rows`` recorded on ``cache`` (its
    ``chain.append``), for decode steps that repeat it: the launch's ``done``, or None
    where the new tokens' shapes or dtypes, the rows buffer or its room differ (the caller
    then takes the full path). Only the set-up's backend may call this (kernels.Lane)."""
    k_shape, k_dtype, v_shape, v_dtype, rows, cap, graph, consts, cap_count = replay
    prev = cache.offset
    if (keys.shape != k_shape or values.shape != v_shape or keys.dtype != k_dtype
            or values.dtype != v_dtype or cache._packed is not rows
            or prev + k_shape[2] > cap):  # fmt: skip
        return None
    return _launch_append(graph, chain, keys, values, consts, rows, prev, cap_count)


def _launch_append(graph, chain, xk, xv, consts, rows, at, cap_count):
    """One in-place encode launch at row ``at``, after the cache's last launch."""
    done = graph(xk, xv, *consts, rows, device_count(at), cap_count,
                 _dummy() if chain.last is None else chain.last)  # fmt: skip
    chain.last = done
    return done


@lru_cache(maxsize=256)
def _append_graph(kernel, n_heads, L, D, in_dtype, kbits, kwords, vbits, vwords, norm_corr,
                  compiled):  # fmt: skip
    """The in-place encode of one configuration, a function of arrays only (every layer's
    codecs, rows and positions are inputs)."""
    _count_build()
    k = kernel("append")
    template = [("D", D), ("KBITS", kbits), ("KW", kwords), ("VBITS", vbits), ("VW", vwords),
                ("NORM_CORR", norm_corr), ("L_NEW", L), ("InT", in_dtype)]  # fmt: skip

    def run(xk, xv, rot_k, rot_v, bnd_k, bnd_v, cent_k, cent_v, rows, at, cap, after):
        (done,) = k(
            inputs=[xk, xv, rot_k, rot_v, bnd_k, bnd_v, cent_k, cent_v, rows, at, cap, after],
            template=template,
            grid=(n_heads * L * D, 2, 1),  # keys and values in separate blocks
            threadgroup=(D, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.uint32],
        )
        return done

    return mx.compile(run) if compiled else run


def encode(kernel, codec, x, compiled=False):
    """Fused twin of ``TurboQuantCodec.encode``: ``x`` ``[..., D]`` to ``(packed [..., words]
    uint32, norms [...] float16)``, or None where the kernel does not apply."""
    out = encode_kv(kernel, codec, x, None, None, compiled=compiled)
    return None if out is None else out[:2]
