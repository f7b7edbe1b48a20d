import pytest

from mlx_lm_turboquant import parse_layer_spec, parse_scheme, schemes
from mlx_lm_turboquant.config import KVScheme, resolve_layers


@pytest.mark.parametrize(
    "name, k, v",
    [("turbo2", 2, 2), ("turbo3", 3, 3), ("turbo4", 4, 4), ("turbo4v2", 4, 2),
     ("turbo8v4", 8, 4), ("turbo0v4", 0, 4), (" Turbo3V2 ", 3, 2)],
)  # fmt: skip
def test_parse_scheme(name, k, v):
    s = parse_scheme(name)
    assert (s.key_bits, s.value_bits) == (k, v)
    assert parse_scheme(s.name) == s


@pytest.mark.parametrize("bad", ["turbo5", "turbo8", "turbo0", "turbo4v8", "turbo4v0", "turbo", "fp16", "", 4, None])
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
