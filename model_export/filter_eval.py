"""Filters measured against exhaustive search under the same filter.

``python -m model_export evaluate --workdir DIR --filter-selectivity 0.5,0.1,0.01,0.001
[--exclude-history]`` runs the latest export's default query, one user per call (batch 1, as a
server without micro-batching calls it), under each filter kind:

* ``categories``: an allow-list of whole categories drawn per user, in random order until the
  allowed share reaches each selectivity;
* ``exclude_history``: the user's own behaviours;
* ``exclude_1k`` / ``exclude_10k``: that many random items.

``--exclude-history`` adds the history exclusion to every filter. Each answer is compared with the
exact top k among the items that user's filter allows: coverage@k, items scored, latency, the
plan the model chose, and how often the answer held fewer than min(k, allowed) items. The
unfiltered default query runs first, as the baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nann_common import artifacts, contract
from nann_common.contract import PLANS, RowFilter

EXCLUSIONS = {"exclude_history": 0, "exclude_1k": 1_000, "exclude_10k": 10_000}


def category_allow_list(item_category: np.ndarray, share: float, rng) -> tuple[int, ...]:
    """Whole categories in random order until they hold at least ``share`` of the items."""
    sizes = np.bincount(item_category)
    order = rng.permutation(np.flatnonzero(sizes))
    upto = int(np.searchsorted(np.cumsum(sizes[order]), share * len(item_category))) + 1
    return tuple(sorted(order[:upto].tolist()))


def draw_filter(kind: str, selectivity: float, dataset, history: np.ndarray, exclude_history: bool, rng):
    """(RowFilter, bool [N] allowed items) of one user for one filter kind."""
    n = dataset.num_items
    allowed = np.ones(n, bool)
    if kind == "categories":
        allow = category_allow_list(dataset.item_category, selectivity, rng)
        allowed = np.isin(dataset.item_category, allow)
        f = RowFilter(allow_categories=allow)
    elif kind in EXCLUSIONS and EXCLUSIONS[kind]:
        dense = rng.choice(n, min(EXCLUSIONS[kind], n - 1), replace=False)
        allowed[dense] = False
        f = RowFilter(exclude_items=tuple(dataset.item_ids[dense].tolist()))
    elif kind == "exclude_history":
        f = RowFilter(exclude_history=True)
    elif kind == "none":
        f = contract.NO_FILTER
    else:
        raise ValueError(f"unknown filter kind {kind!r}")
    if exclude_history or f.exclude_history:
        allowed[history[history >= 0]] = False
        f = RowFilter(f.exclude_items, True, f.allow_categories, f.exclude_categories)
    return f, allowed


def filter_study(
    workdir: str | Path,
    selectivities: tuple[float, ...],
    exclude_history: bool = False,
    users: int = 200,
    k: int | None = None,
    split: str = "test",
    seed: int = 0,
    progress: bool = True,
    evaluation=None,
    scores: np.ndarray | None = None,
) -> dict:
    """Runs every filter kind on the evaluated users; returns the result (rows per kind)."""
    import tensorflow as tf

    from model_export.evaluate import Evaluation
    from walk.replay import exact_scores

    ev = evaluation or Evaluation(workdir, split, users, seed)
    model = ev.saved_model()
    serving = contract.ServingContract.from_meta(ev.export_path, ev.export_meta)
    if not serving.has_filters:
        raise contract.InvalidRequest(f"{ev.export_path} was exported before filters; re-export it")
    query = serving.resolve(k)
    xla = serving.has_xla_signature
    name = serving.signature(xla, filtered=True)
    fns = {filtered: model.signatures[serving.signature(xla, filtered)] for filtered in (False, True)}
    original = ev.dataset.item_ids
    histories = np.where(ev.histories >= 0, original[np.maximum(ev.histories, 0)], -1)
    if scores is None:
        scores = exact_scores(ev, progress=progress)
    if serving.has_xla_signature:
        model.signatures[contract.XLA_WARMUP_SIGNATURE](history=tf.constant(histories[:1]))
    kinds = [("none", 1.0), *(("categories", s) for s in selectivities), *((x, 1.0) for x in EXCLUSIONS)]
    rows = []
    for kind, selectivity in kinds:
        rng = np.random.default_rng([seed, len(rows)])
        cover, scored, ms, plans, short, share, removed = [], [], [], [], [], [], []
        for u in range(ev.num_users):
            f, allowed = draw_filter(kind, selectivity, ev.dataset, ev.histories[u], exclude_history, rng)
            inputs = serving.inputs(histories[u : u + 1], query, [f])
            started = time.perf_counter()
            out = fns[bool(f)](**{key: tf.constant(value) for key, value in inputs.items()})
            ms.append(1000 * (time.perf_counter() - started))
            got = out["item_ids"].numpy()[0]
            got = np.searchsorted(original, got[got >= 0])
            ids = np.flatnonzero(allowed)
            want = min(query.k, len(ids))
            best = ids[np.argsort(-scores[u][ids], kind="stable")[:want]]
            cover.append(len(np.intersect1d(got, best)) / max(want, 1))
            short.append(len(got) < want)
            scored.append(int(out["scored"].numpy()[0]))
            plans.append(PLANS[int(out["plan"].numpy()[0])] if f else "walk")
            removed.append(int(out["removed"].numpy()[0]) if f else 0)
            share.append(len(ids) / len(allowed))
        cover = np.array(cover)
        rows.append(
            {
                "filter": kind,
                "selectivity": selectivity,
                "allowed_share": float(np.mean(share)),
                "coverage": float(cover.mean()),
                "coverage_se": float(cover.std(ddof=1) / np.sqrt(len(cover))) if len(cover) > 1 else 0.0,
                "coverage_min": float(cover.min()),
                "scored_per_user": float(np.mean(scored)),
                "removed_per_user": float(np.mean(removed)),
                "p50_ms": float(np.median(ms[3:] or ms)),
                "p99_ms": float(np.percentile(ms[3:] or ms, 99)),
                "plans": {p: plans.count(p) for p in PLANS if p in plans},
                "k_not_filled": int(np.sum(short)),
            }
        )
        if progress:
            print(json.dumps(rows[-1]), flush=True)
    return {
        "users": ev.num_users,
        "items": ev.dataset.num_items,
        "k": query.k,
        "query": {"mode": query.mode, "ef": list(query.ef), "steps": list(query.steps)},
        "signature": name,
        "exact_below": serving.exact_below,
        "exclude_history": exclude_history,
        "export": str(ev.export_path.name),
        "export_digest": serving.digest,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['items']:,} items, {result['users']} users, k {result['k']}, default query "
        f"{result['query']['mode']} ef {result['query']['ef']} T {result['query']['steps']}, signature "
        f"{result['signature']}, batch 1; exact plan up to {result['exact_below']:,} allowed items"
        + (", history excluded in every filter" if result["exclude_history"] else ""),
        "",
        "| filter | target | allowed | coverage@k (± SE, min) | items scored | p50 ms | p99 ms | plans "
        "| k not filled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        plans = ", ".join(f"{p} {n}" for p, n in r["plans"].items())
        target = f"{100 * r['selectivity']:g}%" if r["filter"] == "categories" else ""
        lines.append(
            f"| {r['filter']} | {target} | {100 * r['allowed_share']:.2f}% | {r['coverage']:.4f} ± "
            f"{r['coverage_se']:.4f} (min {r['coverage_min']:.2f}) | {r['scored_per_user']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {plans} | {r['k_not_filled']} |"
        )
    return "\n".join(lines) + "\n"


def write(workdir: str | Path, result: dict) -> Path:
    """Writes DIR/eval/filters/ (result.json, table.md) atomically; returns the folder."""
    target = Path(workdir) / "eval" / "filters"
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "table.md").write_text(markdown(result))
    return target
