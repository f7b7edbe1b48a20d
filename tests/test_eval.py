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


def test_calibrate_writes_a_plan_that_fits_the_budget(real_model, tmp_path, capsys):
    from mlx_lm_turboquant import make_prompt_cache

    code = _run(["eval", "calibrate", "--model", str(TEST_MODEL), "--ids", str(VAL_IDS),
                 "--formats", "turbo2,turbo4,fp16", "--budget", "0.3", "--prefill", "48",
                 "--steps", "8", "--windows", "1", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["bytes_ratio"] <= 0.3 and len(plan["formats"]) == 6
    assert set(plan["sensitivity"]) == {"turbo2", "turbo4", "fp16"}
    assert all(a > b for a, b in zip(plan["sensitivity"]["turbo2"], plan["sensitivity"]["fp16"]))
    assert f"plan: {plan['layers']}" in capsys.readouterr().out
    cache = make_prompt_cache(real_model[0], "turbo4", layers=f"@{tmp_path / 'plan.json'}")
    names = [getattr(c, "scheme", None) and c.scheme.name for c in cache]
    assert names == [None if f == "fp16" else f for f in plan["formats"]]
    code = _run(["eval", "calibrate", "--model", str(TEST_MODEL), "--ids", str(VAL_IDS),
                 "--formats", "turbo2", "--budget", "0.1", "--prefill", "48", "--steps", "8"])  # fmt: skip
    assert code == 2 and "below the cheapest plan" in capsys.readouterr().err


def test_paired_needle_difference_counts_discordant_prompts():
    from mlx_lm_turboquant.eval.niah import NeedleResult, paired_difference

    def result(name, hits):
        answers = [{"length": n, "depth": 0.5, "trial": t, "hit": h}
                   for n, row in hits.items() for t, h in enumerate(row)]  # fmt: skip
        return NeedleResult(name, list(hits), [0.5], 10, [], answers)

    ref = result("fp16", {1024: [1] * 10, 2048: [1] * 6 + [0] * 4})
    other = result("turbo4", {1024: [0] * 6 + [1] * 4, 2048: [1] * 6 + [0, 0, 0, 1]})
    by_length = {r["length"]: r for r in paired_difference(ref, other)}
    # 6 lost, 0 gained at 1024: p = 2 / 2**6; at 2048 one gained, none lost: p = 1.
    assert (by_length[1024]["lost"], by_length[1024]["gained"]) == (6, 0)
    assert by_length[1024]["p_value"] == pytest.approx(2 / 64)
    assert by_length[1024]["difference"] == pytest.approx(-0.6)
    assert by_length[2048]["p_value"] == 1.0 and by_length[2048]["gained"] == 1
    lo, hi = by_length["all"]["ci95"]
    assert by_length["all"]["difference"] == pytest.approx(-5 / 20)
    assert lo < -5 / 20 < hi < 0  # 6 of 7 discordant prompts lost: significant
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(ref, result("x", {1024: [1] * 10, 4096: [1] * 10}))
    with pytest.raises(ValueError, match="same prompts"):  # a shorter run, same first prompts
        paired_difference(ref, result("x", {1024: [1] * 10}))


def test_niah_and_memory(real_model, tmp_path, capsys):
    assert _run(["eval", "niah", "--model", str(TEST_MODEL), "--ids", str(VAL_IDS), "--schemes",
                 "turbo4", "--lengths", "96", "--depths", "0.5", "--trials", "2",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    data = json.loads((tmp_path / "niah.json").read_text())
    assert [r["scheme"] for r in data["results"]] == ["fp16", "turbo4"]
    assert all(len(r["answers"]) == 2 for r in data["results"])
    hits = [[a["hit"] for a in r["answers"]] for r in data["results"]]
    (overall,) = [row for row in data["paired"]["turbo4"] if row["length"] == "all"]
    assert overall["prompts"] == 2 and overall["reference_hits"] == sum(hits[0])
    assert overall["lost"] == sum(a and not b for a, b in zip(*hits))
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
