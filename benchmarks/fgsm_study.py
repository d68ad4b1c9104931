"""The adversarial task's effect: the paper's Fig. 6, Fig. 7a and Table 3 on one corpus.

Trains the models a corpus needs (each its own ``python -m model_export train`` process, skipped
when its workdir already holds a model), builds two graphs per model with ``python -m
index_builder`` (hnswlib as built, ``index_hnswlib/``, and the default refined graph,
``index/``), then analyses every model on the same evaluated users:

- exhaustive top-k from every item's score (recall-all@k);
- Beam-retrieval replayed over those scores (``walk.replay``, checked against the
  SavedModel by the tests) on both graphs, at the paper's query (ef 100,200,400, T 1,1,3) and at a
  hard one (T 1,1,1), where coverage has room to move (recall-retrieval, recall-delta, coverage);
- Fig. 6: |s_u(e_v) - s_u(e_v + delta)|, delta = eps * U(-1, 1) per coordinate, for v in each
  user's exhaustive top-k, at a probe eps shared by every model;
- the scale the perturbation acts on: e_v's RMS coordinate and the l2 length of layer-0 edges.

Every figure comes with its standard error over users (recall-delta's by bootstrap). Writes
``benchmarks/results/fgsm_<name>.{json,md}`` and ``fgsm_<name>_fig6.png``, ``fgsm_<name>_fig7a.png``.

    python -m benchmarks.fgsm_study --name synthetic --interactions runs/fgsm/synA.csv \\
        --root runs/fgsm/synA --train-args="--epochs 1 --examples-per-epoch 150000"
    python -m benchmarks.fgsm_study --name movielens --interactions DATA/movielens-small \\
        --root runs/fgsm/ml --train-args="--format movielens --epochs 2" --runs table3 sweep-coarse \\
        --splits test valid --users 0

``--runs`` picks the model sets: ``table3`` (three architectures with and without FGSM, din
twice more with another seed), ``sweep`` (din over the eps of Fig. 7a; ``sweep-coarse``: 0,
3e-4, 1e-2, 1e-1), ``weight`` (din with L_AUX weighted 30 and 300 at eps 1e-2), ``direction``
(din with delta's sign from the NCE loss's gradient, FGSM as Goodfellow et al., at eps 1e-2 and
1e-1), ``seeds`` (more trainings of din at eps 0, 3e-2 and 1e-1: the spread between trainings of
one setting; ``seeds-coarse``: eps 0 and 1e-2). The commands behind the committed reports are in
benchmarks/results/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

PAPER_EPS = 3e-4  # the paper's eps for UserBehavior
SWEEP_EPS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
RUN_SETS = {
    # (arch, eps, L_AUX weight, seed, sign of delta from the gradient of: score (eq. 6) or loss)
    "table3": [(a, e, 1.0, 0, "score") for a in ("din", "dnn", "two_sided") for e in (0.0, PAPER_EPS)]
    + [("din", 0.0, 1.0, 1, "score"), ("din", PAPER_EPS, 1.0, 1, "score")],
    "sweep": [("din", e, 1.0, 0, "score") for e in SWEEP_EPS],
    "sweep-coarse": [("din", e, 1.0, 0, "score") for e in (0.0, PAPER_EPS, 1e-2, 1e-1)],
    "weight": [("din", 1e-2, 30.0, 0, "score"), ("din", 1e-2, 300.0, 0, "score")],
    "direction": [("din", 1e-2, 1.0, 0, "loss"), ("din", 1e-1, 1.0, 0, "loss")],
    "seeds": [("din", 0.0, 1.0, 2, "score"), ("din", 3e-2, 1.0, 1, "score"), ("din", 1e-1, 1.0, 1, "score")],
    "seeds-coarse": [("din", 0.0, 1.0, 2, "score"), ("din", 1e-2, 1.0, 1, "score")],
}
QUERIES = {
    # label -> (graph folder, ef top-down, T top-down)
    "hnswlib, paper query": ("index_hnswlib", (100, 200, 400), (1, 1, 3)),
    "hnswlib, T 1,1,1": ("index_hnswlib", (100, 200, 400), (1, 1, 1)),
    "refined, paper query": ("index", (100, 200, 400), (1, 1, 3)),
    "refined, T 1,1,1": ("index", (100, 200, 400), (1, 1, 1)),
}
RAW_GRAPH = ["--layer0-degree", "0", "--layer0-in-degree", "0", "--start-nodes", "0"]


def run_name(arch: str, eps: float, weight: float, seed: int, direction: str) -> str:
    name = f"{arch}-eps{eps:g}"
    if weight != 1.0:
        name += f"-w{weight:g}"
    if direction != "score":
        name += f"-{direction}"
    return name + (f"-seed{seed}" if seed else "")


def train_and_index(workdir: Path, interactions: str, train_args: list[str], spec) -> dict:
    """Trains one model and builds its two graphs unless they exist; returns the seconds each took."""
    arch, eps, weight, seed, direction = spec
    seconds = {}
    if not (workdir / "model" / "meta.json").is_file():
        started = time.perf_counter()
        harness.run_python(
            ["-m", "model_export", "train", "--interactions", interactions, "--workdir", str(workdir)]
            + ["--arch", arch, "--fgsm-eps", str(eps), "--fgsm-weight", str(weight), "--seed", str(seed)]
            + ["--fgsm-direction", direction]
            + train_args
            + ["--restart"]
        )
        seconds["train"] = round(time.perf_counter() - started, 1)
        for folder in ("index_hnswlib", "index"):
            shutil.rmtree(workdir / folder, ignore_errors=True)
    if not (workdir / "index_hnswlib" / "meta.json").is_file():
        harness.run_python(["-m", "index_builder", "--workdir", str(workdir), "--threads", "1", *RAW_GRAPH])
        os.replace(workdir / "index", workdir / "index_hnswlib")
    if not (workdir / "index" / "meta.json").is_file():
        harness.run_python(["-m", "index_builder", "--workdir", str(workdir), "--threads", "1"])
    return seconds


def all_scores(model, item_e: np.ndarray, histories: np.ndarray, batch: int = 8) -> np.ndarray:
    """float32 [users, N]: every item's score for each history."""
    import tensorflow as tf

    out = np.empty((len(histories), len(item_e)), np.float32)
    items = tf.constant(item_e)

    @tf.function(reduce_retracing=True)
    def score(history):
        hist_e, mask = model.behaviour_embeddings(history)
        state = model.user_state(hist_e, mask)
        return model.score(state, tf.tile(items[None], [tf.shape(history)[0], 1, 1]))

    for start in range(0, len(histories), batch):
        out[start : start + batch] = score(tf.constant(histories[start : start + batch], tf.int32)).numpy()
    return out


