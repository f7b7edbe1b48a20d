"""Every mlx-lm command through its real entry point, in a fresh venv with the plugin
installed (editable), on the fp16 test model.

`evaluate` and `perplexity` import `lm_eval` / `datasets`, which the test environment
lacks: small stand-ins from tests/stubs/ are put on PYTHONPATH for those two.
"""

import json
import re
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from _integration_env import (
    clean_env,
    make_venv,
    pip_install,
    run,
    script,
    source_copy,
    stop_process_group,
    wait_for_port,
)
from conftest import TEST_MODEL, _require

STUBS = Path(__file__).resolve().parent / "stubs"
REPORT = re.compile(r"\[mlx-lm-turboquant\] (?:\w+: )?(\S+) \((.+?)\) on (\d+)/6 layers")


@pytest.fixture(scope="session")
def tq_python(tmp_path_factory):
    """A venv with the project installed in editable mode."""
    _require(TEST_MODEL)
    base = tmp_path_factory.mktemp("cli-venv")
    python = make_venv(base / "venv")
    pip_install(python, "-e", source_copy(base / "src"))
    return python


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """The test model with a minimal chat template (chat needs one)."""
    _require(TEST_MODEL)
    d = tmp_path_factory.mktemp("chat-model")
    for f in TEST_MODEL.iterdir():
        if f.name != "tokenizer_config.json":
            (d / f.name).symlink_to(f)
    config = json.loads((TEST_MODEL / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def mlx_lm(python, command, *args, env=None, **kwargs):
    return run([python, script(f"mlx_lm.{command}"), *args], env=env or clean_env(), **kwargs)


def gen_args(*extra, tokens=8):
    return ("--model", TEST_MODEL, "--prompt", "Once upon a time", "--max-tokens", tokens, *extra)


def test_generate_help_lists_the_schemes(tq_python):
    out = mlx_lm(tq_python, "generate", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "--kv-scheme NAME" in text and "--kv-layers SPEC" in text
    assert "turbo2, turbo3, turbo4, turbo0v2" in text and "'none'" in text


def test_generate_reports_and_generates(tq_python):
    out = mlx_lm(tq_python, "generate", *gen_args("--kv-scheme", "turbo4"))
    assert out.returncode == 0, out.stderr
    assert REPORT.search(out.stderr).groups()[:2] == ("turbo4", "--kv-scheme")
    assert "Generation: 8 tokens" in out.stdout
    # Greedy text differs from nothing in particular; the plain run must have no report.
    plain = mlx_lm(tq_python, "generate", *gen_args())
    assert plain.returncode == 0 and "mlx-lm-turboquant" not in plain.stderr


def test_turbo0v4_matches_plain_greedy_text(tq_python):
    tq = mlx_lm(
        tq_python, "generate", *gen_args("--kv-scheme", "turbo0v4", "--kv-layers", "all", tokens=32)
    )
    plain = mlx_lm(tq_python, "generate", *gen_args(tokens=32))
    text = lambda out: out.stdout.split("==========")[1]  # noqa: E731
    assert tq.returncode == 0 and plain.returncode == 0
    assert "turbo0v4 (--kv-scheme) on 6/6 layers" in tq.stderr
    assert text(tq) == text(plain)


def test_env_var_and_the_mlx_lm_dispatcher(tq_python):
    env = clean_env(MLX_TQ_SCHEME="turbo3", MLX_TQ_LAYERS="1:-1")
    for cmd in ([script("mlx_lm"), "generate"], ["-m", "mlx_lm", "generate"]):
        out = run([tq_python, *cmd, *gen_args(tokens=4)], env=env)
        assert out.returncode == 0, out.stderr
        assert "turbo3 (MLX_TQ_SCHEME) on 4/6 layers [1-4]; kept 0,5 (layers '1:-1')" in out.stderr
    # The flag wins over the environment; "none" means mlx-lm's plain cache.
    out = mlx_lm(tq_python, "generate", *gen_args("--kv-scheme", "none", tokens=4), env=env)
    assert out.returncode == 0 and "mlx-lm-turboquant" not in out.stderr


@pytest.mark.parametrize(
    "entry",
    [
        ["mlx_lm.generate"],
        ["mlx_lm", "generate"],
        ["-m", "mlx_lm", "generate"],
        ["-m", "mlx_lm.generate"],
    ],
)
def test_every_entry_point_gains_the_flag(tq_python, entry):
    cmd = [script(entry[0]), *entry[1:]] if entry[0] != "-m" else entry
    out = run([tq_python, *cmd, *gen_args("--kv-scheme", "turbo2", tokens=3)])
    assert out.returncode == 0, out.stderr
    assert "turbo2 (--kv-scheme) on" in out.stderr and "Generation: 3 tokens" in out.stdout


def test_quiet_silences_the_report(tq_python):
    out = mlx_lm(tq_python, "generate", *gen_args("--kv-scheme", "turbo4", tokens=4),
                 env=clean_env(MLX_TQ_QUIET="1"))  # fmt: skip
    assert out.returncode == 0 and "mlx-lm-turboquant" not in out.stderr
    assert "Generation: 4 tokens" in out.stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("--kv-scheme", "turbo4", "--kv-bits", "4"), {},
         "--kv-scheme turbo4 cannot be combined with --kv-bits"),
        (("--kv-bits", "4"), {"MLX_TQ_SCHEME": "turbo4"},
         "MLX_TQ_SCHEME turbo4 cannot be combined with --kv-bits"),
        (("--kv-scheme", "turbo9"), {}, "unknown KV scheme 'turbo9'; registered: turbo2, turbo3"),
        ((), {"MLX_TQ_SCHEME": "bogus"}, "MLX_TQ_SCHEME: unknown KV scheme 'bogus'"),
        (("--kv-layers", "1:-1"), {}, "--kv-layers needs --kv-scheme"),
        (("--kv-scheme", "turbo4", "--kv-layers", "1-x"), {}, "cannot read '1-x'"),
    ],
)  # fmt: skip
def test_flag_errors_are_clear(tq_python, args, env, message):
    out = mlx_lm(tq_python, "generate", *gen_args(*args, tokens=2), env=clean_env(**env))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, named, what", [
    (("--kv-scheme", "turbo4w16"), "turbo4w16", "a recent-token window"),
    (("--kv-scheme", "turbo4", "--kv-layers", "all,-1=turbo8v4w8"), "turbo8v4w8",
     "a recent-token window"),
    (("--kv-scheme", "turbo3c"), "turbo3c", "centred keys"),
    (("--kv-scheme", "turbo3", "--kv-layers", "all,-1=turbo4v3c"), "turbo4v3c", "centred keys"),
])  # fmt: skip
def test_server_refuses_unbatchable_schemes_at_start(tq_python, flags, named, what):
    # Batch caches keep neither a recent-token window nor centred keys: the server says so
    # before loading anything.
    out = mlx_lm(tq_python, "server", "--model", TEST_MODEL, *flags, env=clean_env())
    assert out.returncode == 2, out.stderr
    assert f"{named} keep {what}" in out.stderr and "Traceback" not in out.stderr


