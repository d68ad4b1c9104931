"""What every benchmark script shares: its command line, the result header, ports, TensorFlow.

A script is run from the project root as ``python -m benchmarks.NAME ...`` and imports this
module normally (``from benchmarks import harness``). Its JSON result starts with
:func:`result_header` (the command, the time, the commit and the machine's facts, among them a
float32 matmul peak) and is written with :func:`write_result`. This module imports only the
standard library at import time, so a script's ``--help`` stays fast and a child process that
measures its own memory (``load_scale``) can use it; TensorFlow comes from
:func:`import_tensorflow`, inside a script's ``main``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# CPU features that decide which kernels TensorFlow, oneDNN and XLA pick (/proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def module_name(script: str | os.PathLike) -> str:
    """``benchmarks.NAME`` of a script given its ``__file__``."""
    return f"benchmarks.{Path(script).stem}"


def parser(doc: str | None, script: str | os.PathLike) -> argparse.ArgumentParser:
    """The argument parser of a script: usage ``python -m benchmarks.NAME``, the module docstring
    (line breaks kept) as the description."""
    return argparse.ArgumentParser(
        prog=f"python -m {module_name(script)}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def command(script: str | os.PathLike, argv: list[str] | None = None) -> str:
    """The command line that ran a script, as its result records it (``argv`` None: this process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module_name(script), *args])


def ints(text: str) -> tuple[int, ...]:
    """``"100,200,400"`` -> ``(100, 200, 400)``; ``""`` -> ``()``. An argparse ``type``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats(text: str) -> tuple[float, ...]:
    """``"0.5,0.1"`` -> ``(0.5, 0.1)``. An argparse ``type``."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_bytes() -> int:
    """This process's peak resident memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peak_rss_mib() -> float:
    return round(peak_rss_bytes() / 2**20, 1)


def import_tensorflow():
    """TensorFlow, with its C++ log quiet (unless ``TF_CPP_MIN_LOG_LEVEL`` is set) and XLA's CPU
    settings as the server's (:mod:`nann_common.xla`). Call it before anything that imports
    TensorFlow (``model_export``): both settings must precede the import or the first compile."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from nann_common.xla import configure

    configure()
    import tensorflow as tf

    return tf


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """float32 n x n matmul throughput in TensorFlow on this machine (the best of ``repeats``)."""
    tf = import_tensorflow()
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    tf.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def matmul_peak_in_child(n: int = 2048, repeats: int = 10) -> float | None:
    """:func:`matmul_peak_gflops` measured in a fresh process (this one's memory, threads and
    TensorFlow settings stay untouched); None if it fails."""
    probe = f"from benchmarks import harness; print(harness.matmul_peak_gflops({n:d}, {repeats:d}))"
    try:
        out = run_python(
            ["-c", probe], echo=False, quiet=True, env={"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=600
        )
        return float(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(matmul_peak: float | None = None) -> dict:
    """CPU model, its kernel-relevant features, cores, memory, TensorFlow, ``XLA_FLAGS``,
    ``TF_ENABLE_ONEDNN_OPTS`` (oneDNN kernels are on by default on CPUs with AVX512_VNNI and newer;
    "0" turns them off) and the float32 2048x2048 matmul peak (``matmul_peak`` if the script
    measured it in its own setting, else measured now in a child process)."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    peak = matmul_peak if matmul_peak is not None else matmul_peak_in_child()
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in ISA_FLAGS if f in flags],
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "numpy": _version("numpy"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        "matmul_peak_gflops": None if peak is None else round(peak, 1),
    }


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit() -> dict:
    """The checked-out commit and whether tracked files differ from it (None outside a checkout)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or None, "git_dirty": None if status is None else bool(status)}


HEADER_KEYS = ("command", "date_utc", "git_commit", "git_dirty", "machine")


def result_header(
    script: str | os.PathLike, argv: list[str] | None = None, matmul_peak: float | None = None
) -> dict:
    """The keys every JSON result starts with (:data:`HEADER_KEYS`): the command, the UTC time,
    the commit and :func:`machine_facts`."""
    return {
        "command": command(script, argv),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **git_commit(),
        "machine": machine_facts(matmul_peak),
    }


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_result(path: str | os.PathLike, payload: dict, indent: int = 2) -> Path:
    """Writes ``payload`` as JSON to ``path`` atomically (a temporary file beside it, then a
    rename): a reader sees the old file or the whole new one. Creates the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=indent, default=_jsonable) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def run_python(
    args: list[str],
    echo: bool = True,
    quiet: bool = False,
    env: dict | None = None,
    timeout: float | None = None,
) -> str:
    """Runs ``python ARGS`` (this interpreter) from the project root with TensorFlow's C++ log
    quiet and returns its stdout; ``echo`` prints the command first, ``quiet`` drops its stderr.

    Raises:
      subprocess.CalledProcessError: it exited non-zero.
      subprocess.TimeoutExpired: it ran longer than ``timeout`` seconds.
    """
    if echo:
        print("+", shlex.join(["python", *args]), flush=True)
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        text=True,
        check=True,
        timeout=timeout,
    )
    return done.stdout


def export_meta(workdir: str | os.PathLike, version: int | None = None) -> dict:
    """meta.json of a workdir's export (``version`` None: the newest), unverified."""
    from nann_common import contract

    base = Path(workdir) / "export"
    found = contract.versions(base)
    if not found:
        raise SystemExit(f"{base} holds no export; run `python -m model_export export --workdir {workdir}`")
    return json.loads((base / str(version or found[-1]) / "meta.json").read_text())


def load_session(
    path: str | os.PathLike, intra_op_threads: int = 0, bf16: bool = False, signature: str | None = None
):
    """A SavedModel in a ``tf.compat.v1.Session``, as TF Serving's C++ loader holds it:
    ``(session, feeds, fetches)``, the signature's input and output tensors by name.

    ``intra_op_threads`` as TF Serving's --tensorflow_intra_op_parallelism (0: TensorFlow's choice;
    the first session of a process sets the intra-op pool for all of them); ``bf16`` turns on
    grappler's oneDNN bfloat16 rewrite (matmuls and their neighbours in bfloat16 where the CPU has
    the instructions); ``signature`` defaults to ``retrieve``.
    """
    tf = import_tensorflow()
    from nann_common import contract

    graph = tf.Graph()
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op_threads)
    if bf16:
        config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = 1  # ON
    session = tf.compat.v1.Session(graph=graph, config=config)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path))
    sig = meta_graph.signature_def[signature or contract.RETRIEVE_SIGNATURE]
    feeds = {name: graph.get_tensor_by_name(t.name) for name, t in sig.inputs.items()}
    fetches = {name: graph.get_tensor_by_name(t.name) for name, t in sig.outputs.items()}
    return session, feeds, fetches


