"""The eval tools through the real command, on tq-llama-8k with tiny sizes."""

import json

import pytest

from conftest import TEST_MODEL, VAL_IDS
from mlx_lm_turboquant.cli import main

pytestmark = pytest.mark.slow


def _run(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_kld_writes_table_json_and_plots(real_model, tmp_path, capsys):
    code = _run(["eval", "kld", "--model", str(TEST_MODEL), "--ids", str(VAL_IDS), "--schemes",
                 "turbo4,turbo2", "--contexts", "48,96", "--steps", "12", "--sensitivity",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "kld.json").read_text())
    rows = {(r["scheme"], r["prefill"]): r for r in data["rows"]}
    assert set(rows) == {("turbo4", 48), ("turbo4", 96), ("turbo2", 48), ("turbo2", 96)}
    for r in rows.values():
        assert r["kl_mean"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["steps"] == 12
    # Fewer bits, more divergence.
    assert rows[("turbo2", 96)]["kl_mean"] > rows[("turbo4", 96)]["kl_mean"]
    assert len(data["sensitivity"]) == 2 * 6
    assert (tmp_path / "kld.png").stat().st_size > 0 and (tmp_path / "kld_layers.png").exists()
    assert "| turbo4 | 96 |" in capsys.readouterr().out


def test_niah_and_memory(real_model, tmp_path, capsys):
    assert _run(["eval", "niah", "--model", str(TEST_MODEL), "--ids", str(VAL_IDS), "--schemes",
                 "turbo4", "--lengths", "96", "--depths", "0.5", "--trials", "2",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    data = json.loads((tmp_path / "niah.json").read_text())
    assert [r["scheme"] for r in data["results"]] == ["fp16", "turbo4"]
    assert all(len(r["answers"]) == 2 for r in data["results"])
    assert (tmp_path / "niah.png").exists()
    assert _run(["eval", "memory", "--model", str(TEST_MODEL), "--ids", str(VAL_IDS), "--schemes",
                 "turbo3", "--contexts", "256", "--chunk", "128", "--layers", "all",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    fp16, turbo3 = rows
    # 256 tokens, 6 layers: fp16 2*2*128*2 bytes per token per layer; turbo3 100*2.
    assert fp16["kv_bytes"] == 256 * 6 * 1024 and turbo3["kv_bytes"] < 0.25 * fp16["kv_bytes"]


@pytest.mark.parametrize(
    "argv, message",
    [(["--schemes", "turbo9"], "unknown KV scheme"), (["--contexts", "0"], "positive"),
     (["--contexts", "x"], "integers"), (["--contexts", "999999"], "at least")],
)  # fmt: skip
def test_bad_arguments_are_clear_errors(real_model, capsys, argv, message):
    code = _run(["eval", "kld", "--model", str(TEST_MODEL), "--ids", str(VAL_IDS)] + argv)
    assert code == 2 and message in capsys.readouterr().err
