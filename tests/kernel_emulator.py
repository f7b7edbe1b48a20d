"""A stand-in for ``mx.fast.cuda_kernel`` that runs the kernel bodies on the CPU.

``kernel(op)`` has the call signature of an mlx custom kernel, so the real launch code
(``kernels/launch.py``) drives it unchanged: inputs are prepared, templates chosen and
spans split exactly as on a GPU; only the body runs as compiled C++ threads
(``tests/emulator/emulate.h``). Needs g++ with C++20; slow, so tests keep shapes small.
"""

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_lm_turboquant.kernels import cuda
from mlx_lm_turboquant.kernels.source import OPS

HERE = Path(__file__).resolve().parent / "emulator"
_BUILD = Path(tempfile.mkdtemp(prefix="tq-emulator-"))
_C_TYPES = {mx.float32: "float", mx.float16: "tq_f16", mx.uint32: "uint32_t", mx.int32: "int32_t",
            mx.bfloat16: "tq_bf16"}  # fmt: skip
_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32, mx.int32: np.int32,
       mx.bfloat16: np.uint16}  # fmt: skip


def available() -> bool:
    return shutil.which("g++") is not None


@lru_cache(maxsize=None)
def _library(op, template, in_dtypes, out_dtypes):
    body, in_names, out_names = OPS[op]
    params = [f"const {_C_TYPES[d]}* {n}" for n, d in zip(in_names, in_dtypes)]
    params += [f"{_C_TYPES[d]}* {n}" for n, d in zip(out_names, out_dtypes)]
    consts = "".join(
        f"  using {k} = {_C_TYPES[v]};\n" if isinstance(v, mx.Dtype) else
        f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = "
        f"{str(v).lower() if isinstance(v, bool) else v};\n"
        for k, v in template
    )  # fmt: skip
    casts = ", ".join(f"({p.rsplit(' ', 1)[0]})args[{i}]" for i, p in enumerate(params))
    src = (
        '#include "emulate.h"\n'
        f"static void tq_body({', '.join(params)}) {{\n{consts}"
        "  const int tq_tid = tq_emu_tid;\n  const int tq_bx = tq_emu_bx;\n"
        "  const int tq_by = tq_emu_by;\n  (void)tq_by;\n"
        f"{body}\n}}\n"
        'extern "C" size_t tq_run(void** args, int gx, int gy, int nt, size_t dynamic) {\n'
        "  tq_emu_dynamic_bytes = dynamic;\n  tq_emu_dynamic_short = 0;\n"
        "  tq_emu_misaligned = 0;\n"
        f"  tq_emu_launch(gx, gy, nt, [&] {{ tq_body({casts}); }});\n"
        "  return tq_emu_misaligned ? (size_t)-1 : (size_t)tq_emu_dynamic_short;\n}\n"
    )
    tag = hashlib.sha1(src.encode()).hexdigest()[:16]
    cpp, so = _BUILD / f"{op}_{tag}.cpp", _BUILD / f"{op}_{tag}.so"
    cpp.write_text(src)
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", f"-I{HERE}", str(cpp),
           "-o", str(so)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"emulator build of {op} failed:\n{result.stderr[:4000]}")
    lib = ctypes.CDLL(str(so))
    lib.tq_run.argtypes = [ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_int] * 3 + [
        ctypes.c_size_t]
    lib.tq_run.restype = ctypes.c_size_t
    return lib


# Inputs a kernel writes in place (on a GPU as here: the launch gets the array's memory).
IN_PLACE = {("append", "dst")}


class EmulatedKernel:
    def __init__(self, op, shared_memory=0):
        self.op = op
        self.shared_memory = shared_memory

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                 init_value=None, verbose=False, stream=None):  # fmt: skip
        in_dtypes = tuple(a.dtype for a in inputs)
        lib = _library(self.op, tuple(template), in_dtypes, tuple(output_dtypes))
        host = []
        for name, a in zip(OPS[self.op][1], inputs):
            if (self.op, name) in IN_PLACE:  # the kernel writes into the array's own memory
                mx.eval(a)
                host.append(np.asarray(memoryview(a)))
                assert host[-1].flags.c_contiguous and host[-1].flags.writeable
            elif a.dtype == mx.bfloat16:
                host.append(np.ascontiguousarray(np.array(a.view(mx.uint16))))
            else:
                host.append(np.ascontiguousarray(np.array(a)))
        # Poison the outputs: every element the caller reads must be written by the kernel.
        outs = []
        for shape, d in zip(output_shapes, output_dtypes):
            o = np.empty(shape, _NP[d])
            o.view(np.uint8)[...] = 0xFF  # NaN in every float format
            outs.append(o)
        ptrs = (ctypes.c_void_p * (len(host) + len(outs)))(*[x.ctypes.data for x in host + outs])
        nt = threadgroup[0]
        short = lib.tq_run(ptrs, grid[0] // nt, grid[1], nt, self.shared_memory)
        if short == ctypes.c_size_t(-1).value:
            raise RuntimeError(f"{self.op}: a bulk copy with an address or size that is not a "
                               "multiple of 16 bytes")
        if short:
            raise RuntimeError(f"{self.op} declares {short} bytes of dynamic shared memory; "
                               f"the launch gave {self.shared_memory}")
        # The inputs as the kernel left them (a GPU kernel may write an input in place).
        self.inputs_after = host
        return [mx.array(o).view(d) if d == mx.bfloat16 else mx.array(o)
                for o, d in zip(outs, output_dtypes)]  # fmt: skip


@lru_cache(maxsize=None)
def kernel(op: str, shared_memory: int = 0):
    """Same contract as ``cuda.kernel``: the op's kernel, here emulated on the CPU."""
    return EmulatedKernel(op, shared_memory)


SHARED_BYTES = cuda.SHARED_BYTES