def test_cache_prompt_then_generate_from_the_file(tq_python, tmp_path):
    f = tmp_path / "prompt.safetensors"
    out = mlx_lm(tq_python, "cache_prompt", "--model", TEST_MODEL, "--prompt",
                 "Once upon a time there was", "--prompt-cache-file", f, "--kv-scheme", "turbo3",
                 "--kv-layers", "all")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "turbo3 (--kv-scheme) on 6/6 layers" in out.stderr
    meta = run(
        [tq_python, "-c", f"import mlx.core as mx; print(mx.load('{f}', return_metadata=True)[1])"]
    )
    assert "'0.kv_scheme': 'turbo3'" in meta.stdout and "TurboQuantKVCache" in meta.stdout

    follow = ("--prompt-cache-file", f, "--prompt", " a king", "--max-tokens", "6")
    out = mlx_lm(tq_python, "generate", *follow)
    assert out.returncode == 0, out.stderr
    assert f"turbo3 cache loaded from {f}: 6/6 layers [0-5] compressed" in out.stderr
    assert "Generation: 6 tokens" in out.stdout
    assert "Prompt: 3 tokens" in out.stdout  # only the suffix: the prefix came from the file

    same = mlx_lm(tq_python, "generate", *follow, "--kv-scheme", "turbo3")
    assert same.returncode == 0, same.stderr
    other = mlx_lm(tq_python, "generate", *follow, "--kv-scheme", "turbo4")
    assert other.returncode != 0
    assert "was written with kv_scheme turbo3 but --kv-scheme asks for turbo4" in other.stderr


def test_plain_prompt_file_with_a_scheme_is_an_error(tq_python, tmp_path):
    f = tmp_path / "plain.safetensors"
    out = mlx_lm(tq_python, "cache_prompt", "--model", TEST_MODEL, "--prompt", "Hello there",
                 "--prompt-cache-file", f)  # fmt: skip
    assert out.returncode == 0 and "mlx-lm-turboquant" not in out.stderr
    out = mlx_lm(
        tq_python, "generate", "--prompt-cache-file", f, "--prompt", " x", "--kv-scheme", "turbo4"
    )
    assert out.returncode != 0 and "was written without a KV scheme" in out.stderr


