"""Third-party schemes: the pluggy hook, the entry-point group, and the example plugin
of docs/plugins.md (its `# file:` blocks are written out and installed as they are)."""

import importlib
import re
import sys

import mlx.core as mx
import pytest
from _integration_env import (
    ROOT,
    base_paths,
    clean_env,
    make_venv,
    pip_install,
    run,
    script,
    source_copy,
)
from conftest import TEST_MODEL, _require
from test_prompt_cache_files import tiny_llama

import mlx_lm_turboquant as tq
from mlx_lm_turboquant import KVScheme
from mlx_lm_turboquant.schemes import hookimpl, manager

DOC = ROOT / "docs" / "plugins.md"


def write_example(dest):
    """Write the docs' example plugin files under ``dest``; returns their names."""
    blocks = re.findall(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", DOC.read_text(), re.S)
    assert {name for name, _ in blocks} == {"acme_kv/__init__.py", "pyproject.toml"}
    for name, body in blocks:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(body)
    return dest


@pytest.fixture
def registry():
    """A fresh manager without entry points; restored afterwards."""
    pm = manager.make_plugin_manager(load_entrypoints=False)
    manager.reset(pm)
    yield pm
    manager.reset()


@pytest.fixture
def acme(registry, tmp_path, monkeypatch):
    write_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("acme_kv")
    registry.register(module, name="acme")
    manager.reset(registry)
    yield module
    sys.modules.pop("acme_kv", None)


def test_builtins_register_through_the_hook(registry):
    infos = manager.available()
    assert {i.plugin for i in infos.values()} == {"builtin"}
    assert list(infos)[:3] == ["turbo2", "turbo3", "turbo4"]
    assert infos["turbo0v4"].description == "fp16 keys, 4-bit values"


def test_example_plugin_schemes_work_like_builtins(acme, patched):
    assert tq.schemes()[-2:] == ["acme-k8v3", "acme-safe3"]
    info = manager.get_scheme("ACME-Safe3")
    assert (info.plugin, info.layers, info.scheme.key_bits) == ("acme", "1:-1", 3)
    model = tiny_llama()
    cache = tq.make_prompt_cache(model, "acme-safe3")  # its default layers: 1:-1 of 3
    assert [type(c).__name__ for c in cache] == ["KVCache", "TurboQuantKVCache", "KVCache"]
    cache = tq.make_prompt_cache(model, "acme-k8v3")
    assert all(c.scheme == KVScheme("acme-k8v3", 8, 3, seed=1234) for c in cache)
    model(mx.array([[1, 2, 3, 4]]), cache=cache)  # runs through the patched attention


def test_name_clashes_and_bad_registrations_are_errors(registry):
    class Clash:
        @hookimpl
        def register_kv_schemes(self, register):
            register(KVScheme("turbo4", 4, 4))

    class NotAScheme:
        @hookimpl
        def register_kv_schemes(self, register):
            register("turbo5")

    class Reserved:
        @hookimpl
        def register_kv_schemes(self, register):
            register(KVScheme("none", 4, 4))

    for plugin, message in (
        (Clash(), "'turbo4' is registered twice: by 'builtin' and by 'clash'"),
        (NotAScheme(), "register\\(\\) takes a KVScheme"),
        (Reserved(), "invalid scheme name 'none'"),
    ):
        pm = manager.make_plugin_manager(load_entrypoints=False)
        pm.register(plugin, name=type(plugin).__name__.lower())
        with pytest.raises(ValueError, match=message):
            manager.collect(pm)


def test_unknown_names_list_the_registry(registry):
    with pytest.raises(ValueError, match="unknown KV scheme 'acme-k8v3'; registered: turbo2"):
        manager.get_scheme("acme-k8v3")


def _dist_info(dest):
    """Make ``dest`` look like a site directory with acme-kv installed."""
    write_example(dest)
    info = dest / "acme_kv-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-kv\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[mlx_lm_turboquant]\nacme = acme_kv\n")


def test_entry_points_are_discovered(tmp_path):
    _dist_info(tmp_path)
    code = ("from mlx_lm_turboquant.schemes import available; "
            "print(sorted({i.plugin for i in available().values()}))")  # fmt: skip
    path = ":".join([str(tmp_path), str(ROOT), *base_paths()])
    out = run([sys.executable, "-S", "-c", code], env=clean_env(PYTHONPATH=path))
    assert out.stdout.strip() == "['acme', 'builtin']", out.stderr
    out = run(
        [sys.executable, "-S", "-c", code], env=clean_env(PYTHONPATH=path, MLX_TQ_NO_PLUGINS=1)
    )
    assert out.stdout.strip() == "['builtin']", out.stderr


@pytest.mark.slow
def test_installed_example_plugin_from_the_command_line(tmp_path):
    _require(TEST_MODEL)
    python = make_venv(tmp_path / "venv")
    pip_install(python, "-e", source_copy(tmp_path / "src"))
    pip_install(python, write_example(tmp_path / "acme-kv"))
    doctor = run([python, "-m", "mlx_lm_turboquant", "doctor"])
    assert "schemes (acme): acme-k8v3, acme-safe3" in doctor.stdout, doctor.stderr
    out = run([python, script("mlx_lm.generate"), "--model", TEST_MODEL, "--prompt", "Hello",
               "--max-tokens", "4", "--kv-scheme", "acme-safe3"])  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "acme-safe3 (--kv-scheme) on 4/6 layers [1-4]; kept 0,5 (layers '1:-1')" in out.stderr
