"""Registers, spills and blocks per SM of the tensor-core attention builds, without a GPU:

    python benchmarks/kernel_registers.py --schemes turbo4 turbo3 turbo2 turbo4c

Each scheme's decode build (D = 128, 4 query heads per KV head, one query, token rows, bf16)
is written as mlx would generate it (``kernels/generated.py``) and compiled by ``nvcc
-cubin -Xptxas -v`` for sm_90. Register counts swing with small source changes (128, 141,
167 and 186 for near-identical loops), and they decide how many blocks share an SM; check
them after every kernel edit (docs/kernels.md).
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_lm_turboquant.config import parse_scheme
from mlx_lm_turboquant.kernels import cuda, generated, launch
from mlx_lm_turboquant.kernels.launch import TC_THREADS, tensor_core_plan

REGISTERS_PER_SM = 65536
MAX_BLOCKS_PER_SM = 32


def ptxas_usage(text: str) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v`` output (the last
    function reported)."""
    regs = re.findall(r"Used (\d+) registers", text)
    if not regs:
        raise ValueError("no 'Used N registers' line in the ptxas output")
    stores = re.findall(r"(\d+) bytes spill stores", text)
    loads = re.findall(r"(\d+) bytes spill loads", text)
    smem = re.findall(r"(\d+) bytes smem", text)
    return {
        "registers": int(regs[-1]),
        "spill_stores": int(stores[-1]) if stores else 0,
        "spill_loads": int(loads[-1]) if loads else 0,
        "smem": int(smem[-1]) if smem else 0,
    }


def blocks_per_sm(registers: int, threads: int, smem: int) -> int:
    """Resident blocks per SM on an H100: registers are allocated 8 per thread at a time."""
    per_block = -(-registers // 8) * 8 * threads
    by_regs = REGISTERS_PER_SM // per_block
    # shared memory per SM as launch holds bulk builds to it; each block reserves 1 KiB
    by_smem = launch.SM_SHARED_BYTES // (smem + 1024) if smem else MAX_BLOCKS_PER_SM
    return min(by_regs, by_smem, MAX_BLOCKS_PER_SM)


def tensor_core_source(scheme: str, D=128, n_rep=4, L=1, sm90=True):
    """(source, dynamic shared bytes requested) of ``scheme``'s decode build: as an H100 runs it
    (``sm90``: bulk copies, or wide table rows with ``launch.BULK_COPIES`` off), or as other
    GPUs do (narrow rows, loads)."""
    s = parse_scheme(scheme)
    rope = (D, False) if s.centre_keys else None
    args = (D, n_rep, L, s.key_bits, s.value_bits)
    wide_bytes = cuda.WIDE_SHARED_BYTES if sm90 else 0
    configs = generated._tensor_core_config(*args, cuda.SHARED_BYTES, None, True, False,
                                            mx.bfloat16, rope, wide_bytes)  # fmt: skip
    if not configs:
        raise ValueError(f"{scheme}: the tensor-core kernel does not take this format")
    plan = tensor_core_plan(*args, True, cuda.SHARED_BYTES, True, rope, wide_bytes,
                            launch._bulk())  # fmt: skip
    return generated.cuda_source(configs[0]), plan.shared_request


def measure(scheme: str, nvcc: str, arch: str, workdir: Path, sm90=True) -> dict:
    path = workdir / f"{scheme}.cu"
    source, dynamic = tensor_core_source(scheme, sm90=sm90)
    path.write_text(source)
    cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v", str(path),
           "-o", str(path.with_suffix(".cubin"))]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{scheme}: nvcc failed\n{result.stderr[-2000:]}")
    usage = ptxas_usage(result.stdout + result.stderr)
    usage["dynamic_smem"] = dynamic
    usage["blocks_per_sm"] = blocks_per_sm(usage["registers"], TC_THREADS,
                                           usage["smem"] + dynamic)
    return usage


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schemes", nargs="+", default=["turbo4", "turbo3", "turbo2", "turbo4c"])
    p.add_argument("--nvcc", default=shutil.which("nvcc"), help="default: nvcc on PATH")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--narrow", action="store_true",
                   help="the build for GPUs before sm_90 (narrow table rows, loads)")
    p.add_argument("--loads", action="store_true",
                   help="sm_90's build with loads and wide table rows instead of bulk copies")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args()
    if not args.nvcc:
        sys.exit("nvcc not found: put the CUDA toolkit's bin on PATH or pass --nvcc")
    launch.BULK_COPIES = not args.loads
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes:
            table[scheme] = u = measure(scheme, args.nvcc, args.arch, Path(tmp),
                                        not args.narrow)  # fmt: skip
            print(f"{scheme:<10} {u['registers']:>4} registers  spills {u['spill_stores']:>4} / "
                  f"{u['spill_loads']:>4} B  smem {u['smem']:>6} + {u['dynamic_smem']:>6} B  "
                  f"{u['blocks_per_sm']} blocks per SM", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
