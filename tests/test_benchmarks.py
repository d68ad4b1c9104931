"""The benchmark scripts: every one answers ``python -m benchmarks.NAME --help``, imports without
TensorFlow and edits no ``sys.path``; and the cheap parts of their shared harness."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
# Every script in benchmarks/, so a new one is covered without touching this file.
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "harness"))
HELP_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int | None, str, str]]:
    """``--help`` of every script, all started at once and then awaited: (exit code, stdout, stderr)."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SCRIPTS
    }
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=HELP_TIMEOUT_S)
            out[name] = (proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            out[name] = (None, stdout, f"timed out after {HELP_TIMEOUT_S} s\n{stderr}")
    return out


def test_scripts_are_found():
    assert {"harness", "__init__"}.isdisjoint(SCRIPTS)
    assert {"serving_paths", "walk_replay", "fgsm_study"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(helps, name):
    code, stdout, stderr = helps[name]
    assert code == 0, stderr
    assert stdout.splitlines()[0].startswith(f"usage: python -m benchmarks.{name} "), stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_shape(name):
    """No sys.path edits; ``main(argv=None)`` and a ``__main__`` guard."""
    text = (ROOT / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in text
    assert 'if __name__ == "__main__":' in text
    module = importlib.import_module(f"benchmarks.{name}")
    assert inspect.signature(module.main).parameters["argv"].default is None


def test_importing_the_scripts_loads_no_tensorflow():
    """A script imports TensorFlow in ``main`` only, so importing it (or its --help) stays cheap."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {SCRIPTS!r}:\n"
        "    importlib.import_module('benchmarks.' + name)\n"
        "print(json.dumps(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HELP_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_free_port_is_bindable_on_loopback():
    port = harness.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()


def test_write_result_round_trips(tmp_path):
    path = tmp_path / "deeper" / "result.json"
    payload = {
        "a": 1,
        "rows": [{"x": 0.5}],
        "array": np.arange(3),
        "scalar": np.float32(2.5),
        "path": Path("p"),
    }
    assert harness.write_result(path, payload) == path
    assert json.loads(path.read_text()) == {
        "a": 1,
        "rows": [{"x": 0.5}],
        "array": [0, 1, 2],
        "scalar": 2.5,
        "path": "p",
    }
    assert path.read_text().endswith("}\n")
    assert os.listdir(path.parent) == ["result.json"]


def test_write_result_is_atomic(tmp_path):
    """A payload that fails half-way leaves the old file whole and no temporary file behind."""
    path = tmp_path / "result.json"
    harness.write_result(path, {"old": True})
    with pytest.raises(TypeError):
        harness.write_result(path, {"new": True, "bad": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["result.json"]
    harness.write_result(path, {"new": True})
    assert json.loads(path.read_text()) == {"new": True}
    assert os.listdir(tmp_path) == ["result.json"]


def test_result_header_holds_its_keys():
    header = harness.result_header("benchmarks/some_script.py", ["--out", "a b.json"], matmul_peak=123.45)
    assert tuple(header) == harness.HEADER_KEYS
    assert header["command"] == "python -m benchmarks.some_script --out 'a b.json'"
    assert dt.datetime.fromisoformat(header["date_utc"]).utcoffset() == dt.timedelta(0)
    assert header["git_commit"] is None or len(header["git_commit"]) == 40
    machine = header["machine"]
    assert set(machine) == {
        "cpu_model",
        "cpu_flags",
        "cpus",
        "cpus_usable",
        "memory_gib",
        "platform",
        "python",
        "tensorflow",
        "numpy",
        "xla_flags",
        "tf_enable_onednn_opts",
        "matmul_peak_gflops",
    }
    assert machine["cpus"] == os.cpu_count()
    assert machine["cpu_model"]
    assert machine["memory_gib"] > 0
    assert machine["matmul_peak_gflops"] == 123.5
    assert machine["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    json.dumps(header)


def test_matmul_peak_in_a_child_process():
    peak = harness.matmul_peak_in_child(n=256, repeats=2)
    assert peak is not None and peak > 0


def test_parser_and_ints():
    p = harness.parser("doc", "benchmarks/some_script.py")
    p.add_argument("--ef", type=harness.ints, default="100,200,400")
    assert p.format_usage().startswith("usage: python -m benchmarks.some_script ")
    assert p.parse_args([]).ef == (100, 200, 400)
    assert p.parse_args(["--ef", ""]).ef == ()
    with pytest.raises(argparse.ArgumentTypeError):
        harness.ints("1,x")


def test_export_meta_reads_the_newest_or_a_named_version(tmp_path):
    for version in (3, 12):
        (tmp_path / "export" / str(version)).mkdir(parents=True)
        (tmp_path / "export" / str(version) / "meta.json").write_text(json.dumps({"v": version}))
    assert harness.export_meta(tmp_path) == {"v": 12}
    assert harness.export_meta(tmp_path, 3) == {"v": 3}
    with pytest.raises(SystemExit, match="holds no export"):
        harness.export_meta(tmp_path / "nothing")


def test_run_python_returns_stdout(capsys):
    assert harness.run_python(["-c", "import os; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"]) == "2\n"
    assert capsys.readouterr().out.startswith("+ python -c ")
    with pytest.raises(subprocess.CalledProcessError):
        harness.run_python(["-c", "raise SystemExit(3)"], echo=False)


def test_coverage_stats():
    stats = harness.coverage_stats([1.0, 0.8, 0.9, 0.5])
    assert stats == {
        "coverage": 0.8,
        "coverage_sem": round(float(np.std([1.0, 0.8, 0.9, 0.5], ddof=1) / 2), 4),
        "min_coverage": 0.5,
        "users_below_0.9": 2,
    }