def test_chat(tq_python, chat_model):
    out = mlx_lm(tq_python, "chat", "--model", chat_model, "--max-tokens", "4",
                 "--kv-scheme", "turbo2", input="hello there\nr\nwhat now\nq\n")  # fmt: skip
    assert out.returncode == 0, out.stderr
    # One cache at start and one after the reset ("r").
    assert len(REPORT.findall(out.stderr)) == 2
    assert "turbo2 (--kv-scheme) on" in out.stderr


def test_benchmark(tq_python):
    args = ("--model", TEST_MODEL, "-p", "16", "-g", "4", "-n", "1", "--kv-scheme", "turbo4")
    out = mlx_lm(tq_python, "benchmark", *args)
    assert out.returncode == 0, out.stderr
    assert "Averages:" in out.stdout
    assert len(REPORT.findall(out.stderr)) == 2  # warm-up and one trial
    batched = mlx_lm(tq_python, "benchmark", *args, "-b", "2")  # batch TurboQuant caches
    assert batched.returncode == 0, batched.stderr
    assert "Averages:" in batched.stdout and "turbo4 (--kv-scheme) on" in batched.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, body, timeout=60):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def test_server_over_http(tq_python, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    cmd = [tq_python, script("mlx_lm.server"), "--model", TEST_MODEL, "--host", "127.0.0.1",
           "--port", port, "--kv-scheme", "turbo4"]  # fmt: skip
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                            env=clean_env(), start_new_session=True)  # fmt: skip
    try:
        wait_for_port(proc, port, 90, tmp_path / "server.log")
        body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
        first = _post(port, body)
        second = _post(port, body)  # served from the prompt cache (a trimmed copy)
        assert first[0] == second[0] == 200
        assert first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"] != ""
        assert second[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        stop_process_group(proc)
    text = (tmp_path / "server.log").read_text()
    assert "no continuous batching" not in text  # batch TurboQuant caches exist
    assert "turbo4 (--kv-scheme) on" in text


def _with_stubs():
    return clean_env(PYTHONPATH=STUBS)


def test_perplexity_runs_through_the_cache(tq_python, tmp_path):
    data = tmp_path / "text.jsonl"
    words = "the cat sat on the mat and then it went to sleep in the warm sun".split()
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(words[i % 5 :] + words[: i % 5])}) + "\n")
    args = ("--model", TEST_MODEL, "--data-path", data, "--sequence-length", "48",
            "--num-samples", "4", "--batch-size", "2")  # fmt: skip

    def ppl(*extra):
        out = mlx_lm(tq_python, "perplexity", *args, *extra, env=_with_stubs())
        assert out.returncode == 0, out.stderr
        return float(re.search(r"Perplexity: ([\d.]+)", out.stdout).group(1)), out

    plain, out = ppl()
    assert "mlx-lm-turboquant" not in out.stderr
    alone = mlx_lm(tq_python, "perplexity", *args, "--kv-chunk-size", "16", env=_with_stubs())
    assert alone.returncode == 2 and "--kv-chunk-size needs --kv-scheme" in alone.stderr
    none, _ = ppl("--kv-scheme", "none")
    assert none == plain
    turbo, out = ppl("--kv-scheme", "turbo2", "--kv-chunk-size", "16")
    assert "Evaluating through a turbo2 KV cache, 16 tokens per step" in out.stdout
    assert len(REPORT.findall(out.stderr)) == 1  # one report per run, not per batch
    assert turbo != plain  # the scheme changes what the model sees
    # The deprecated `python -m mlx_lm.perplexity` runs a second copy of the module.
    out = run([tq_python, "-m", "mlx_lm.perplexity", *args, "--kv-scheme", "turbo2",
               "--kv-chunk-size", "16"], env=_with_stubs())  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"Perplexity: {turbo:.3f}" in out.stdout


def test_evaluate_gains_the_flag(tq_python):
    out = mlx_lm(tq_python, "evaluate", "--help", env=_with_stubs())
    assert out.returncode == 0, out.stderr
    assert "--kv-scheme NAME" in out.stdout
    bad = mlx_lm(tq_python, "evaluate", "--model", TEST_MODEL, "--tasks", "x", "--kv-scheme", "x",
                 env=_with_stubs())  # fmt: skip
    assert bad.returncode == 2 and "unknown KV scheme 'x'" in bad.stderr


def test_server_and_perplexity_help(tq_python):
    for command, env in (("server", clean_env()), ("perplexity", _with_stubs())):
        out = mlx_lm(tq_python, command, "--help", env=env)
        assert out.returncode == 0 and "--kv-scheme NAME" in out.stdout, out.stderr
