"""The start-up bootstrap: stdlib only, once per process, never raises, kill switch.

Each test runs a fresh interpreter with `-S` (no .pth processing at all) and the
needed directories on PYTHONPATH, so the state of this test process does not matter.
"""

import sys
import textwrap

from _integration_env import ROOT, base_paths, clean_env, run

BOOT_DIR = ROOT / "mlx_lm_turboquant" / "integration"
LOAD_BOOT = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_mlx_lm_turboquant_boot", r"{BOOT_DIR / 'bootstrap.py'}")
boot = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = boot
spec.loader.exec_module(boot)
"""


def python(code, **env):
    paths = [str(ROOT), *base_paths()]
    e = clean_env(PYTHONPATH=":".join(paths), **env)
    return run([sys.executable, "-S", "-c", LOAD_BOOT + textwrap.dedent(code)], env=e, timeout=120)


def test_boot_imports_only_the_standard_library():
    out = python("""
        before = set(sys.modules)
        boot.boot()
        new = set(sys.modules) - before
        print(sorted(m for m in new if m.split('.')[0] not in sys.stdlib_module_names))
        print(type(sys.meta_path[0]).__name__)
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "TurboQuantImportFinder"]


def test_boot_runs_once_even_when_the_pth_line_runs_twice():
    line = (ROOT / "bootstrap" / "mlx_lm_turboquant.pth").read_text().strip()
    out = python(f"""
        exec({line!r}); exec({line!r})
        from mlx_lm_turboquant.integration import bootstrap as package_copy
        package_copy.boot(); package_copy.install_finder()
        print(sum(getattr(f, "_mlx_lm_turboquant", False) for f in sys.meta_path))
        import mlx_lm
        print(boot.status()["fired"].count("mlx_lm"), boot.status()["errors"])
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["1", "1 []"]


def test_start_file_names_the_same_entry_point():
    entry = (ROOT / "bootstrap" / "mlx_lm_turboquant.start").read_text().strip()
    out = python(f"""
        import pkgutil
        pkgutil.resolve_name({entry!r})()
        print(boot.status()["booted"], boot.status()["finder_installed"])
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "True True"


def test_kill_switch():
    out = python(
        """
        boot.boot()
        import mlx_lm
        from mlx_lm.models import cache
        print(boot.status()["disabled"], boot.status()["finder_installed"],
              hasattr(cache.make_prompt_cache, "_tq_original"))
        """,
        MLX_TQ_DISABLE="1",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "True False False"


def test_hooks_patch_mlx_lm_and_its_copies_on_import():
    out = python("""
        boot.boot()
        import mlx_lm, mlx_lm.generate
        gen = sys.modules["mlx_lm.generate"]
        from mlx_lm.models import cache, base
        print(cache.make_prompt_cache is gen.make_prompt_cache, hasattr(cache.make_prompt_cache, "_tq_original"))
        print(getattr(base.scaled_dot_product_attention, "_turboquant", False))
        print(hasattr(gen.setup_arg_parser, "_tq_original"), mlx_lm.generate is gen.generate)
        # Loaders are the real ones again once the module has run.
        print(type(mlx_lm.__spec__.loader).__name__, type(mlx_lm.__loader__).__name__)
        import mlx_lm.chat
        print(hasattr(mlx_lm.chat.setup_arg_parser, "_tq_original"))
        """)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[:3] == ["True True", "True", "True True"]
    assert "Chained" not in lines[3]
    assert lines[4] == "True"


def test_a_failing_hook_never_breaks_the_import():
    out = python("""
        boot.HANDLER = "no_such_module_for_tq_tests"
        boot.boot()
        import mlx_lm
        print("imported", len(boot.status()["errors"]) > 0)
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "imported True"
    assert "[mlx-lm-turboquant] could not patch mlx_lm" in out.stderr
    assert "mlx-lm-turboquant doctor" in out.stderr


def test_boot_after_mlx_lm_was_imported_patches_at_once():
    out = python("""
        import mlx_lm
        boot.boot()
        from mlx_lm.models import cache
        print(hasattr(cache.make_prompt_cache, "_tq_original"))
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "True"
