"""Fresh virtual environments for the integration tests, without downloads.

Each venv gets the running interpreter's packages (mlx, mlx-lm, pluggy, hatchling)
through a path-only ``.pth`` line, so only this project is installed into it (wheel
or editable, ``--no-deps --no-build-isolation``). Console scripts of mlx-lm are the
real files pip wrote for the running environment, run with the venv's interpreter.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def base_paths():
    """Directories holding the packages the venvs borrow from this environment."""
    import importlib.util

    dirs = []
    for name in ("mlx", "mlx_lm", "pluggy", "numpy", "transformers", "hatchling"):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        d = str(Path(spec.origin).resolve().parent.parent)
        if d not in dirs and Path(d) != ROOT:
            dirs.append(d)
    return dirs


def script(name: str) -> str:
    """A console script pip wrote for mlx-lm (e.g. ``mlx_lm.generate``): next to this
    interpreter, else where mlx-lm's installation record says it is."""
    from importlib.metadata import distribution

    for d in (sysconfig.get_paths()["scripts"], Path(sys.executable).parent):
        if (Path(d) / name).exists():
            return str(Path(d) / name)
    for f in distribution("mlx-lm").files or ():
        if f.name == name:
            return str(Path(f.locate()).resolve())
    raise FileNotFoundError(f"console script {name} of mlx-lm not found")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_TQ_")}
    env.pop("PYTHONPATH", None)
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    env.update({k: str(v) for k, v in extra.items()})
    return env


def source_copy(dest: Path) -> Path:
    """The files a build needs, copied (so a build never writes into the checkout)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("mlx_lm_turboquant", "bootstrap"):
        shutil.copytree(ROOT / d, dest / d, ignore=ignore)
    for f in ("README.md", "LICENSE"):
        if (ROOT / f).exists():
            shutil.copy(ROOT / f, dest)
    if not (dest / "README.md").exists():  # pyproject names it
        (dest / "README.md").write_text("# mlx-lm-turboquant\n")
    return dest


def run(cmd, timeout=300, **kwargs):
    kwargs.setdefault("env", clean_env())
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _check(result, what):
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_venv(dest: Path) -> Path:
    """A venv whose site-packages also sees this environment's packages."""
    _check(run([sys.executable, "-m", "venv", "--without-pip", dest]), "venv")
    python = dest / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = Path(_check(purelib, "purelib").stdout.strip())
    (site / "_tq_test_base.pth").write_text("\n".join(base_paths()) + "\n")
    return python


def pip_install(python: Path, *args):
    cmd = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
           "--no-build-isolation", "--no-index", "-q", *args]  # fmt: skip
    return _check(run(cmd), "pip install")


def build_wheel(src: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--no-index", "-q", "-w", out, src]  # fmt: skip
    _check(run(cmd), "pip wheel")
    (wheel,) = Path(out).glob("mlx_lm_turboquant-*.whl")
    return wheel


def site_packages(python: Path) -> Path:
    out = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return Path(_check(out, "purelib").stdout.strip())


def wait_for_port(proc, port: int, timeout: float, log_path: Path, poll: float = 0.5):
    """Wait until ``proc`` (a server) accepts connections on 127.0.0.1:``port``; fail with
    its log if it exits first or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, Path(log_path).read_text()
        assert time.time() < deadline, f"server did not start in {timeout:.0f} s"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(poll)


def stop_process_group(proc):
    """SIGTERM the process group that ``proc`` leads (start_new_session=True), SIGKILL after 20 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