def perturbation_gaps(model, item_e, histories, top, eps: float, seed: int = 0) -> np.ndarray:
    """|s_u(e_v) - s_u(e_v + eps * U(-1, 1))| for every user's ``top`` items: float32 [users, k]."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out = np.empty(top.shape, np.float32)
    for start in range(0, len(histories), 64):
        h = tf.constant(histories[start : start + 64], tf.int32)
        hist_e, mask = model.behaviour_embeddings(h)
        state = model.user_state(hist_e, mask)
        cand = item_e[top[start : start + 64]]
        delta = (eps * rng.uniform(-1.0, 1.0, cand.shape)).astype(np.float32)
        clean = model.score(state, tf.constant(cand)).numpy()
        moved = model.score(state, tf.constant(cand + delta)).numpy()
        out[start : start + 64] = np.abs(clean - moved)
    return out


def aux_scale(model, dataset, item_e, eps_values=(3e-4, 1e-2, 1e-1), batch: int = 128, seed: int = 0) -> dict:
    """L_AUX and the score shift it sees, on one training-like batch, per eps and sign direction.

    A validation batch with the training's noise: 199 labels drawn by popularity, log-Q corrected.
    Eq. 6's delta raises every label's score by about eps * |grad|_1; the softmax of eq. 5 ignores
    a shift shared by all labels, so L_AUX sees only the shift's spread across labels.
    """
    import tensorflow as tf

    from model_export import losses
    from model_export.train import noise_distribution

    rng = np.random.default_rng(seed)
    _, hist, targets = dataset.eval_examples("valid", 50)
    pick = rng.choice(len(targets), min(batch, len(targets)), replace=False)
    q = noise_distribution(dataset)
    q = q / q.sum()
    neg_ids = rng.choice(len(q), 199, p=q)
    log_q = np.log(q).astype(np.float32)
    b = len(pick)
    log_q = tf.constant(np.concatenate([log_q[targets[pick]][:, None], np.tile(log_q[neg_ids], (b, 1))], 1))
    pos, neg = tf.constant(targets[pick], tf.int32), tf.constant(neg_ids, tf.int32)
    hist_e, mask = model.behaviour_embeddings(tf.constant(hist[pick], tf.int32))
    state = model.user_state(hist_e, mask)
    e = tf.constant(item_e)
    cand = tf.concat([tf.gather(e, pos)[:, None], tf.tile(tf.gather(e, neg)[None], [b, 1, 1])], 1)

    def nce(scores):
        return losses.sampled_softmax_loss(losses.corrected_logits(scores, log_q, pos, neg))

    out = {}
    for eps in eps_values:
        for direction, objective in (("score", None), ("loss", nce)):
            clean, delta = losses.scores_and_fgsm_delta(lambda c: model.score(state, c), cand, eps, objective)
            moved = model.score(state, cand + delta)
            shift = (moved - clean).numpy()
            aux = losses.aux_kl_loss(
                losses.corrected_logits(clean, log_q, pos, neg),
                losses.corrected_logits(moved, log_q, pos, neg),
            )
            out[f"{eps:g}/{direction}"] = {
                "l_aux": float(aux),
                "shift_mean": float(shift.mean()),
                "shift_sd_across_labels": float(shift.std(axis=1).mean()),
                "positive_shift_mean": float(shift[:, 0].mean()),
            }
    return out


def mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def recall_delta_se(hit_all: np.ndarray, hit_ret: np.ndarray, draws: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error over users of (recall-all - recall-retrieval) / recall-all."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(hit_all), (draws, len(hit_all)))
    ra, rr = hit_all[idx].mean(1), hit_ret[idx].mean(1)
    ok = ra > 0
    return float(np.std((ra[ok] - rr[ok]) / ra[ok], ddof=1))


def analyse(workdir: Path, splits: list[str], users: int, k: int, probe_eps: float) -> tuple[dict, dict]:
    """Every metric of one model: (summary dict, per-user arrays)."""
    from model_export.evaluate import Evaluation, recall_at_k
    from nann_common import artifacts
    from nann_common.graph import load_graph
    from nann_common.graph import start_layer as default_start_layer
    from walk.replay import exact_top_k, replay_user

    histories, targets = [], []
    for split in splits:
        ev = Evaluation(workdir, split=split, users=users)
        histories.append(ev.histories)
        targets.append(ev.targets)
    histories, targets = np.concatenate(histories), np.concatenate(targets)
    model, item_e = ev.model, ev.item_e
    meta = artifacts.read_meta(workdir / "model", "model", verify=False)
    started = time.perf_counter()
    scores = all_scores(model, item_e, histories)
    reference = exact_top_k(scores, k)
    hit_all = recall_at_k(reference, targets)
    dataset = ev.dataset
    popular = np.argsort(-dataset.item_counts(dataset.train_users), kind="stable")[:k]
    training = meta.get("training", {})
    result = {
        "run": workdir.name,
        "arch": meta["params"]["arch"],
        "fgsm_eps": meta["params"]["fgsm_eps"],
        "fgsm_weight": meta["params"].get("fgsm_weight", 1.0),
        "fgsm_direction": meta["params"].get("fgsm_direction", "score"),
        "seed": meta["params"]["seed"],
        "users": len(targets),
        "items": len(item_e),
        "final_loss": training.get("final_loss"),
        "train_examples_per_second": training.get("examples_per_second"),
        "train_peak_rss_mib": training.get("peak_rss_mib"),
        "corpus": artifacts.read_meta(workdir / "dataset", "dataset", verify=False).get("counts", {}),
        "recall_all": mean_se(hit_all),
        # The baseline every model must beat: the k items most frequent among training users.
        "popularity_recall": mean_se(np.isin(targets, popular).astype(np.float64)),
        "queries": {},
    }
    per_user = {"recall_all": hit_all}
    graphs = {}
    for label, (folder, ef, steps) in QUERIES.items():
        if folder not in graphs:
            graphs[folder] = load_graph(workdir / folder, verify=False)
        graph = graphs[folder]
        start = default_start_layer([len(x) for x in graph.nodes], graph.num_items, list(ef))
        top_down_ef, top_down_steps = list(ef)[-(start + 1) :], list(steps)[-(start + 1) :]
        cover, hit, cost = np.empty(len(targets)), np.empty(len(targets)), np.empty(len(targets))
        for u in range(len(targets)):
            top, cost[u] = replay_user(graph, scores[u], top_down_ef, top_down_steps, start, k)
            cover[u] = len(np.intersect1d(top, reference[u])) / k
            hit[u] = float(targets[u] in top)
        ra, rr = hit_all.mean(), hit.mean()
        result["queries"][label] = {
            "start_layer": start,
            "coverage": mean_se(cover),
            "coverage_below_0.9": int((cover < 0.9).sum()),
            "recall_retrieval": mean_se(hit),
            "recall_delta": [float((ra - rr) / ra) if ra else 0.0, recall_delta_se(hit_all, hit)],
            "scored_percent": round(100 * float(cost.mean()) / len(item_e), 3),
        }
        per_user[f"coverage/{label}"] = cover
        per_user[f"recall/{label}"] = hit
    gaps = perturbation_gaps(model, item_e, histories, reference, probe_eps)
    per_user["fig6_gaps"] = gaps
    edges = graphs["index"].neighbors[0][:2000]
    rows = np.repeat(np.arange(len(edges)), edges.shape[1])
    ok = edges.ravel() >= 0
    lengths = np.linalg.norm(item_e[rows[ok]] - item_e[edges.ravel()[ok]], axis=1)
    score_spread = scores[:, :].std(axis=1)
    result.update(
        fig6={
            "probe_eps": probe_eps,
            "median": float(np.median(gaps)),
            "mean": mean_se(gaps.mean(axis=1)),
            "p90": float(np.percentile(gaps, 90)),
        },
        scale={
            "e_v_rms_median": float(np.median(np.sqrt((item_e**2).mean(1)))),
            "layer0_edge_l2_median": float(np.median(lengths)),
            "sign_delta_l2_at_eps": "eps * sqrt(D)",
            "dim": int(item_e.shape[1]),
            "score_std_over_items_median": float(np.median(score_spread)),
            "kth_score_gap_median": float(
                np.median(
                    scores[np.arange(len(scores)), reference[:, 0]]
                    - scores[np.arange(len(scores)), reference[:, -1]]
                )
            ),
        },
        aux_scale=aux_scale(model, ev.dataset, item_e),
        seconds=round(time.perf_counter() - started, 1),
    )
    return result, per_user


def analysed(workdir: Path, splits, users, k, probe_eps) -> tuple[dict, dict]:
    """:func:`analyse`, cached in DIR/eval/fgsm/ by its parameters and the model's weights."""
    from nann_common import artifacts

    model = artifacts.digest(artifacts.read_meta(workdir / "model", "model", verify=False))[:16]
    key = f"{model}-{'+'.join(splits)}-users{users}-k{k}-probe{probe_eps:g}"
    cache = workdir / "eval" / "fgsm" / key
    if (cache / "result.json").is_file():
        arrays = np.load(cache / "per_user.npz")
        per_user = {n.replace("|", "/"): arrays[n] for n in arrays.files}
        return json.loads((cache / "result.json").read_text()), per_user
    result, per_user = analyse(workdir, splits, users, k, probe_eps)
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(tmp / "per_user.npz", **{n.replace("/", "|"): v for n, v in per_user.items()})
    (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return result, per_user


def _pm(pair, scale: float = 100.0, digits: int = 2) -> str:
    return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"


def _number(value) -> str:
    """A whole number for a table cell; blank when an older cached analysis lacks it."""
    return "" if value is None else f"{value:,.0f}"


def _paired(per_user: dict, run: str, base: str, metric: str) -> tuple[float, float]:
    """Mean and standard error over users of run's metric minus base's (same users)."""
    return mean_se(per_user[run][metric] - per_user[base][metric])


def _plain(r) -> bool:
    """A run of the paper's loss: L_AUX weight 1, delta from the score's gradient."""
    return r["fgsm_weight"] == 1.0 and r["fgsm_direction"] == "score"


def _row(rows, arch, eps, seed=0):
    for r in rows:
        if _plain(r) and (r["arch"], r["fgsm_eps"], r["seed"]) == (arch, eps, seed):
            return r
    return None


def _errorbar(ax, x, pairs, color: str, label: str) -> None:
    """(mean, SE) pairs as percentages with one-SE bars."""
    ax.errorbar(
        x,
        [100 * p[0] for p in pairs],
        yerr=[100 * p[1] for p in pairs],
        marker="o",
        capsize=3,
        color=color,
        label=label,
    )


def _save(fig, stem: Path, suffix: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = stem.with_name(f"{stem.name}_{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plots(report: dict, per_user: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, written = report["rows"], []
    users = rows[0]["users"]
    sweep = sorted(
        (r for r in rows if r["arch"] == "din" and _plain(r) and r["seed"] == 0),
        key=lambda r: r["fgsm_eps"],
    )
    others = [r for r in rows if r["arch"] == "din" and _plain(r) and r["seed"] != 0]
    base = _row(rows, "din", 0.0)
    if len(sweep) >= 3 and base is not None:
        floor = min(r["fgsm_eps"] for r in sweep if r["fgsm_eps"] > 0) / 3

        def xs(group):
            return [r["fgsm_eps"] or floor for r in group]

        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, label in enumerate(report["queries"]):
            color = f"C{i}"
            d = [_paired(per_user, r["run"], base["run"], f"coverage/{label}") for r in sweep]
            _errorbar(
                a, xs(sweep), d, color, f"{label} (eps 0: {100 * base['queries'][label]['coverage'][0]:.1f}%)"
            )
            if others:
                d = [_paired(per_user, r["run"], base["run"], f"coverage/{label}") for r in others]
                a.plot(xs(others), [100 * v[0] for v in d], "o", mfc="none", color=color, markersize=9)
        a.axhline(0, color="grey", linewidth=0.8)
        a.set(
            xscale="log",
            xlabel="FGSM eps (leftmost: eps 0)",
            ylabel=f"coverage@{report['k']} minus eps 0's (points)",
            title=f"{report['name']}: din, {users} users, ± 1 paired SE; hollow: another training seed",
        )
        a.legend(fontsize=7)
        for i, (label, key) in enumerate(
            (("recall-all", None), ("recall-retrieval, hnswlib paper query", "hnswlib, paper query"))
        ):

            def val(r, key=key):
                return r["recall_all"] if key is None else r["queries"][key]["recall_retrieval"]

            v = [val(r) for r in sweep]
            _errorbar(b, xs(sweep), v, f"C{i}", label)
            if others:
                b.plot(
                    xs(others),
                    [100 * val(r)[0] for r in others],
                    "o",
                    mfc="none",
                    color=f"C{i}",
                    markersize=9,
                )
        b.set(
            xscale="log",
            xlabel="FGSM eps (leftmost: eps 0)",
            ylabel=f"recall@{report['k']} (%)",
            title="Fig. 7a: recall against eps (± 1 SE)",
        )
        b.legend(fontsize=8)
        written.append(_save(fig, stem, "fig7a"))
    pairs = [(a, e) for a in ("din", "dnn", "two_sided") for e in (0.0, PAPER_EPS) if _row(rows, a, e)]
    extra = [r for r in sweep if r["fgsm_eps"] >= 1e-2]
    if pairs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        gaps = [
            (
                f"{a} {'FGSM ' + format(e, 'g') if e else 'no FGSM'}",
                per_user[_row(rows, a, e)["run"]]["fig6_gaps"],
            )
            for a, e in pairs
        ]
        gaps += [(f"din FGSM {r['fgsm_eps']:g}", per_user[r["run"]]["fig6_gaps"]) for r in extra]
        lo = max(min(float(np.percentile(g, 0.5)) for _, g in gaps), 1e-9)
        hi = max(float(np.percentile(g, 99.5)) for _, g in gaps)
        bins = np.geomspace(lo, hi, 60)
        for label, g in gaps:
            g = g.ravel()
            ax.hist(
                g,
                bins=bins,
                histtype="step",
                weights=np.full(len(g), 100 / len(g)),
                label=label,
                linewidth=1.4,
            )
        probe = rows[0]["fig6"]["probe_eps"]
        ax.set(
            xscale="log",
            xlabel=f"|s_u(e_v) - s_u(e_v + Δ)|, Δ = {probe:g}·U(-1,1)",
            ylabel="% of (user, item) pairs per bin",
            title=f"Fig. 6: {report['name']}, top-{report['k']} of {users} users",
        )
        ax.legend(fontsize=8)
        written.append(_save(fig, stem, "fig6"))
    return written


def _across(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over models (0 SE with one model)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def _across_trainings(rows: list[dict], labels: list[str]) -> list[str]:
    """din trained at eps 0, small eps and large eps, each setting as a sample of trainings."""
    groups = {
        "eps 0": lambda e: e == 0,
        "eps 1e-4 .. 1e-3": lambda e: 0 < e <= 1e-3,
        "eps 3e-3 .. 1e-1": lambda e: e >= 3e-3,
    }
    din = [r for r in rows if r["arch"] == "din" and _plain(r)]
    members = {name: [r for r in din if test(r["fgsm_eps"])] for name, test in groups.items()}
    if len([m for m in members.values() if m]) < 2:
        return []
    out = [
        "",
        "### Across trainings: din models grouped by eps (mean ± SE over models; each model is one training)",
        "",
        "| query | metric | " + " | ".join(f"{name} ({len(m)} models)" for name, m in members.items()) + " | "
        "largest eps group minus eps 0 (Welch SE) |",
        "|---|---|" + "---|" * len(groups) + "---|",
    ]
    for label in labels:
        for metric, get in (
            ("coverage", lambda r, label=label: r["queries"][label]["coverage"][0]),
            ("recall-Δ", lambda r, label=label: r["queries"][label]["recall_delta"][0]),
        ):
            stats = {name: _across([get(r) for r in m]) if m else None for name, m in members.items()}
            cells = [_pm(v) if v else "" for v in stats.values()]
            low, high = stats["eps 0"], stats["eps 3e-3 .. 1e-1"]
            diff = ""
            if low and high:
                diff = f"{100 * (high[0] - low[0]):+.2f} ± {100 * np.hypot(high[1], low[1]):.2f}"
            out.append(f"| {label} | {metric} | " + " | ".join(cells) + f" | {diff} |")
    return out


def markdown(report: dict, per_user: dict, plots: list[str]) -> str:
    rows, k = report["rows"], report["k"]
    first = rows[0]
    lines = [
        f"## FGSM study, {report['name']}: {first['users']} users ({'+'.join(report['splits'])}), "
        f"{first['items']:,} items, k {k}",
        "",
        f"Command: `{report['command']}` ({report['date_utc'][:10]}). Figures are % ± one standard error "
        "over users (recall-Δ's by bootstrap); 'Δ vs no FGSM' is the paired difference on the same users. "
        "Queries: "
        + "; ".join(
            f"{label} = {q['graph']}/ ef {q['ef']} T {q['steps']}" for label, q in report["queries"].items()
        )
        + ".",
        "",
        "### Table 3",
        "",
    ]
    counts = first.get("corpus") or {}
    if counts:
        lines.append(
            f"Corpus: {counts.get('items', '?'):,} items, {counts.get('users_kept', '?'):,} users kept, "
            f"{counts.get('rows', '?'):,} rows."
        )
    if "popularity_recall" in first:
        lines.append(
            f"Popularity baseline (the {k} items most frequent among training users, same users): "
            f"recall {_pm(first['popularity_recall'])}."
        )
    lines += [
        "",
        "| model | FGSM eps | seed | recall-all | query | recall-retrieval | recall-Δ | coverage | "
        "Δ coverage vs no FGSM | items scored % | train ex/s | train peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in ("two_sided", "dnn", "din"):
        for seed in (0, 1):
            for eps in (0.0, PAPER_EPS):
                r = _row(rows, arch, eps, seed=seed)
                if r is None:
                    continue
                base = _row(rows, arch, 0.0, seed=seed)
                for label in ("hnswlib, paper query", "hnswlib, T 1,1,1", "refined, paper query"):
                    q = r["queries"][label]
                    diff = (
                        ""
                        if eps == 0 or base is None
                        else _pm(_paired(per_user, r["run"], base["run"], f"coverage/{label}"))
                    )
                    lines.append(
                        f"| {arch} | {eps:g} | {seed} | {_pm(r['recall_all'])} | {label} | "
                        f"{_pm(q['recall_retrieval'])} | {_pm(q['recall_delta'])} | {_pm(q['coverage'])} | "
                        f"{diff} | {q['scored_percent']:.2f} | "
                        f"{_number(r.get('train_examples_per_second'))} | "
                        f"{_number(r.get('train_peak_rss_mib'))} |"
                    )
    spread = []
    for eps in (0.0, PAPER_EPS):
        a, b = _row(rows, "din", eps, seed=0), _row(rows, "din", eps, seed=1)
        if a and b:
            spread.append(
                f"eps {eps:g}: "
                + ", ".join(
                    f"{label} {_pm(_paired(per_user, b['run'], a['run'], f'coverage/{label}'))}"
                    for label in report["queries"]
                )
                + f"; recall-all {_pm(_paired(per_user, b['run'], a['run'], 'recall_all'))}"
            )
    if spread:
        lines += [
            "",
            "**Two trainings of one setting (din, seed 1 minus seed 0, same users), coverage in points:** "
            + "; ".join(spread)
            + ". A paired SE covers the users only; a difference between two models has to exceed "
            "this spread between trainings before it says anything about FGSM.",
        ]
    lines += _across_trainings(rows, list(report["queries"]))
    sweep = sorted(
        (r for r in rows if r["arch"] == "din" and r["seed"] == 0),
        key=lambda r: (not _plain(r), r["fgsm_direction"], r["fgsm_weight"], r["fgsm_eps"]),
    )
    base = _row(rows, "din", 0.0)
    if len(sweep) > 2 and base is not None:
        labels = list(report["queries"])
        lines += [
            "",
            "### Fig. 7a: din against eps (and the variants: L_AUX weight, delta from the loss)",
            "",
            "| eps | L_AUX weight | delta's sign from | final L_AUX | recall-all | Δ recall-all vs eps 0 | "
            + " | ".join(f"coverage, {label} (Δ vs eps 0)" for label in labels)
            + " | Fig. 6 median gap |",
            "|---|---|---|---|---|---|" + "---|" * len(labels) + "---|",
        ]
        for r in sweep:
            cells = []
            for label in labels:
                c = r["queries"][label]["coverage"]
                d = _paired(per_user, r["run"], base["run"], f"coverage/{label}")
                cells.append(f"{c[0] * 100:.2f} ({d[0] * 100:+.2f} ± {d[1] * 100:.2f})")
            d_all = _paired(per_user, r["run"], base["run"], "recall_all")
            aux = (r.get("final_loss") or {}).get("aux")
            lines.append(
                f"| {r['fgsm_eps']:g} | {r['fgsm_weight']:g} | {r['fgsm_direction']} | {aux:.2g} | "
                f"{_pm(r['recall_all'])} | "
                f"{d_all[0] * 100:+.2f} ± {d_all[1] * 100:.2f} | "
                + " | ".join(cells)
                + f" | {r['fig6']['median']:.3g} |"
            )
    lines += [
        "",
        "### Fig. 6 and the scale eps acts on",
        "",
        "| model | FGSM eps | median gap | mean gap per user | p90 gap | e_v RMS coordinate | "
        "layer-0 edge l2 (median) | top-1 minus top-k score (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["arch"], r["seed"], not _plain(r), r["fgsm_weight"], r["fgsm_eps"])
    ):
        f, sc = r["fig6"], r["scale"]
        lines.append(
            f"| {r['run']} | {r['fgsm_eps']:g} | {f['median']:.3g} | "
            f"{f['mean'][0]:.3g} ± {f['mean'][1]:.2g} | "
            f"{f['p90']:.3g} | {sc['e_v_rms_median']:.3f} | {sc['layer0_edge_l2_median']:.3f} | "
            f"{sc['kth_score_gap_median']:.3f} |"
        )
    lines += [
        "",
        f"Fig. 6 probe: Δ = {first['fig6']['probe_eps']:g} · U(-1, 1) per coordinate of e_v "
        f"(D = {first['scale']['dim']}), for each user's exhaustive top {k}.",
    ]
    keys = list(first["aux_scale"])
    lines += [
        "",
        "### What L_AUX sees: one validation batch (128 users, 199 noise labels), per eps and delta's sign",
        "",
        "| model | " + " | ".join(f"{key}: L_AUX, shift mean / sd across labels" for key in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = [
            f"{a['l_aux']:.2g}, {a['shift_mean']:.3g} / {a['shift_sd_across_labels']:.2g}"
            for a in (r["aux_scale"][key] for key in keys)
        ]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(report: dict, per_user: dict) -> None:
    stem = harness.RESULTS / f"fgsm_{report['name']}"
    plots = _plots(report, per_user, stem)
    harness.write_result(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(markdown(report, per_user, plots))
    print(f"wrote {stem}.json, {stem}.md, " + ", ".join(plots), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--name", required=True, help="corpus label in the result files")
    parser.add_argument("--interactions", required=True, help="the corpus (as train's --interactions)")
    parser.add_argument("--root", required=True, type=Path, help="folder for one workdir per model")
    parser.add_argument(
        "--train-args", default="--epochs 1", help="further train flags, one string (default --epochs 1)"
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=sorted(RUN_SETS),
        default=["table3", "sweep", "weight", "direction", "seeds"],
        help="model sets (default table3 sweep weight direction seeds)",
    )
    parser.add_argument("--splits", nargs="+", choices=("test", "valid"), default=["test"])
    parser.add_argument("--users", type=int, default=5000, help="evaluated users per split (0 = all)")
    parser.add_argument("--k", type=int, default=200, help="top-k of every metric (default 200)")
    parser.add_argument(
        "--probe-eps", type=float, default=1e-2, help="Fig. 6's eps, one for every model (default 1e-2)"
    )
    parser.add_argument("--train-only", action="store_true", help="train and index, analyse nothing")
    args = parser.parse_args(argv)

    specs = list(dict.fromkeys(s for name in args.runs for s in RUN_SETS[name]))
    train_args = args.train_args.split()
    seconds = {}
    for i, spec in enumerate(specs, 1):
        workdir = args.root / run_name(*spec)
        print(f"[{i}/{len(specs)}] {workdir.name}", flush=True)
        seconds[workdir.name] = train_and_index(workdir, args.interactions, train_args, spec)
    if args.train_only:
        return 0
    harness.import_tensorflow()
    rows, per_user = [], {}
    for i, spec in enumerate(specs, 1):
        workdir = args.root / run_name(*spec)
        result, arrays = analysed(workdir, args.splits, args.users, args.k, args.probe_eps)
        rows.append(result)
        per_user[workdir.name] = arrays
        q = result["queries"]["hnswlib, T 1,1,1"]
        print(
            f"[{i}/{len(specs)}] {workdir.name}: recall-all {result['recall_all'][0]:.4f}, "
            f"hnswlib T 1,1,1 coverage {q['coverage'][0]:.4f}, recall-delta {q['recall_delta'][0]:.4f}",
            flush=True,
        )
    report = {
        **harness.result_header(__file__, argv),
        "name": args.name,
        "splits": args.splits,
        "k": args.k,
        "queries": {label: {"graph": g, "ef": ef, "steps": t} for label, (g, ef, t) in QUERIES.items()},
        "rows": rows,
    }
    write_report(report, per_user)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
