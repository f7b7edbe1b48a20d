"""The full kernel sources mlx would build compile on a machine without a GPU.

Metal: each generated source (``kernels/generated.py``: signature, templates and body as
mlx writes them) is compiled by g++ as C++17 against ``tests/metal_shim/metal_stdlib``, a
header that declares the Metal built-ins the kernels use; a typo, an undeclared name or a
type error fails here. CUDA: the same kernels compiled by nvcc for sm_90 (ptxas included,
so a shared-memory or register overflow fails too); skipped where nvcc is absent.
Set MLX_TQ_FULL_SOURCE_CHECK=1 to compile every configuration of the GPU parity matrix.
"""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_lm_turboquant.kernels import cuda, generated

SHIM = Path(__file__).resolve().parent / "metal_shim"
FULL = os.environ.get("MLX_TQ_FULL_SOURCE_CHECK") == "1"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_metal_sources_compile(tmp_path):
    sources = generated.sources("metal", full=FULL)
    assert {c.op for c, _ in sources} == {"attention", "reduce", "encode"}

    def compile_one(item):
        i, (cfg, src) = item
        path = tmp_path / f"k{i}.metal.cpp"
        path.write_text(src)
        cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-attributes",
               "-Wno-unknown-pragmas", f"-I{SHIM}", "-x", "c++", str(path)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        return cfg, result

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, enumerate(sources)))
    failures = [(c, r.stderr) for c, r in results if r.returncode]
    assert not failures, (
        f"{len(failures)} Metal kernels fail, first: {failures[0][0]}\n{failures[0][1][:3000]}"
    )


def test_metal_shim_catches_errors(tmp_path):
    """The check can fail: a body with an undeclared Metal built-in does not compile."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    cfg, src = generated.sources("metal")[0]
    bad = src.replace("simd_sum(v)", "simd_summ(v)")
    assert bad != src
    path = tmp_path / "bad.cpp"
    path.write_text(bad)
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wno-attributes", f"-I{SHIM}", "-x", "c++",
           str(path)]  # fmt: skip
    assert subprocess.run(cmd, capture_output=True).returncode != 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_sources_compile(tmp_path):
    sources = generated.sources("cuda", full=FULL)
    prefix = generated.CUDA_STAND_IN_HEADER + cuda.HEADER
    assert all(s.startswith(prefix) for _, s in sources)
    if not FULL:  # the spread of configurations, minus the slowest to build (R >= 32)
        sources = [(c, s) for c, s in sources if dict(c.template).get("R", 1) < 32]
    # One translation unit: nvcc's start-up dominates a kernel this size.
    unit = prefix + "".join(s[len(prefix):] for _, s in sources)
    path = tmp_path / "kernels.cu"
    path.write_text(unit)
    cmd = ["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-Werror", "all-warnings",
           "-o", str(tmp_path / "kernels.cubin"), str(path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[:4000]
