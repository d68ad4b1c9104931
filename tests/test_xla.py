"""The XLA settings a process running an --xla export applies (nann_common.xla), and that this
TensorFlow's XLA honours them: its CPU compiler emits no YNNPACK call under them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from nann_common.xla import YNN_OFF, configure

# A jit-compiled matmul, as the scorer's.
COMPILE = """
import tensorflow as tf
f = tf.function(lambda a, b: tf.nn.relu(tf.matmul(a, b)), jit_compile=True)
assert float(tf.reduce_sum(f(tf.ones([64, 128]), tf.ones([128, 32])))) == 64 * 32 * 128
"""


@pytest.mark.parametrize(
    "before,after",
    [
        (None, YNN_OFF),
        ("", YNN_OFF),
        ("--xla_cpu_use_xnnpack=false", f"--xla_cpu_use_xnnpack=false {YNN_OFF}"),
        # an operator's own choice stays
        (
            "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
            "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
        ),
    ],
)
def test_configure_turns_ynn_fusions_off_unless_the_operator_chose(before, after):
    environ = {} if before is None else {"XLA_FLAGS": before}
    assert configure(environ) == after
    assert environ["XLA_FLAGS"] == after


# gdb stops at XLA's emitter of YNNPACK calls (its symbols only, to start fast) and reports the hits.
GDB_SCRIPT = """
set auto-solib-add off
set breakpoint pending on
catch load libtensorflow_cc
run
sharedlibrary libtensorflow_cc
break xla::cpu::ThunkEmitter::EmitYnnFusionThunk
delete 1
continue
info breakpoints
"""


def _ynnpack_emits(tmp_path, flags: str) -> tuple[int, bool]:
    """How often XLA's CPU compiler emitted a YNNPACK call while compiling COMPILE with ``flags``,
    and whether the program ran to its end (its result checked)."""
    (tmp_path / "compile.py").write_text(COMPILE)
    (tmp_path / "ynn.gdb").write_text(GDB_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": flags, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(
        [
            "gdb",
            "-q",
            "-batch",
            "-x",
            str(tmp_path / "ynn.gdb"),
            "--args",
            sys.executable,
            str(tmp_path / "compile.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout
    assert "<xla::cpu::ThunkEmitter::EmitYnnFusionThunk" in out, (
        f"gdb found no YNNPACK emitter:\n{out[-3000:]}"
    )
    hits = re.search(r"breakpoint already hit (\d+) time", out)
    return (int(hits.group(1)) if hits else 0), "exited normally" in out


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (.ci/run installs it)")
@pytest.mark.e2e
def test_xla_compiles_without_ynnpack_with_the_configured_flags(tmp_path):
    environ: dict[str, str] = {}
    configure(environ)
    off = tmp_path / "off"
    off.mkdir()
    assert _ynnpack_emits(off, environ["XLA_FLAGS"]) == (0, True)
    # The check can fail: without the setting this TensorFlow's XLA hands the dot to YNNPACK.
    on = tmp_path / "on"
    on.mkdir()
    assert _ynnpack_emits(on, "")[0] >= 1
