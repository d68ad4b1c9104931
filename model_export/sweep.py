"""Figure-3-style sweep: coverage and recall against the share of the corpus scored, beam vs hnsw.

Runs the exported SavedModel over a grid of layer-0 beam widths (and rounds
T_0 for beam), measures each setting against the cached exhaustive top-k, and
writes ``sweep.csv``, ``sweep.json`` and ``sweep.png`` into the output folder.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from model_export.evaluate import Evaluation
from nann_common.errors import InputError

logger = logging.getLogger(__name__)

BEAM_EF0 = (200, 300, 400, 600, 800)
BEAM_T0 = (1, 2, 3, 5)
HNSW_EF0 = (200, 300, 400, 600, 800, 1200, 1600)
FIELDS = (
    "mode",
    "ef",
    "steps",
    "scored_fraction",
    "scored_per_user",
    "coverage",
    "recall_retrieval",
    "recall_all",
    "recall_delta",
    "users",
    "k",
    "items",
    "seconds",
)


def settings(
    defaults_ef,
    defaults_steps,
    k: int,
    num_items: int,
    beam_ef0=BEAM_EF0,
    beam_t0=BEAM_T0,
    hnsw_ef0=HNSW_EF0,
    beam_upper=None,
):
    """(mode, ef, steps) of the sweep.

    Beam combines every upper-layer setting (top-down ef above layer 0; default the
    export's) with every ef_0 and T_0; the upper layers' T stay the export's. HNSW
    varies ef_0 only (it searches the upper layers with ef 1).

    Raises:
      InputError: an upper-layer setting does not have one value per layer above 0.
    """
    upper_ef, upper_steps = tuple(defaults_ef[:-1]), tuple(defaults_steps[:-1])
    uppers = [tuple(u) for u in beam_upper] if beam_upper else [upper_ef]
    for upper in uppers:
        if len(upper) != len(upper_ef):
            raise InputError(
                f"--beam-upper settings need {len(upper_ef)} values (the layers above 0, top-down), "
                f"got {'/'.join(map(str, upper))}"
            )
    out = []
    for upper in uppers:
        for ef0 in beam_ef0:
            for t0 in beam_t0:
                if k <= ef0 <= num_items:
                    out.append(("beam", (*upper, ef0), (*upper_steps, t0)))
    for ef0 in hnsw_ef0:
        if k <= ef0 <= num_items:
            out.append(("hnsw", (*upper_ef, ef0), tuple(defaults_steps)))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("beam", "o-"), ("hnsw", "s--")):
        points = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["scored_fraction"])
        if mode == "beam":  # the upper envelope: best coverage reached at each cost
            best, envelope = -1.0, []
            for r in points:
                if r["coverage"] > best:
                    best = r["coverage"]
                    envelope.append(r)
            points = envelope
        label = "NANN beam-retrieval" if mode == "beam" else "HNSW-retrieval (SL2G)"
        x = [100 * r["scored_fraction"] for r in points]
        axes[0].plot(x, [100 * r["coverage"] for r in points], style, label=label)
        axes[1].plot(x, [100 * r["recall_retrieval"] for r in points], style, label=label)
    if rows:
        axes[1].axhline(
            100 * rows[0]["recall_all"], color="gray", lw=1, ls=":", label="exhaustive (recall-all)"
        )
    for ax, name in zip(axes, ("coverage@k (%)", "recall@k (%)"), strict=True):
        ax.set_xlabel("% of corpus scored per query")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(
    workdir: str | Path,
    out: str | Path | None = None,
    users: int = 0,
    k: int = 200,
    split: str = "test",
    seed: int = 0,
    beam_ef0: tuple[int, ...] | None = None,
    beam_t0: tuple[int, ...] | None = None,
    hnsw_ef0: tuple[int, ...] | None = None,
    beam_upper: tuple[tuple[int, ...], ...] | None = None,
) -> list[dict]:
    """Runs the grid (the module's defaults where a grid is None) and writes CSV, JSON and PNG."""
    evaluation = Evaluation(workdir, split, users, seed)
    params = evaluation.read_export_meta()["params"]
    grid = settings(
        params["ef"],
        params["steps"],
        k,
        evaluation.dataset.num_items,
        beam_ef0 or BEAM_EF0,
        beam_t0 or BEAM_T0,
        hnsw_ef0 or HNSW_EF0,
        beam_upper,
    )
    if not grid:
        raise InputError(
            f"no grid point has k <= ef_0 <= items ({k} <= ef_0 <= {evaluation.dataset.num_items})"
        )
    out = Path(out) if out else Path(workdir) / "eval" / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    evaluation.reference(k)
    rows = []
    for mode, ef, steps in grid:
        result = evaluation.metrics(mode, k, ef, steps, progress=False)
        rows.append(result)
        logger.info(
            "%s ef=%s T=%s: %.2f%% scored, coverage %.4f, recall %.4f",
            mode,
            ef,
            steps,
            100 * result["scored_fraction"],
            result["coverage"],
            result["recall_retrieval"],
        )
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "ef": "/".join(map(str, r["ef"])), "steps": "/".join(map(str, r["steps"]))})
    (out / "sweep.json").write_text(json.dumps({"export": params, "rows": rows}, indent=2) + "\n")
    title = (
        f"{evaluation.model.config.arch}, fgsm eps {evaluation.train_meta['params']['fgsm_eps']:g}: "
        f"{evaluation.dataset.num_items:,} items, {evaluation.num_users} users, k={k}"
    )
    plot(rows, out / "sweep.png", title)
    logger.info("wrote %s/sweep.{csv,json,png}", out)
    return rows
