"""``make demo``: the main job end to end through the real server, on the embedded default.

1. Builds a model if the workdir has none: a synthetic corpus large enough that the walk
   matters, training (din), the HNSW index, the query defaults tuned to the corpus, the
   SavedModel export, the feature snapshot, and the default query measured against
   exhaustive search.
2. Starts ``python -m server`` on a free loopback port (embedded store, in-process model),
   waits for health SERVING, calls Retrieve for a few users with the client and prints
   candidates, items scored and latency.
3. Adds a behaviour to one user's history and shows the answer change.
4. Stops the server with SIGTERM.

No external service is needed. TensorFlow's start-up noise (CUDA probing, oneDNN banners)
is filtered from the output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

NOISE = re.compile(
    r"absl::InitializeLog|cudart_stub|cuda_platform|cuInit|cuda_dnn|cuda_fft|cuda_blas|"
    r"oneDNN custom operations|"
    r"computation placer|TF_ENABLE_ONEDNN_OPTS|rebuild TensorFlow with the appropriate compiler flags|"
    r"This TensorFlow binary is optimized|unsupported characters which will be renamed|"
    r"Assets written to|Unable to register|^E0000|^I0000|^W0000"
)


def run(*args: str, env: dict) -> str:
    """Runs a step, printing its output without TensorFlow's noise; returns stdout."""
    print(f"\n$ python {' '.join(args)}", flush=True)
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not NOISE.search(line):
            print("  " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"step failed with exit code {proc.returncode}: python {' '.join(args)}")
    return "".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: Path, items: int, users: int, env: dict) -> Path:
    work = root / "work"
    csv = root / "interactions.csv"
    if not csv.is_file():
        run(
            "-m",
            "model_export",
            "synthesize",
            "--items",
            str(items),
            "--users",
            str(users),
            "--mean-length",
            "30",
            "--out",
            str(csv),
            env=env,
        )
    if not (work / "model" / "meta.json").is_file():
        run(
            "-m",
            "model_export",
            "train",
            "--interactions",
            str(csv),
            "--workdir",
            str(work),
            "--epochs",
            "1",
            "--examples-per-epoch",
            "40000",
            "--restart",
            env=env,
        )
    if not (work / "index" / "meta.json").is_file():
        run("-m", "index_builder", "--workdir", str(work), env=env)
    if not any((work / "export").glob("[0-9]*")):
        # The query defaults tuned to this corpus (coverage@200 0.99 on validation users), then
        # the export that takes them, measured on test users against exhaustive search.
        run("-m", "model_export", "tune", "--workdir", str(work), env=env)
        run("-m", "model_export", "export", "--workdir", str(work), env=env)
        run(
            "-m",
            "model_export",
            "evaluate",
            "--workdir",
            str(work),
            "--mode",
            "default",  # the export's default query
            "--users",
            "200",
            "--json",
            env=env,
        )
    if not (work / "features" / "meta.json").is_file():
        run("-m", "model_export", "features", "--workdir", str(work), env=env)
    return work


def client(target: str, *args: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "server.client", "--target", target, "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if out.returncode != 0:
        raise SystemExit(f"client failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def show(title: str, answer: dict, rows: int = 5) -> None:
    md = answer["metadata"]
    print(
        f"\n{title}: {len(answer['candidates'])} candidates in {answer['last_ms']:.1f} ms through gRPC "
        f"(first chunk {answer['first_ms']:.1f} ms); items scored {md['nann-items-scored']}, "
        f"model version {md['nann-model-version']}"
    )
    print(f"  {'rank':>4} {'item_id':>10} {'score':>9}")
    for c in answer["candidates"][:rows]:
        print(f"  {c['rank']:>4} {c['item_id']:>10} {c['score']:>9.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=Path("runs/demo"), help="demo directory (default runs/demo)"
    )
    parser.add_argument("--items", type=int, default=50000, help="synthetic corpus size (default 50000)")
    parser.add_argument("--users", type=int, default=10000, help="synthetic users (default 10000)")
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="build the model (step 1) if missing and stop: docker-compose's init service",
    )
    args = parser.parse_args(argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    work = build(args.root, args.items, args.users, env)
    if args.build_only:
        took = time.monotonic() - started
        print(f"model ready: {work / 'export'} (features: {work / 'features'}), {took:.0f} s")
        return 0

    import numpy as np

    meta = json.loads(
        max((work / "export").glob("[0-9]*"), key=lambda p: int(p.name)).joinpath("meta.json").read_text()
    )["serving"]
    port = free_port()
    target = f"127.0.0.1:{port}"
    print(
        f"\n$ python -m server --model {work / 'export'} --port {port} --metrics-port -1   (embedded store)"
    )
    log = open(args.root / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            str(work / "export"),
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        from server.client import wait_serving

        if not wait_serving(target, 300, alive=lambda: server.poll() is None):
            print((args.root / "server.log").read_text()[-3000:])
            raise SystemExit("the server did not reach SERVING; its log is above")
        print(
            f"  health: SERVING ({meta['num_items']} items, start layer {meta['start_layer']}, "
            f"defaults k={meta['defaults']['k']} ef={meta['defaults']['ef']} T={meta['defaults']['steps']})"
        )

        users = np.load(work / "features" / "users.npy")
        offsets = np.load(work / "features" / "offsets.npy")
        items = np.load(work / "features" / "items.npy")
        rng = np.random.default_rng(0)
        picks = rng.choice(len(users), 3, replace=False)
        for i in picks:
            answer = client(target, "--user", str(users[i]), "--show", "0", env=env)
            scored = int(answer["metadata"]["nann-items-scored"])
            show(
                f"user {users[i]} ({offsets[i + 1] - offsets[i]} behaviours; "
                f"{scored / meta['num_items']:.1%} of the corpus scored)",
                answer,
            )

        i = picks[0]
        history = items[offsets[i] : offsets[i + 1]].tolist()
        before = client(target, "--history", ",".join(map(str, history)), "--show", "0", env=env)
        other = items[offsets[picks[1]] : offsets[picks[1] + 1]][-3:].tolist()
        after = client(target, "--history", ",".join(map(str, history + other)), "--show", "0", env=env)
        ids_before = [c["item_id"] for c in before["candidates"]]
        ids_after = [c["item_id"] for c in after["candidates"]]
        changed = len(set(ids_after) - set(ids_before))
        show(
            f"user {users[i]} after 3 new behaviours {other} (inline history, as the Redis store's "
            "`python -m server.features append` delivers them)",
            after,
        )
        print(f"  {changed} of {len(ids_after)} candidates changed")
    finally:
        server.terminate()
        code = server.wait(60)
        log.close()
        print(f"\nserver stopped (SIGTERM, exit code {code}); its log: {args.root / 'server.log'}")
    print(f"demo done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
