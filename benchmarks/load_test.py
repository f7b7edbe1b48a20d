"""Load test of ``mlx_lm.server`` on loopback, with and without a KV scheme.

Starts the real server (127.0.0.1 only) once per scheme, sends each prompt once alone
for a reference output, then runs ``--clients`` concurrent streaming clients for
``--duration`` seconds, each sending greedy requests in a loop. Checks that every
request ends cleanly (``[DONE]``, a finish reason), that each output equals its
prompt's reference (a response that equals another prompt's reference is counted as
mixed up), and samples the server's resident memory. Prints one row per scheme.

    python benchmarks/load_test.py --duration 60 --clients 8 --schemes none,turbo4
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "tq-llama-8k"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

PROMPTS = [
    "Once upon a time there was",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\nimport mlx.core as mx\n",
    "class Cache:\n    def __init__(self):\n        self.keys = None",
    "A list of prime numbers: 2, 3, 5, 7, 11,",
    "The history of the city begins in the year",
    "\n".join(f"    def method_{i}(self, x):\n        return x * {i}" for i in range(20)),
]


def setup_arg_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--schemes", default="none,turbo4", help="comma-separated; 'none' = fp16")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per scheme")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", help="also write the results here")
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    """(current, peak) resident set of ``pid`` in KiB, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class Server:
    def __init__(self, model, scheme, log_path):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_TQ_")}
        env["PYTHONPATH"] = str(ROOT)
        if os.path.exists(OPENBLAS):
            env["LD_PRELOAD"] = OPENBLAS
        code = "import sys, mlx_lm_turboquant; mlx_lm_turboquant.activate(); " \
               "from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"  # fmt: skip
        cmd = [sys.executable, "-c", code, "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port)]  # fmt: skip
        if scheme != "none":
            cmd += ["--kv-scheme", scheme]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log_path}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not start in 180 s")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def stream(port, prompt, max_tokens):
    """One streaming completion: ``(text, generated tokens, finish_reason)``; raises on a
    bad stream."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    text, tokens, finish, done = [], None, None, False
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                text.append(choice.get("text", ""))
                finish = choice.get("finish_reason") or finish
    if not done or finish is None or tokens is None:
        raise RuntimeError(f"stream ended early ([DONE] {done}, finish reason {finish})")
    return "".join(text), tokens, finish


def run_scheme(args, scheme, log_dir):
    server = Server(args.model, scheme, log_dir / f"server-{scheme}.log")
    try:
        reference = {p: stream(server.port, p, args.max_tokens)[0] for p in PROMPTS}
        _, base_peak = rss_kib(server.proc.pid)
        stats = dict(requests=0, tokens=0, errors=0, differs=0, mixed=0)
        lock, stop_at = threading.Lock(), time.time() + args.duration
        samples = []

        def client(c):
            i = c
            while time.time() < stop_at:
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 1
                try:
                    text, tokens, _ = stream(server.port, prompt, args.max_tokens)
                except Exception as e:
                    with lock:
                        stats["errors"] += 1
                        stats.setdefault("first_error", repr(e))
                    continue
                with lock:
                    stats["requests"] += 1
                    stats["tokens"] += tokens
                    if text != reference[prompt]:
                        stats["differs"] += 1
                        if any(text == r for p, r in reference.items() if p != prompt):
                            stats["mixed"] += 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        start = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.time() - start, *rss_kib(server.proc.pid)))
            time.sleep(0.5)
        for t in threads:
            t.join()
        elapsed = time.time() - start
        rss = [s[1] for s in samples]
        half = len(rss) // 2
        stats.update(
            scheme=scheme,
            seconds=round(elapsed, 1),
            tokens_per_s=round(stats["tokens"] / elapsed, 1),
            peak_rss_mib=round(max(s[2] for s in samples) / 1024, 1),
            peak_rss_before_load_mib=round(base_peak / 1024, 1),
            rss_first_half_max_mib=round(max(rss[:half] or rss) / 1024, 1),
            rss_second_half_max_mib=round(max(rss[half:]) / 1024, 1),
        )
        return stats
    finally:
        server.stop()


def main():
    args = setup_arg_parser().parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"model {args.model} not found")
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlx-tq-load-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_scheme(args, s.strip(), log_dir) for s in args.schemes.split(",")]
    cols = ["scheme", "requests", "errors", "differs", "mixed", "tokens", "tokens_per_s",
            "peak_rss_before_load_mib", "peak_rss_mib", "rss_first_half_max_mib",
            "rss_second_half_max_mib"]  # fmt: skip
    print(f"{args.clients} streaming clients x {args.duration:.0f} s, max_tokens "
          f"{args.max_tokens}, model {Path(args.model).name}; logs in {log_dir}")  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    for r in rows:
        if "first_error" in r:
            print(f"{r['scheme']}: first error {r['first_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    bad = [r["scheme"] for r in rows if r["errors"] or r["mixed"]]
    if bad:
        raise SystemExit(f"errors or mixed-up responses with: {', '.join(bad)}")


if __name__ == "__main__":
    main()
