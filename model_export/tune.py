"""Query defaults tuned to the corpus: the cheapest walk that meets a coverage or latency target.

``python -m model_export tune --workdir DIR [--coverage 0.99 | --latency-ms X]`` replays candidate
queries (mode, history stride, ef and T per layer) with :mod:`walk.replay` over the exact scores
of validation users, measures each against their exhaustive top k, and picks the cheapest (fewest
items scored) whose coverage meets the target with a margin of two standard errors; with
``--latency-ms`` it picks the best coverage whose latency, measured through the latest export and
fitted to the items scored, stays within the budget. The choice is then checked on test users the
tuning never saw. It writes ``DIR/tune/`` (``query.json``, ``table.csv``, ``table.md``,
``tune.png`` and ``meta.json``); the next ``python -m model_export export`` takes ``query.json``
as its query defaults (flags given to export still win).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from nann_common import artifacts
from nann_common import graph as graph_lib
from nann_common.errors import ArtifactError, InputError

logger = logging.getLogger(__name__)

KIND = "tune"
TUNE_DIR = "tune"
QUERY_FILE = "query.json"
MODES = ("beam", "beam_history")
# The grid: ef of layer 0, ef of the start layer, T of layer 0, T of the layers between, and
# (mode, history stride): beam scores the whole start layer and walks every layer; beam_history
# scores every stride-th start node and adds the user's behaviours to layer 0's entry points.
EF0 = (200, 300, 400, 600)
START_EF = (50, 100, 200)
T0 = (3, 5, 8)
T_MIDDLE = (0, 1)
STARTS = (("beam", 1), ("beam_history", 1), ("beam_history", 2), ("beam_history", 4))
DEFAULT_COVERAGE = 0.99
MARGIN_SE = 2.0  # the validation mean must clear the target by this many standard errors


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One query: what an export's defaults hold (per-layer lists top-down)."""

    mode: str
    history_stride: int
    ef: tuple[int, ...]
    steps: tuple[int, ...]

    @property
    def label(self) -> str:
        start = "beam" if self.mode == "beam" else f"beam_history/{self.history_stride}"
        return f"{start} ef {','.join(map(str, self.ef))} T {','.join(map(str, self.steps))}"


def candidates(start_layer: int, k: int, layer_sizes, num_items: int) -> list[Candidate]:
    """Every grid query that fits the graph: ef of layer 0 >= k, and the start-layer rule
    (:func:`nann_common.graph.start_layer`) still picks ``start_layer`` for its ef."""
    found = []
    for mode, stride in STARTS:
        for start_ef in START_EF if start_layer else (None,):
            for ef0 in EF0:
                if ef0 < k or (start_ef is not None and start_ef > ef0):
                    continue
                for t0 in T0:
                    for t_mid in T_MIDDLE if start_layer > 1 else (None,):
                        if start_layer == 0:
                            ef, steps = (ef0,), (t0,)
                        else:
                            middle = start_layer - 1
                            ef = (start_ef, *(min(2 * start_ef, ef0),) * middle, ef0)
                            steps = (1, *(t_mid,) * middle, t0)
                        if graph_lib.start_layer(layer_sizes, num_items, ef) != start_layer:
                            continue
                        # With no layer above 0, beam_history starts from the behaviours alone
                        # whatever the stride: one candidate.
                        keep = mode == "beam_history" and start_layer > 0
                        found.append(Candidate(mode, stride if keep else 1, ef, steps))
    return list(dict.fromkeys(found))


def replay_candidate(graph, scores, histories, cand: Candidate, start_layer: int, k: int, reference):
    """(coverage per user, items scored per user) of one query over exact ``scores``."""
    from walk.replay import replay_user

    cover = np.empty(len(scores))
    scored = np.empty(len(scores), np.int64)
    nodes = graph.nodes[start_layer]
    for u in range(len(scores)):
        if cand.mode == "beam":
            top, n = replay_user(graph, scores[u], list(cand.ef), list(cand.steps), start_layer, k)
        else:
            top, n = replay_user(
                graph,
                scores[u],
                list(cand.ef),
                list(cand.steps),
                start_layer,
                k,
                start_nodes=nodes[:: cand.history_stride],
                seeds=histories[u],
            )
        cover[u] = len(np.intersect1d(top, reference[u])) / k
        scored[u] = n
    return cover, scored


