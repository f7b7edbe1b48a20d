"""The full source mlx builds for each kernel, so CI can compile it without a GPU.

mlx wraps a kernel body in a signature generated from the input/output names, dtypes and
template arguments (``mlx/backend/metal`` ``write_signature`` and ``mlx/backend/cuda``
``build_kernel`` in mlx 0.32). This module writes the same wrapping for the configurations
in :func:`configurations`; ``tests/test_kernel_sources.py`` compiles the result: Metal with
g++ against ``tests/metal_shim/metal_stdlib`` (a header declaring the Metal built-ins the
kernels use), CUDA with nvcc. Only mlx's own prelude differs: a stand-in replaces it.
"""

from dataclasses import dataclass
from typing import List, Tuple

import mlx.core as mx

from . import cuda, launch, metal
from .launch import attention_plan, tensor_core_plan
from .source import CUDA_ONLY, OPS

# mlx passes an input in Metal's `constant` address space below this many elements.
METAL_MAX_CONSTANT_ARRAY = 8

_METAL_TYPES = {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t",
                mx.uint32: "uint32_t", mx.int32: "int32_t"}  # fmt: skip
_CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
               mx.uint32: "uint32_t", mx.int32: "int32_t"}  # fmt: skip
_METAL_ATTRIBUTES = {
    "simdgroup_index_in_threadgroup": "uint", "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint", "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3", "threadgroup_position_in_grid": "uint3",
    "threads_per_threadgroup": "uint3", "threads_per_simdgroup": "uint",
}  # fmt: skip

