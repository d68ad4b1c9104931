"""Latency of the exported SavedModel: beam vs exhaustive, and bitmap vs raw-set-op marking (Table 1).

Replays evaluated users' histories through the ``retrieve`` signature of
``DIR/export/<latest>`` and reports, per setting, the median and p90 response
time, QPS (batches of B users divided by wall time) and the candidates scored
per query. Two ways to run the signature (``--runner``):

* ``session``: the SavedModel loaded into a ``tf.compat.v1.Session`` and run with
  ``Session.run`` on the signature's tensors, which is how TensorFlow Serving's
  C++ ``SavedModelBundle`` serves it;
* ``function``: ``tf.saved_model.load`` and a call of the signature's concrete
  function, as a Python process embedding the model would.

    python -m benchmarks.serving_latency --workdir runs/w --batch 1 --queries 50
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

RUNNERS = {"session": harness.session_runner, "function": harness.function_runner}


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="users per request")
    parser.add_argument("--queries", type=int, default=40, help="timed requests per setting (after warm-up)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument(
        "--table1-ef",
        type=harness.ints,
        default=(200, 500, 1000),
        help="Table 1 beam widths, top-down (trimmed or extended to the export's depth)",
    )
    parser.add_argument("--table1-steps", type=harness.ints, default=(1, 1, 2))
    parser.add_argument(
        "--beam-also",
        nargs="*",
        default=[],
        metavar="EF/T",
        help="more beam settings to time, each top-down ef and T, e.g. 100,200,400/1,1,3",
    )
    parser.add_argument("--exhaustive-queries", type=int, default=5, help="timed exhaustive requests")
    parser.add_argument("--out", type=Path, help="JSON written (default results/serving_latency_N.json)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=30,
        help="untimed requests before each graph-search setting (oneDNN builds a kernel per new "
        "candidate count, so the first requests of a process are slower)",
    )
    parser.add_argument(
        "--runner",
        nargs="+",
        choices=sorted(RUNNERS),
        default=["session"],
        help="how the signature is run (default session: Session.run, as TF Serving does)",
    )
    args = parser.parse_args(argv)
    harness.import_tensorflow()
    from model_export.data import load_dataset
    from model_export.export import latest_export
    from nann_common import artifacts

    path = latest_export(args.workdir)
    meta = artifacts.read_meta(path, "saved_model")
    params = meta["params"]
    depth = params["start_layer"] + 1
    dataset = load_dataset(Path(args.workdir) / "dataset")
    _, histories, _ = dataset.eval_examples("test", 50)
    histories = np.where(histories >= 0, dataset.item_ids[np.maximum(histories, 0)], -1)

    def fit(values):
        values = tuple(values)
        return values[-depth:] if len(values) >= depth else (values[0],) * (depth - len(values)) + values

    settings = [
        ("beam", tuple(params["ef"]), tuple(params["steps"]), "default"),
        *(
            ("beam", fit(harness.ints(ef)), fit(harness.ints(steps)), f"ef {ef} T {steps}")
            for ef, steps in (setting.split("/") for setting in args.beam_also)
        ),
        ("beam", fit(args.table1_ef), fit(args.table1_steps), "table1"),
        ("beam_sets", fit(args.table1_ef), fit(args.table1_steps), "table1"),
        ("hnsw", tuple(params["ef"]), tuple(params["steps"]), "default"),
        ("exhaustive", tuple(params["ef"]), tuple(params["steps"]), "default"),
    ]
    rows = []
    for runner in args.runner:
        run = RUNNERS[runner](path)
        rng = np.random.default_rng(0)
        for batch in args.batch:
            for mode, ef, steps, label in settings:
                n = args.exhaustive_queries if mode == "exhaustive" else args.queries
                times, scored = [], []
                warmup = 1 if mode == "exhaustive" else args.warmup
                for q in range(n + warmup):
                    inputs = {
                        "history": histories[rng.choice(len(histories), batch)].astype(np.int64),
                        "k": np.full([batch], args.k, np.int32),
                        "ef": np.array([ef] * batch, np.int32),
                        "steps": np.array([steps] * batch, np.int32),
                        "mode": np.array([mode.encode()] * batch),
                    }
                    started = time.perf_counter()
                    out = run(inputs)
                    if q >= warmup:
                        times.append(time.perf_counter() - started)
                        scored.append(float(out["scored"].mean()))
                row = {
                    "runner": runner,
                    "mode": mode,
                    "setting": label,
                    "ef": list(ef),
                    "steps": list(steps),
                    "batch": batch,
                    "median_ms": round(1000 * float(np.median(times)), 2),
                    "p90_ms": round(1000 * float(np.percentile(times, 90)), 2),
                    "qps_users": round(batch * len(times) / sum(times), 1),
                    "scored_per_user": round(float(np.mean(scored)), 1),
                    "scored_fraction": round(float(np.mean(scored)) / dataset.num_items, 5),
                    "requests": len(times),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    for runner in args.runner:
        for batch in args.batch:
            by = {(r["mode"], r["setting"]): r for r in rows if r["batch"] == batch and r["runner"] == runner}
            speedup = by[("exhaustive", "default")]["median_ms"] / by[("beam", "default")]["median_ms"]
            print(
                f"{runner}, batch {batch}: beam (defaults) is {speedup:.1f}x faster than exhaustive (median)"
            )
    result = {
        **harness.result_header(__file__, argv),
        "export": str(path.relative_to(Path(args.workdir))),
        "items": dataset.num_items,
        "start_layer": params["start_layer"],
        "layer_sizes": params["layer_sizes"],
        "rows": rows,
    }
    out = harness.write_result(
        args.out or harness.RESULTS / f"serving_latency_{dataset.num_items}.json", result
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