def _summary(cover: np.ndarray, scored: np.ndarray) -> dict:
    return {
        "coverage": float(cover.mean()),
        "coverage_se": float(cover.std(ddof=1) / np.sqrt(len(cover))) if len(cover) > 1 else 0.0,
        "lowest": float(cover.min()),
        "below_0.9": int((cover < 0.9).sum()),
        "scored": float(scored.mean()),
    }


def _users(workdir: Path, split: str, users: int, seed: int):
    from model_export.evaluate import Evaluation
    from walk.replay import exact_scores

    evaluation = Evaluation(workdir, split, users=users, seed=seed)
    logger.info(
        "exact scores of %d %s users over %d items", evaluation.num_users, split, len(evaluation.item_e)
    )
    return evaluation, exact_scores(evaluation)


def tune(
    workdir: str | Path,
    coverage: float | None = DEFAULT_COVERAGE,
    latency_ms: float | None = None,
    users: int = 200,
    test_users: int = 200,
    k: int = 200,
    seed: int = 0,
) -> dict:
    """Tunes the query defaults of ``workdir`` and writes ``DIR/tune/``. Returns the report.

    Raises:
      InputError: a target out of range, or no candidate meets it (the message says what came
        closest).
      ArtifactError: the workdir lacks the model, embeddings or index (or, with
        ``latency_ms``, an export).
    """
    from walk.replay import exact_top_k

    workdir = Path(workdir)
    if (coverage is None) == (latency_ms is None):
        raise InputError("give one target: --coverage C (0 < C <= 1) or --latency-ms X")
    if coverage is not None and not 0 < coverage <= 1:
        raise InputError(f"--coverage must be in (0, 1], got {coverage}")
    if latency_ms is not None and latency_ms <= 0:
        raise InputError(f"--latency-ms must be > 0, got {latency_ms}")
    if users < 2 or test_users < 2:
        raise InputError(f"--users and --test-users must be >= 2, got {users} and {test_users}")
    if latency_ms is not None:
        # Timed as the server runs by default: one intra-op thread (set before TensorFlow starts).
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
    emb_meta = artifacts.read_meta(workdir / "embeddings", "embeddings")
    graph = graph_lib.load_graph(workdir / "index", embeddings_digest=artifacts.digest(emb_meta))
    sizes = [len(n) for n in graph.nodes]
    start = graph_lib.start_layer(sizes, graph.num_items, _default_ef())
    if k > graph.num_items:
        raise InputError(f"--k must be <= the corpus size {graph.num_items}, got {k}")
    grid = candidates(start, k, sizes, graph.num_items)
    if not grid:
        raise InputError(f"no grid query fits start layer {start} with k {k}; lower --k")

    started = time.monotonic()
    valid, valid_scores = _users(workdir, "valid", users, seed)
    reference = exact_top_k(valid_scores, k)
    rows = []
    for i, cand in enumerate(grid):
        cover, scored = replay_candidate(graph, valid_scores, valid.histories, cand, start, k, reference)
        rows.append({"candidate": cand, **_summary(cover, scored)})
        if (i + 1) % 24 == 0 or i + 1 == len(grid):
            logger.info("replayed %d/%d queries on %d validation users", i + 1, len(grid), valid.num_users)
    for row in rows:
        row["meets"] = row["coverage"] - MARGIN_SE * row["coverage_se"] >= (coverage or 0.0)
    timing = None
    if latency_ms is not None:
        timing = _fit_latency(workdir, rows, valid, start)
        for row in rows:
            row["latency_ms"] = timing["intercept_ms"] + timing["ms_per_item"] * row["scored"]
            row["meets"] = row["latency_ms"] <= latency_ms
    chosen = _choose(rows, coverage, latency_ms)

    test, test_scores = _users(workdir, "test", test_users, seed)
    test_cover, test_scored = replay_candidate(
        graph, test_scores, test.histories, chosen["candidate"], start, k, exact_top_k(test_scores, k)
    )
    held_out = _summary(test_cover, test_scored)
    builtin = _builtin(start)
    test_reference = exact_top_k(test_scores, k)
    b_cover, b_scored = replay_candidate(
        graph, test_scores, test.histories, builtin, start, k, test_reference
    )
    report = {
        "target": {"coverage": coverage} if coverage is not None else {"latency_ms": latency_ms},
        "k": k,
        "start_layer": start,
        "items": graph.num_items,
        "query": _query_dict(chosen["candidate"], k),
        "validation": _row_dict(chosen),
        "test": held_out,
        "test_meets_target": held_out["coverage"] >= coverage if coverage is not None else None,
        "builtin": {"query": builtin.label, **_summary(b_cover, b_scored)},
        "validation_users": valid.num_users,
        "test_users": test.num_users,
        "latency_fit": timing,
        "seconds": round(time.monotonic() - started, 1),
    }
    _write(workdir, report, rows, emb_meta, graph)
    return report