CUDA_STAND_IN_HEADER = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cstdint>
#define inf cuda::std::numeric_limits<float>::infinity()
"""


@dataclass(frozen=True)
class KernelConfig:
    """One instance of an op: template arguments and the (dtype, size) of each input."""

    op: str
    template: Tuple
    inputs: Tuple  # ((dtype, size), ...) in the op's input order
    outputs: Tuple  # (dtype, ...)


def _template_value(v):
    if isinstance(v, mx.Dtype):
        return _METAL_TYPES[v]
    return str(int(v)) if isinstance(v, bool) else str(v)


def _template_kind(v):
    return "typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool) else "int"


def metal_source(cfg: KernelConfig) -> str:
    body, in_names, out_names = OPS[cfg.op]
    source = metal.PRELUDE + body
    name = f"custom_kernel_turboquant_{cfg.op}"
    tdef = "<" + ", ".join(_template_value(v) for _, v in cfg.template) + ">"
    name += "_" + tdef.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for dtype, size in cfg.inputs:
        small = size < METAL_MAX_CONSTANT_ARRAY
        name += "_" + _METAL_TYPES[dtype].replace("_t", "") + ("c" if small else "")
    params = []
    for i, (n, (dtype, size)) in enumerate(zip(in_names, cfg.inputs)):
        space = "constant" if size < METAL_MAX_CONSTANT_ARRAY else "device"
        params.append(f"  const {space} {_METAL_TYPES[dtype]}* {n} [[buffer({i})]]")
    for j, (n, dtype) in enumerate(zip(out_names, cfg.outputs)):
        params.append(f"  device {_METAL_TYPES[dtype]}* {n} [[buffer({len(cfg.inputs) + j})]]")
    params += [f"  {t} {a} [[{a}]]" for a, t in _METAL_ATTRIBUTES.items() if a in source]
    targs = ", ".join(f"{_template_kind(v)} {k}" for k, v in cfg.template)
    return (
        metal.HEADER
        + f"template <{targs}>\n[[kernel]] void {name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + source
        + "\n}\n"
        + f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}{tdef}) {name}{tdef};\n'
    )


def cuda_source(cfg: KernelConfig) -> str:
    body, in_names, out_names = OPS[cfg.op]
    tags = "".join(("_t" if v else "_f") if isinstance(v, bool) else
                   "_" + str(v).split(".")[-1] if isinstance(v, mx.Dtype) else
                   f"_{v}" for _, v in cfg.template)  # fmt: skip
    name = f"custom_kernel_turboquant_{cfg.op}{tags}"
    params = [f"    const {_CUDA_TYPES[d]}* {n}" for n, (d, _) in zip(in_names, cfg.inputs)]
    params += [f"    {_CUDA_TYPES[d]}* {n}" for n, d in zip(out_names, cfg.outputs)]
    consts = "".join(
        f"  using {k} = {_CUDA_TYPES[v]};\n" if isinstance(v, mx.Dtype) else
        f"  constexpr {_template_kind(v)} {k} = {str(v).lower() if isinstance(v, bool) else v};\n"
        for k, v in cfg.template
    )  # fmt: skip
    return (
        CUDA_STAND_IN_HEADER
        + cuda.HEADER
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + f"__global__ void {name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + consts
        + "\n"
        + cuda.PRELUDE
        + body
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )


def _token_inputs(plan, tokens=4096):
    """(dtype, size) of keys, key_norms, values, value_norms: four arrays, or token rows
    passed as both keys and values with one-element norms."""
    if plan.PACKED:
        rows = (mx.uint32, tokens * (plan.WK + plan.WV + 1))
        return (rows, (mx.float16, 1), rows, (mx.float16, 1))
    return ((mx.uint32, tokens * plan.WK), (mx.float16, tokens),
            (mx.uint32, tokens * plan.WV), (mx.float16, tokens))  # fmt: skip


# mask kind -> (MASK_MODE, (MB, MH, ML)): an array mask varies over query heads and queries.
_MASK_MODES = {None: (0, (False,) * 3), "causal": (1, (False,) * 3),
               "array": (2, (False, True, True))}  # fmt: skip


def _centring_inputs(plan):
    """(dtype, size) of kmean and omega: a centred cache's key means and RoPE speeds."""
    if not plan.CENTRED:
        return ((mx.float32, 1), (mx.float32, 1))
    return ((mx.float32, 2 * plan.D), (mx.float32, plan.RDIMS // 2))


def _attention_configs(D, n_rep, L, key_bits, key_dtype, value_bits, shared, mask, sinks,
                       packed=False, rope=None):  # fmt: skip
    plan = attention_plan(D, n_rep, L, key_bits, key_dtype, value_bits, shared, packed, rope)
    if plan is None:
        return []
    q_dtype = key_dtype if plan.Q_SH else mx.float32
    R = plan.R
    mode, mflags = _MASK_MODES[mask]
    kb = plan.KBITS
    kcent = 1 << kb if kb < 16 else 1
    attn = KernelConfig(
        "attention",
        tuple(plan.template(q_dtype, D**-0.5, mode, *mflags)),
        ((q_dtype, R * D), (mx.float32, D * D if kb < 16 else 1), *_token_inputs(plan),
         (mx.float32, kcent),
         (mx.float32, 1 << value_bits), (mx.float32, 4096 * R if mode == 2 else 1),
         (mx.int32, 1), (mx.int32, 4), *_centring_inputs(plan), (mx.float32, 8 * R * D)),
        (mx.float32, mx.float32),
    )  # fmt: skip
    red = KernelConfig(
        "reduce",
        (("D", D), ("R", R), ("L", L), ("NREP", n_rep), ("HAS_SINKS", sinks), ("OutT", key_dtype)),
        ((mx.float32, 64 * R * D), (mx.float32, 64 * R * 2), (mx.float32, 32 if sinks else 1),
         (mx.float32, D * D), (mx.int32, 4)),
        (key_dtype,),
    )  # fmt: skip
    return [attn, red]


def _tensor_core_config(D, n_rep, L, key_bits, value_bits, shared, mask, packed=False,
                        sinks=False, q_dtype=mx.float16, rope=None, wide_bytes=0,
                        same_table=True, bulk=None):  # fmt: skip
    bulk = launch._bulk() if bulk is None else bulk
    plan = tensor_core_plan(D, n_rep, L, key_bits, value_bits, same_table, shared, packed, rope,
                            wide_bytes, bulk)  # fmt: skip
    if plan is None:
        return []
    R = plan.R
    mode, mflags = _MASK_MODES[mask]
    return [KernelConfig(
        "attention_tc",
        tuple(plan.template(q_dtype, D**-0.5, mode, *mflags)) + (("HAS_SINKS", sinks),),
        ((q_dtype, R * D), (mx.float32, D), *_token_inputs(plan),  # rot, rot_t: signs
         (mx.float32, 1 << key_bits), (mx.float32, 1 << value_bits),
         (mx.float32, 4096 * R if mode == 2 else 1), (mx.int32, 1), (mx.int32, 4),
         *_centring_inputs(plan), (mx.float32, 32 if sinks else 1), (mx.float32, D),
         (mx.uint32, 8),
         (q_dtype, 8 * R * D)),
        (mx.float32, mx.float32, q_dtype),
    )]  # fmt: skip


def configurations(backend: str, full: bool = False) -> List[KernelConfig]:
    """Kernel instances to compile: every key/value format at D=128, and the head dims,
    GQA factors, query counts, masks and sinks of the parity matrix (all of them with
    ``full``, a spread of them otherwise)."""
    shared = {"cuda": cuda.SHARED_BYTES, "metal": metal.SHARED_BYTES}[backend]
    formats = [(4, 4), (3, 3), (2, 2), (8, 4), (4, 2), (2, 4), (0, 4), (0, 3)]
    cases = [(128, 4, 1, kb, vb, None, False) for kb, vb in formats]
    # Token rows (code keys only): the same kernels with another addressing.
    packed = [(128, 4, 1, 4, 4, None, False), (128, 4, 1, 3, 3, None, False),
              (96, 8, 4, 8, 4, "array", True), (256, 1, 1, 2, 3, None, False)]  # fmt: skip
    cases += [(64, 8, 4, 3, 3, "causal", True), (96, 1, 4, 4, 2, "array", False),
              (256, 8, 4, 0, 4, "array", True), (256, 1, 1, 3, 3, None, True),
              (128, 8, 8, 4, 4, "causal", False)]  # fmt: skip
    if full:
        cases = [(D, n_rep, L, kb, vb, mask, sinks)
                 for D in (64, 96, 128, 256) for n_rep in (1, 4, 8) for L in (1, 4)
                 for kb, vb in formats
                 for mask, sinks in ((None, False), ("array", True))]  # fmt: skip
    out = []
    for D, n_rep, L, kb, vb, mask, sinks in cases:
        key_dtype = mx.bfloat16 if (kb == 0 and D == 256) else mx.float16
        out += _attention_configs(D, n_rep, L, kb, key_dtype, vb, shared, mask, sinks)
    for D, n_rep, L, kb, vb, mask, sinks in packed:
        out += _attention_configs(D, n_rep, L, kb, mx.float16, vb, shared, mask, sinks, True)
    # Centred caches (c schemes): RoPE over all channels in either layout, and partial RoPE.
    centred = [(128, 4, 1, 4, 4, None, False, (128, False)),
               (64, 8, 4, 3, 3, "causal", True, (64, True)),
               (128, 1, 4, 4, 2, "array", False, (64, False)),
               (96, 4, 1, 4, 4, None, False, (96, True))]  # fmt: skip
    for D, n_rep, L, kb, vb, mask, sinks, rope in centred:
        out += _attention_configs(D, n_rep, L, kb, mx.float16, vb, shared, mask, sinks, True,
                                  rope)  # fmt: skip
    for D in (64, 96, 128, 256):
        for kb, vb in ((2, 2), (3, 3), (4, 4), (8, 4), (4, 2), (2, 3)):
            dtype = mx.bfloat16 if kb % 2 else mx.float16
            out.append(KernelConfig(
                "encode",
                (("D", D), ("KBITS", kb), ("KW", D * kb // 32), ("VBITS", vb),
                 ("VW", D * vb // 32), ("NORM_CORR", kb != 8), ("PACKED", kb == vb),
                 ("InT", dtype)),
                ((dtype, 16 * D), (dtype, 16 * D), (mx.float32, D * D), (mx.float32, D * D),
                 (mx.float32, (1 << kb) - 1), (mx.float32, (1 << vb) - 1),
                 (mx.float32, 1 << kb), (mx.float32, 1 << vb)),
                (mx.uint32, mx.float16, mx.uint32, mx.float16),
            ))  # fmt: skip
    if backend in ("cuda",):  # ops in CUDA_ONLY: no Metal version to compile
        # Encodes written in place into token rows (decode: 1 or 4 new tokens per head).
        for D, kb, vb, L in ((128, 4, 4, 1), (64, 3, 3, 4), (128, 2, 4, 1), (256, 4, 2, 1)):
            dtype = mx.bfloat16 if kb % 2 else mx.float16
            kw, vw = D * kb // 32, D * vb // 32
            out.append(KernelConfig(
                "append",
                (("D", D), ("KBITS", kb), ("KW", kw), ("VBITS", vb), ("VW", vw),
                 ("NORM_CORR", True), ("L_NEW", L), ("InT", dtype)),
                ((dtype, 8 * L * D), (dtype, 8 * L * D), (mx.float32, D * D),
                 (mx.float32, D * D), (mx.float32, (1 << kb) - 1), (mx.float32, (1 << vb) - 1),
                 (mx.float32, 1 << kb), (mx.float32, 1 << vb),
                 (mx.uint32, 8 * 512 * (kw + vw + 1)), (mx.int32, 1), (mx.int32, 1),
                 (mx.float32, 8 * 32 * D)),
                (mx.uint32,),
            ))  # fmt: skip
        tc_cases = [  # D, n_rep, L, key bits, value bits, mask, sinks, query dtype
            (128, 4, 1, 4, 4, None, False, mx.bfloat16),
            (128, 1, 4, 3, 3, "causal", True, mx.float16),
            (64, 8, 1, 2, 4, "array", True, mx.bfloat16),
            (128, 4, 2, 4, 3, None, False, mx.float16),
            (64, 2, 4, 3, 2, "causal", False, mx.bfloat16),
        ]
        # The builds for sm_90 and later (bulk copies of token rows; wide table rows where
        # the rows are loaded) and for other GPUs (narrow rows, loads).
        wide = cuda.WIDE_SHARED_BYTES
        for D, n_rep, L, kb, vb, mask, sinks, q_dtype in tc_cases:
            for packed, rows, bulk in ((False, 0, None), (True, 0, None), (True, wide, (2, 0)),
                                       (True, wide, (0, 0)), (False, wide, None)):  # fmt: skip
                out += _tensor_core_config(D, n_rep, L, kb, vb, shared, mask, packed, sinks,
                                           q_dtype, wide_bytes=rows, bulk=bulk)  # fmt: skip
        # Separate key and value tables (the value table in the upper half of wide rows).
        out += _tensor_core_config(128, 4, 1, 4, 4, shared, None, True, wide_bytes=wide,
                                   same_table=False)  # fmt: skip
        out += _tensor_core_config(64, 4, 1, 2, 4, shared, None, True, wide_bytes=wide,
                                   same_table=False)  # fmt: skip
        for D, n_rep, L, kb, vb, rope in ((128, 4, 1, 4, 4, (128, False)),
                                          (64, 8, 1, 3, 3, (64, True)),
                                          (128, 2, 4, 4, 3, (64, False))):  # fmt: skip
            for rows in (0, wide):
                out += _tensor_core_config(D, n_rep, L, kb, vb, shared, "causal", True, False,
                                           mx.bfloat16, rope, rows)  # fmt: skip
    assert backend == "cuda" or not any(c.op in CUDA_ONLY for c in out)
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def sources(backend: str, full: bool = False):
    """``[(config, full source)]`` for ``backend`` ("cuda" or "metal")."""
    write = {"cuda": cuda_source, "metal": metal_source}[backend]
    return [(c, write(c)) for c in configurations(backend, full)]
