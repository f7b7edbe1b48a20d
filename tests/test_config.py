import pytest

from mlx_lm_turboquant import parse_layer_spec, parse_scheme, schemes
from mlx_lm_turboquant.config import KVScheme, parse_layer_plan, resolve_layers


@pytest.mark.parametrize(
    "name, k, v",
    [("turbo2", 2, 2), ("turbo3", 3, 3), ("turbo4", 4, 4), ("turbo4v2", 4, 2),
     ("turbo8v4", 8, 4), ("turbo0v4", 0, 4), (" Turbo3V2 ", 3, 2), ("turbo4w16", 4, 4),
     ("turbo0v3w4096", 0, 3)],
)  # fmt: skip
def test_parse_scheme(name, k, v):
    s = parse_scheme(name)
    assert (s.key_bits, s.value_bits) == (k, v)
    assert parse_scheme(s.name) == s


@pytest.mark.parametrize("bad", ["turbo5", "turbo8", "turbo0", "turbo4v8", "turbo4v0", "turbo", "fp16", "", 4, None,
                                 "turbo4w0", "turbo4w4097", "turbo4w"])
def test_bad_scheme_lists_valid_forms(bad):
    with pytest.raises(ValueError) as e:
        parse_scheme(bad)
    assert repr(bad) in str(e.value)


def test_schemes_are_all_parseable_and_unique():
    names = schemes()
    assert len(names) == len(set(names)) and {"turbo2", "turbo3", "turbo4", "turbo0v4"} <= set(names)
    for n in names:
        assert parse_scheme(n).name == n


def test_scheme_dataclass_validates():
    with pytest.raises(ValueError, match="value_bits"):
        KVScheme("x", 4, 8)


@pytest.mark.parametrize(
    "spec, expected",
    [(None, [0, 1, 2, 3, 4, 5, 6, 7]), ("all", list(range(8))), ("none", []),
     ("2:-2", [2, 3, 4, 5]), ("::3", [0, 3, 6]), ("0,3-5", [0, 3, 4, 5]), ("-1", [7]),
     ("-3--1", [5, 6, 7]), ("all,!0,!-1", [1, 2, 3, 4, 5, 6]), ("^0", list(range(1, 8))),
     ("1:3, 6", [1, 2, 6]), ([0, -1], [0, 7]), (range(2), [0, 1])],
)  # fmt: skip
def test_layer_specs(spec, expected):
    assert parse_layer_spec(spec, 8) == expected


@pytest.mark.parametrize("bad", ["8", "-9", "a", "3-1", "1:2:0", "1:2:3:4", "", ",", [True], [9], 3.5])
def test_bad_layer_specs(bad):
    with pytest.raises(ValueError):
        parse_layer_spec(bad, 8)


def test_env_variable(monkeypatch):
    monkeypatch.setenv("MLX_TQ_LAYERS", "1:-1")
    assert resolve_layers(None, 4) == [1, 2]
    assert resolve_layers("0", 4) == [0]  # an explicit spec wins over the environment
    monkeypatch.delenv("MLX_TQ_LAYERS")
    assert resolve_layers(None, 3, default="all") == [0, 1, 2]


@pytest.mark.parametrize(
    "spec, expected",
    [("all", {0: "turbo3", 1: "turbo3", 2: "turbo3", 3: "turbo3"}),
     ("-1=turbo8v4", {0: "turbo3", 1: "turbo3", 2: "turbo3", 3: "turbo8v4"}),
     ("0-1,3=turbo8v4", {0: "turbo3", 1: "turbo3", 3: "turbo8v4"}),
     ("!0,-1=turbo4", {1: "turbo3", 2: "turbo3", 3: "turbo4"}),
     ("0=turbo4,-1=fp16", {0: "turbo4", 1: "turbo3", 2: "turbo3"}),
     ("1:3=turbo2,2=turbo4", {0: "turbo3", 1: "turbo2", 2: "turbo4", 3: "turbo3"})],
)  # fmt: skip
def test_layer_plans(spec, expected):
    plan = parse_layer_plan(spec, 4, KVScheme("turbo3", 3, 3, seed=7))
    assert {i: s.name for i, s in plan.items()} == expected
    assert all(s.seed == 7 for s in plan.values())  # overrides keep the base scheme's seed


@pytest.mark.parametrize("bad", ["-1=turbo9", "!1=turbo4", "=turbo4", "9=turbo4", "0=", "x=turbo4"])
def test_bad_layer_plans(bad):
    with pytest.raises(ValueError) as e:
        parse_layer_plan(bad, 4, "turbo4")
    assert repr(bad) in str(e.value) or bad.split("=")[-1] in str(e.value)


def test_plan_files(tmp_path):
    import json

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"layers": "0-1=turbo3,2=turbo4v3,3=turbo8v4"}))
    plan = parse_layer_plan(f"@{path}", 4, "turbo4")
    assert [s.name for s in plan.values()] == ["turbo3", "turbo3", "turbo4v3", "turbo8v4"]
    assert parse_layer_spec(f"@{path}", 4) == [0, 1, 2, 3]
    assert parse_layer_spec("!0,-1=turbo8v4", 4) == [1, 2, 3]
    path.write_text(json.dumps({"formats": []}))
    with pytest.raises(ValueError, match="no \"layers\""):
        parse_layer_plan(f"@{path}", 4, "turbo4")
    with pytest.raises(ValueError, match="cannot read a layer plan"):
        parse_layer_plan(f"@{tmp_path}/missing.json", 4, "turbo4")


def test_allocation_is_the_best_plan_within_budget():
    import itertools

    from mlx_lm_turboquant.eval.allocate import allocate, plan_spec

    kl = {"a": [0.5, 0.1, 0.9], "b": [0.2, 0.05, 0.3], "c": [0.0, 0.0, 0.0]}
    cost = {"a": [1, 1, 1], "b": [2, 2, 2], "c": [4, 4, 4]}
    for budget in range(3, 13):
        best = min((sum(kl[f][i] for i, f in enumerate(p)), p)
                   for p in itertools.product(kl, repeat=3)
                   if sum(cost[f][i] for i, f in enumerate(p)) <= budget)  # fmt: skip
        plan = allocate(kl, cost, budget)
        assert abs(sum(kl[f][i] for i, f in enumerate(plan)) - best[0]) < 1e-12
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(kl, cost, 2)
    assert plan_spec(["a", "a", "b", "a"]) == "0-1=a,2=b,3=a"