def _builtin(start: int) -> Candidate:
    """The export's built-in default query at this start layer, for comparison."""
    from model_export.export import ExportConfig, _params_for

    c = ExportConfig()
    stride = c.history_stride if start else 1
    return Candidate(c.mode, stride, _params_for(start, c.ef), _params_for(start, c.steps))


def _default_ef() -> tuple[int, ...]:
    from model_export.export import DEFAULT_EF

    return DEFAULT_EF


def _choose(rows: list[dict], coverage: float | None, latency_ms: float | None) -> dict:
    meeting = [r for r in rows if r["meets"]]
    if not meeting:
        if coverage is not None:
            best = max(rows, key=lambda r: r["coverage"])
            raise InputError(
                f"no query of the grid reaches coverage {coverage} (with a margin of {MARGIN_SE:g} "
                f"standard errors) on the validation users; the best is {best['candidate'].label} at "
                f"{best['coverage']:.4f}: lower --coverage, or rebuild the index with more start nodes"
            )
        fastest = min(rows, key=lambda r: r["latency_ms"])
        raise InputError(
            f"no query of the grid fits {latency_ms} ms; the fastest, {fastest['candidate'].label}, "
            f"is estimated at {fastest['latency_ms']:.1f} ms: raise --latency-ms"
        )
    if coverage is not None:  # the cheapest, then the better covered
        return min(meeting, key=lambda r: (r["scored"], -r["coverage"]))
    return max(meeting, key=lambda r: (r["coverage"], -r["scored"]))


def _fit_latency(workdir: Path, rows: list[dict], valid, start: int) -> dict:
    """Batch-1 latency of the latest export's XLA signature, measured for up to 8 grid queries it
    can run (its own history stride), fitted as intercept + ms per item scored."""
    import tensorflow as tf

    from model_export.export import latest_export
    from nann_common import contract as contract_lib
    from nann_common import xla

    xla.configure()
    path = latest_export(workdir)
    served = contract_lib.load_contract(path)
    meta = artifacts.read_meta(path, contract_lib.KIND, verify=False)
    if served.start_layer != start:
        raise ArtifactError(
            f"{path} starts at layer {served.start_layer}, the tuning at {start}: re-export first"
        )
    stride = int(meta["params"].get("history_stride", 2))
    runnable = [r for r in rows if r["candidate"].mode == "beam" or r["candidate"].history_stride == stride]
    runnable.sort(key=lambda r: r["scored"])
    picks = [runnable[int(i)] for i in np.unique(np.linspace(0, len(runnable) - 1, 8).round())]
    model = tf.saved_model.load(str(path))
    ids = served.item_ids()  # read once: every timed call maps its user's history through it
    name = contract_lib.XLA_SIGNATURE if served.has_xla_signature else contract_lib.RETRIEVE_SIGNATURE
    fn = model.signatures[name]
    if served.has_xla_signature:  # compile every shape first: the timings are of warm calls
        model.signatures[contract_lib.XLA_WARMUP_SIGNATURE](history=tf.constant(_history(valid, 0, ids)))
    points = []
    for row in picks:
        cand = row["candidate"]
        query = contract_lib.Query(served.default_k, cand.ef, cand.steps, cand.mode)
        times = []
        for u in range(min(valid.num_users, 60)):
            inputs = served.inputs(_history(valid, u, ids), query)
            t = time.perf_counter()
            fn(**{key: tf.constant(v) for key, v in inputs.items()})
            times.append(time.perf_counter() - t)
        points.append((row["scored"], 1000 * float(np.median(times[5:]))))
        row["measured_ms"] = points[-1][1]
        logger.info(
            "%s: %.1f ms p50 at batch 1 (%.0f items scored)", cand.label, points[-1][1], row["scored"]
        )
    x, y = np.array(points).T
    slope, intercept = np.polyfit(x, y, 1) if len(points) > 1 else (0.0, y[0])
    return {
        "export": path.name,
        "signature": name,
        "intercept_ms": float(intercept),
        "ms_per_item": float(slope),
        "points": [{"scored": a, "p50_ms": b} for a, b in points],
    }