def session_runner(
    path: str | os.PathLike, bf16: bool = False, intra_op_threads: int = 0, signature: str | None = None
):
    """``run(inputs) -> outputs`` (numpy by name) by ``Session.run`` of :func:`load_session`."""
    session, feeds, fetches = load_session(path, intra_op_threads, bf16, signature)

    def run(inputs: dict) -> dict:
        return session.run(fetches, {feeds[name]: value for name, value in inputs.items()})

    return run


def function_runner(path: str | os.PathLike, signature: str | None = None):
    """``run(inputs) -> outputs`` by a call of the signature's concrete function after
    ``tf.saved_model.load``, as a Python process embedding the model would."""
    tf = import_tensorflow()
    from nann_common import contract

    fn = tf.saved_model.load(str(path)).signatures[signature or contract.RETRIEVE_SIGNATURE]

    def run(inputs: dict) -> dict:
        out = fn(**{name: tf.constant(value) for name, value in inputs.items()})
        return {name: value.numpy() for name, value in out.items()}

    return run


class Server:
    """``python -m server`` on two free loopback ports (gRPC ``target``, ``metrics_port``) with its
    output in ``log``; a context manager that stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, model: str | os.PathLike, features: str, log: str | os.PathLike, args=(), env=None):
        from loadtest.stack import Process

        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "--model", str(model), "--features", features]
        cmd += ["--port", str(self.port), "--metrics-port", str(self.metrics_port), *args]
        self.process = Process("server", cmd, Path(log), {"TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})

    def alive(self) -> bool:
        return self.process.alive()

    def wait_serving(self, timeout: float) -> None:
        """Returns once the server reports SERVING; exits with its log's tail if it does not in time."""
        from server.client import wait_serving

        if not wait_serving(self.target, timeout, alive=self.alive):
            raise SystemExit(
                f"the server did not become SERVING (log: {self.process.log}):\n{self.process.tail()}"
            )

    def stop(self) -> int | None:
        return self.process.stop(timeout=60)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def coverage_stats(cover) -> dict:
    """Per-user coverage@k -> mean, its standard error, the lowest and the count below 0.9."""
    import numpy as np

    cover = np.asarray(cover, np.float64)
    sem = float(cover.std(ddof=1) / np.sqrt(len(cover))) if len(cover) > 1 else 0.0
    return {
        "coverage": round(float(cover.mean()), 4),
        "coverage_sem": round(sem, 4),
        "min_coverage": round(float(cover.min()), 4),
        "users_below_0.9": int((cover < 0.9).sum()),
    }
