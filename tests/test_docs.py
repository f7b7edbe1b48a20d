from pathlib import Path

from mlx_lm_turboquant.eval.memory import bytes_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_bytes_table_in_docs_matches_the_code():
    assert bytes_table(128) in (DOCS / "schemes.md").read_text()


def test_issue_byte_targets_at_d128():
    # turbo4 <= 0.27x, turbo3 <= 0.21x, turbo2 <= 0.15x of fp16 with every layer compressed.
    from mlx_lm_turboquant import parse_scheme

    for name, limit in (("turbo4", 0.27), ("turbo3", 0.21), ("turbo2", 0.15)):
        assert parse_scheme(name).bytes_per_token(8, 128) <= limit * 8 * 2 * 128 * 2