def _history(evaluation, u: int, item_ids: np.ndarray) -> np.ndarray:
    """User ``u``'s behaviours as the export takes them: original ids [1, L]."""
    h = evaluation.histories[u]
    return item_ids[h[h >= 0]][None].astype(np.int64)


def _query_dict(cand: Candidate, k: int) -> dict:
    return {
        "mode": cand.mode,
        "history_stride": cand.history_stride,
        "k": k,
        "ef": list(cand.ef),
        "steps": list(cand.steps),
    }


def _row_dict(row: dict) -> dict:
    out = {key: value for key, value in row.items() if key != "candidate"}
    return {"query": row["candidate"].label, **out}


def _write(workdir: Path, report: dict, rows: list[dict], emb_meta: dict, graph) -> Path:
    final = workdir / TUNE_DIR
    with artifacts.atomic_dir(final) as tmp:
        (tmp / QUERY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        table = [_row_dict(r) for r in sorted(rows, key=lambda r: r["scored"])]
        fields = list(dict.fromkeys(key for row in table for key in row))
        with open(tmp / "table.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
        lines = [
            f"# Tuned query: {report['query']['mode']} stride {report['query']['history_stride']}, "
            f"ef {report['query']['ef']}, T {report['query']['steps']}",
            "",
            f"Target {report['target']}; {report['validation_users']} validation users chose it, "
            f"{report['test_users']} test users checked it: coverage@{report['k']} "
            f"{report['validation']['coverage']:.4f} (validation) / {report['test']['coverage']:.4f} (test) "
            f"at {report['test']['scored']:.0f} items scored. The built-in default query "
            f"({report['builtin']['query']}) on the same test users: {report['builtin']['coverage']:.4f} "
            f"at {report['builtin']['scored']:.0f} items scored.",
            "",
            "| query | coverage (lowest) | items scored | meets |",
            "|---|---|---|---|",
            *(
                f"| {r['query']} | {r['coverage']:.4f} ({r['lowest']:.3f}) | {r['scored']:.0f} | "
                f"{'yes' if r['meets'] else ''} |"
                for r in table
            ),
        ]
        (tmp / "table.md").write_text("\n".join(lines) + "\n")
        _plot(rows, report, tmp / "tune.png")
        meta = artifacts.provenance(
            KIND,
            {"target": report["target"], "k": report["k"], "query": report["query"]},
            inputs={"embeddings": artifacts.digest(emb_meta), "index": artifacts.digest(graph.meta)},
        )
        artifacts.write_meta(tmp, meta)
    logger.info("wrote %s", final)
    return final


def _plot(rows: list[dict], report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, stride in STARTS:
        pts = [r for r in rows if (r["candidate"].mode, r["candidate"].history_stride) == (mode, stride)]
        if pts:
            every = {1: "every", 2: "every 2nd", 4: "every 4th"}.get(stride, f"every {stride}th")
            label = "beam" if mode == "beam" else f"beam_history, {every} start node"
            ax.scatter([r["scored"] for r in pts], [r["coverage"] for r in pts], s=14, label=label)
    ax.scatter(
        [report["validation"]["scored"]],
        [report["validation"]["coverage"]],
        s=120,
        facecolors="none",
        edgecolors="black",
        label="chosen (validation)",
    )
    ax.scatter(
        [report["test"]["scored"]],
        [report["test"]["coverage"]],
        marker="x",
        color="black",
        label="chosen, on test users",
    )
    if "coverage" in report["target"]:
        ax.axhline(report["target"]["coverage"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("items scored per user")
    ax.set_ylabel(f"coverage@{report['k']}")
    ax.set_title(f"tune: {report['items']:,} items, {report['validation_users']} validation users")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_tuned(workdir: str | Path, index_meta: dict) -> dict | None:
    """The query ``tune`` chose for this workdir's index, or None when it was never tuned.

    Raises:
      ArtifactError: ``DIR/tune`` is damaged or was measured on another index.
    """
    path = Path(workdir) / TUNE_DIR
    if not (path / artifacts.META_FILE).exists():
        return None
    meta = artifacts.read_meta(path, KIND)
    if meta["inputs"].get("index") != artifacts.digest(index_meta):
        raise ArtifactError(
            f"{path} was tuned on another index; re-run `python -m model_export tune --workdir "
            f"{workdir}`, or delete {path} to export with the built-in defaults"
        )
    return json.loads((path / QUERY_FILE).read_text())["query"]
