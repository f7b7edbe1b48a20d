"""pip install, then the real `mlx_lm.generate` console script gains --kv-scheme.

Builds the wheel and installs it into one fresh venv, and (separately) an editable
install into another; each venv borrows mlx / mlx-lm from this environment, so no
download happens. Runs on the shipped 4-bit demo model.
"""

import sys

import pytest
from _integration_env import (
    ROOT,
    build_wheel,
    clean_env,
    make_venv,
    pip_install,
    run,
    script,
    site_packages,
    source_copy,
)

DEMO_MODEL = ROOT / "models" / "tq-llama-8k-4bit"
PROMPT = ["--prompt", "Once upon a time", "--max-tokens", "4"]  # the demo model is slow on CPU
REPORT = "[mlx-lm-turboquant] turbo4 (--kv-scheme) on "

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """{"wheel": python, "editable": python}."""
    base = tmp_path_factory.mktemp("install")
    src = source_copy(base / "src")
    wheel = build_wheel(src, base / "dist")
    pythons = {
        "wheel": make_venv(base / "venv-wheel"),
        "editable": make_venv(base / "venv-editable"),
    }
    pip_install(pythons["wheel"], wheel)
    pip_install(pythons["editable"], "-e", src)
    return pythons


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_bootstrap_files_are_installed(installs, kind):
    files = {p.name for p in site_packages(installs[kind]).iterdir()}
    assert {
        "mlx_lm_turboquant.pth",
        "mlx_lm_turboquant.start",
        "_mlx_lm_turboquant_boot.py",
    } <= files
    pth = (site_packages(installs[kind]) / "mlx_lm_turboquant.pth").read_text()
    assert pth.strip() == "import _mlx_lm_turboquant_boot; _mlx_lm_turboquant_boot.boot()"


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_generate_console_script_gains_kv_scheme(installs, kind):
    python = installs[kind]
    generate = [python, script("mlx_lm.generate"), "--model", DEMO_MODEL, *PROMPT]

    tq = run([*generate, "--kv-scheme", "turbo4"])
    assert tq.returncode == 0, tq.stderr
    assert REPORT in tq.stderr
    assert "B/token vs 6,144 fp16" in tq.stderr
    assert "Generation: 4 tokens" in tq.stdout

    plain = run(generate, env=clean_env(MLX_TQ_DISABLE="1"))
    assert plain.returncode == 0, plain.stderr
    assert "mlx-lm-turboquant" not in plain.stderr + plain.stdout
    assert "Generation: 4 tokens" in plain.stdout
    # With the plugin off, the flag does not exist: mlx-lm's own parser rejects it.
    off = run([*generate, "--kv-scheme", "turbo4"], env=clean_env(MLX_TQ_DISABLE="1"))
    assert off.returncode == 2 and "unrecognized arguments: --kv-scheme" in off.stderr


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_doctor_reports_an_active_bootstrap(installs, kind):
    doctor = run([installs[kind], "-m", "mlx_lm_turboquant", "doctor", "--strict"])
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "bootstrap: ran at start-up" in doctor.stdout
    assert (
        "attention on, make_prompt_cache on, prompt_cache_files on, generate_kwargs on"
        in doctor.stdout
    )
    assert "schemes (builtin): turbo2, turbo3, turbo4" in doctor.stdout

    console = site_packages(installs[kind]).parent.parent.parent / "bin" / "mlx-lm-turboquant"
    disabled = run([console, "doctor", "--strict"], env=clean_env(MLX_TQ_DISABLE="1"))
    assert disabled.returncode == 1
    assert "bootstrap: disabled by MLX_TQ_DISABLE=1" in disabled.stdout
    assert "attention off" in disabled.stdout


def test_the_plugin_is_imported_only_when_mlx_lm_is(installs):
    """The .pth imports the stdlib bootstrap only: no mlx, no plugin package."""
    probe = "import sys; print(sorted(m for m in sys.modules if m.startswith(('mlx', '_mlx'))))"
    out = run([installs["wheel"], "-c", probe])
    assert out.stdout.strip() == "['_mlx_lm_turboquant_boot']"
    out = run(
        [installs["wheel"], "-c", "import mlx_lm, sys; print('mlx_lm_turboquant' in sys.modules)"]
    )
    assert out.stdout.strip() == "True"


def test_python_dash_s_skips_the_bootstrap(installs):
    out = run(
        [
            installs["wheel"],
            "-S",
            "-c",
            "import sys; print('_mlx_lm_turboquant_boot' in sys.modules)",
        ]
    )
    assert out.stdout.strip() == "False"
