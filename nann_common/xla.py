"""XLA's CPU compiler settings for a process that runs an ``--xla`` export.

TensorFlow 2.21's XLA hands every CPU dot to YNNPACK (``--xla_cpu_experimental_ynn_fusion_type``
defaults to ``individual_dot``). Two benchmark processes serving split XLA exports died of a
segfault inside XLA's YNNPACK emitter (``xla::cpu::EmitYnnSubgraph``), and the scorer ran as fast
with the fusion off, within run-to-run noise (docs/parameters.md, "Export: --score-split"). So a
process that runs an export turns it off, unless its operator set the flag in ``XLA_FLAGS``
already: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot`` brings it back.

XLA reads ``XLA_FLAGS`` once, at a process's first compile: call :func:`configure` before it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_OFF = f"{YNN_FUSION_FLAG}="


def configure(environ: MutableMapping[str, str] | None = None) -> str:
    """Adds :data:`YNN_OFF` to ``XLA_FLAGS`` unless it names the YNN fusion flag; returns the
    ``XLA_FLAGS`` now in effect (for the caller's start-up log)."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "").strip()
    if YNN_FUSION_FLAG not in flags:
        flags = f"{flags} {YNN_OFF}".strip()
        environ["XLA_FLAGS"] = flags
    return flags
