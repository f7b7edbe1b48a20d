"""The GPU benchmark's result handling, which runs on any machine: merging runs' end-to-end
rows and plotting them (the timing itself needs the GPU; see docs/kernels.md)."""

import importlib.util
import json

from conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_kernels", ROOT / "benchmarks" / "bench_kernels.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, name, contexts, schemes):
    rows = []
    for T in contexts:
        row = {"context": T, "fp16": {"tok_s": 100.0 + T / 1024, "vs_fp16": None}}
        for i, s in enumerate(schemes):
            row[s] = {"tok_s": 90.0 + i, "vs_fp16": 0.9 + i / 100}
        rows.append(row)
    path = tmp_path / name
    result = {"device": "gpu", "kernels": [], "schemes": [], "e2e_schemes": schemes, "e2e": rows}
    path.write_text(json.dumps(result))
    return path


def test_merged_runs_sorted_by_context_and_plotted(tmp_path):
    bench = _bench()
    late = _run(tmp_path, "late.json", [65536, 131072], ["turbo4", "turbo3"])
    early = _run(tmp_path, "early.json", [4096, 32768], ["turbo4", "turbo3", "turbo2"])
    merged = bench.merge_e2e([late, early])
    assert [r["context"] for r in merged["e2e"]] == [4096, 32768, 65536, 131072]
    assert merged["e2e_schemes"] == ["turbo4", "turbo3"]  # turbo2 is not in both runs
    assert merged["merged_runs"] == 2
    png = tmp_path / "e2e.png"
    bench.plot(merged, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
