"""The GPU benchmarks' result handling, which runs on any machine: merging runs' end-to-end
rows and plotting them, summarizing a profiled decode step (the timing itself needs the GPU; see docs/kernels.md)."""

import importlib.util
import json

import pytest

from conftest import ROOT


def _benchmark(name):
    """The script ``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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
    bench = _benchmark("bench_kernels")
    late = _run(tmp_path, "late.json", [65536, 131072], ["turbo4", "turbo3"])
    early = _run(tmp_path, "early.json", [4096, 32768], ["turbo4", "turbo3", "turbo2"])
    merged = bench.merge_e2e([late, early])
    assert [r["context"] for r in merged["e2e"]] == [4096, 32768, 65536, 131072]
    assert merged["e2e_schemes"] == ["turbo4", "turbo3"]  # turbo2 is not in both runs
    assert merged["merged_runs"] == 2
    png = tmp_path / "e2e.png"
    bench.plot(merged, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_profile_summary_splits_steps_at_the_markers(tmp_path):
    prof = _benchmark("profile_step")
    header = ('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"')

    def row(i, name, unit, value):
        return f'"{i}","{name}","gpu__time_duration.sum","{unit}","{value}"'

    lines = ["==PROF== Connected to process", header,
             row(0, "void mlx::core::cu::gemv<float, 4>(const float*)", "usecond", "3.50"),
             row(1, "custom_kernel_turboquant_encode_128_4_abcdef12", "ns", "2,500"),
             row(2, "void mlx::core::cu::gemv<float, 4>(const float*)", "us", "1.5"),
             row(3, f"custom_kernel_{prof.MARKER}", "ns", "900"),
             row(4, "void mlx::core::cu::gemv<float, 4>(const float*)", "msecond", "0.01"),
             row(5, f"custom_kernel_{prof.MARKER}", "ns", "900")]  # fmt: skip
    path = tmp_path / "step.csv"
    path.write_text("\n".join(lines) + "\n")
    out = prof.summarize(path, ["fp16", "turbo4"])
    assert out["fp16"]["kernels"] == 3 and abs(out["fp16"]["gpu_us"] - 7.5) < 1e-9
    assert out["fp16"]["families"]["gemv"] == {"count": 2, "us": 5.0}
    assert "custom_kernel_turboquant_encode_128_4" in out["fp16"]["families"]
    assert out["turbo4"] == {"kernels": 1, "gpu_us": 10.0,
                             "families": {"gemv": {"count": 1, "us": 10.0}}}  # fmt: skip
    with pytest.raises(ValueError, match="2 profiled steps, expected 3"):
        prof.summarize(path, ["fp16", "turbo4", "turbo3"])
    (tmp_path / "empty.csv").write_text("no table here\n")
    with pytest.raises(ValueError, match="no ncu CSV table"):
        prof.summarize(tmp_path / "empty.csv", ["fp16"])


def test_attention_call_times_pair_cudnn_with_its_reduction(tmp_path):
    prof = _benchmark("profile_attention")
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'

    def row(i, name, unit, value):
        return f'"{i}","{name}","gpu__time_duration.sum","{unit}","{value}"'

    fp16 = tmp_path / "fp16.csv"
    turbo = tmp_path / "turbo4.csv"
    fp16_rows = [
        row(0, "void mlx::core::cu::rbitsc(const unsigned int*)", "ns", "7,000"),
        row(1, "cudnn_generated_fort_native_sdpa_sm80_flash_fprop", "ns", "90,000"),
        row(2, "void cudnn::lean_reduction_kernel<0, 0, 0>(void*)", "ns", "5,000"),
        row(3, "cudnn_generated_fort_native_sdpa_sm80_flash_fprop", "us", "50"),
        row(4, "void cudnn::lean_reduction_kernel<0, 0, 0>(void*)", "us", "4"),
        row(5, "cudnn_generated_fort_native_sdpa_sm80_flash_fprop", "us", "52"),
        row(6, "void cudnn::lean_reduction_kernel<0, 0, 0>(void*)", "us", "4")]  # fmt: skip
    turbo_rows = [
        row(7, "custom_kernel_turboquant_encode_128_4", "us", "9"),
        row(8, "custom_kernel_turboquant_attention_tc_128_4", "us", "80"),
        row(9, "custom_kernel_turboquant_attention_tc_128_4", "us", "27"),
        row(10, "custom_kernel_turboquant_attention_tc_128_4", "us", "28")]  # fmt: skip
    fp16.write_text("\n".join(["==PROF== Connected to process", header] + fp16_rows))
    turbo.write_text("\n".join([header] + turbo_rows))
    assert prof.call_times(fp16) == [95.0, 54.0, 56.0]
    assert prof.call_times(turbo) == [80.0, 27.0, 28.0]
    # one profiler run, both schemes in order
    run = tmp_path / "this"
    run.mkdir()
    (run / "kt.csv").write_text("\n".join([header] + fp16_rows + turbo_rows))
    (run / "kt_order.json").write_text(json.dumps([["fp16", 4096, 3], ["turbo4", 4096, 3]]))
    table = prof.summarize([run], tmp_path / "kt.json")
    # the first (compiling) call is left out of the median
    assert table[4096]["this/fp16"]["us"] == 55.0
    assert table[4096]["this/turbo4"]["us"] == 27.5
    assert json.loads((tmp_path / "kt.json").read_text())["4096"]["this/turbo4"]["us"] == 27.5
    (run / "kt_order.json").write_text(json.dumps([["fp16", 4096, 3], ["turbo4", 4096, 4]]))
    with pytest.raises(ValueError, match="6 attention calls, the order lists 7"):
        prof.summarize([run])


def test_stall_summary_of_ncus_instruction_page(tmp_path):
    prof = _benchmark("profile_attention")
    header = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
              '"stall_long_sb","stall_wait","stall_wait (Not Issued)"')
    lines = ['"Kernel Name","custom_kernel_turboquant_attention_tc"', header,
             '"0x10","      LDG.E R1, desc[UR4][R2.64]","6","1,000","6","0","9"',
             '"0x20","      @!P1  LDG.E R3, desc[UR4][R2.64+0x4]","1","500","0","1","9"',
             '"0x30","      HADD2.F32 R5, -RZ, R1.H0_H0","13","1000","10","3","0"',
             '"0x40","      EXIT","-","-","-","-","-"']  # fmt: skip
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(lines) + "\n")
    out = prof.stall_summary(path, top=2)
    assert out["samples"] == 20  # the "(Not Issued)" columns are a subset, not added
    assert out["stalls"] == {"long_sb": 0.8, "wait": 0.2}
    assert out["opcodes"] == {"LDG": 1500, "HADD2": 1000, "EXIT": 0}  # predicate skipped
    assert out["instructions"] == 2500
    assert [h["samples"] for h in out["hot"]] == [13, 6]
    assert out["hot"][0]["sass"].startswith("HADD2.F32")
    (tmp_path / "none.csv").write_text('"ID","Kernel Name"\n')
    with pytest.raises(ValueError, match="no per-instruction table"):
        prof.stall_summary(tmp_path / "none.csv")


def test_register_report_reads_ptxas_and_counts_blocks():
    regs = _benchmark("kernel_registers")
    text = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
            "ptxas info    : Function properties for k\n"
            "    0 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
            "ptxas info    : Used 167 registers, used 1 barriers, 34900 bytes smem\n")
    assert regs.ptxas_usage(text) == {"registers": 167, "spill_stores": 16, "spill_loads": 8,
                                      "smem": 34900}  # fmt: skip
    # registers go 8 per thread at a time: 167 -> 168 x 128 threads, 3 blocks in 65536
    assert regs.blocks_per_sm(167, 128, 34900) == 3
    assert regs.blocks_per_sm(254, 128, 39540) == 2
    assert regs.blocks_per_sm(128, 128, 0) == 4
    assert regs.blocks_per_sm(32, 128, 100 * 1024) == 2  # shared memory binds
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        regs.ptxas_usage("nvcc: command not found")
    # the source it compiles is the decode build of each format the kernel takes
    source, dynamic = regs.tensor_core_source("turbo4")
    # as on an H100: narrow tables (32 KiB) and 4 warps x 2 steps of 16 rows of 33 words,
    # asked for with room enough that no 4th block fits on an SM
    assert "attention_tc" in source and 4 * (256 * 32 + 4 * 2 * 16 * 33) < dynamic
    assert regs.blocks_per_sm(128, 128, dynamic) == 3
    assert regs.tensor_core_source("turbo4", sm90=False)[1] == 4 * 256 * 32
    with pytest.raises(ValueError, match="turbo8v4: the tensor-core kernel does not take"):
        regs.tensor_core_source("turbo8v4")


def test_kernel_variants_join_and_restore_the_settings():
    bench = _benchmark("bench_kernels")
    from mlx_lm_turboquant.kernels import launch

    def settings():
        return (launch.TARGET_BLOCKS, launch.FEWER_BLOCKS_SHARE, launch.BULK_STEPS,
                launch.BULK_MIN_BYTES, launch.BULK_COPIES)  # fmt: skip

    before = settings()
    with bench._kernel_variant("turbo4:bulk3+blocks264"):
        assert settings() == (264, (1, 1), 3, 0, True)  # 264 blocks for every build
    with bench._kernel_variant("turbo3:loads"):
        assert not launch.BULK_COPIES and settings()[:2] == before[:2]
    after = settings()
    assert after == before
    for bad in ("turbo4:blocks0", "turbo4:bulk1", "turbo4:wide", "turbo4:loads+fast"):
        with pytest.raises(ValueError, match="unknown kernel variant"):
            with bench._kernel_variant(bad):
                pass


def test_kernel_timeline_finds_its_stamp_points():
    """The timeline probe patches the tensor-core kernel at its barriers: every point it
    stamps must still be in the source, once, and a missing one must say which."""
    import re

    from mlx_lm_turboquant.kernels import source

    timeline = _benchmark("kernel_timeline")
    stamped = timeline.stamped(source.ATTENTION_TC)
    points = [int(k) for k in re.findall(r"tq_stamp\((\d)\);", stamped)]
    assert sorted(points) == list(range(timeline.POINTS))
    assert stamped.index("tq_stamp(1);") < stamped.index("tq_stamp(2);") \
        < stamped.index("tq_stamp(3);") < stamped.index("tq_atomic_inc")  # fmt: skip
    with pytest.raises(ValueError, match="anchor 2"):
        timeline.stamped(source.ATTENTION_TC.replace("every warp is done with the tables", ""))
