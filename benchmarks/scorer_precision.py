"""The din scorer in float32 and in bfloat16, at the walk's shapes, on this machine's CPU.

Loads the workdir's model, builds one user state per batch row from test histories, and scores
candidate blocks of the widths the walk meets (a round of layer 0, the skip start's start layer)
four ways: float32 and bfloat16, each as stock ops and as one XLA call. bfloat16 casts the
scorer's matmul inputs and weights (the softmax and the score stay float32). Per setting it
reports the time of a call (median of ``--repeats``), the FLOP rate, and how far the bfloat16
scores are from the float32 ones (largest difference, and how many of the float32 top 10% stay in
the bfloat16 top 10%). It also prints which instruction set oneDNN dispatches its matmuls to
(``ONEDNN_VERBOSE``): AMX, AVX-512 BF16 or plain AVX.

    python -m benchmarks.scorer_precision --workdir W --out benchmarks/results/scorer_precision.json
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

ISA_PROBE = (
    "import tensorflow as tf; tf.matmul(tf.ones([64, 64], tf.bfloat16), tf.ones([64, 64], tf.bfloat16))"
)


def onednn_isa() -> str:
    """The ``isa:`` line oneDNN prints for a bfloat16 matmul in a fresh process."""
    try:
        out = harness.run_python(
            ["-c", ISA_PROBE],
            echo=False,
            quiet=True,
            env={"ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"},
            timeout=300,
        )
    except subprocess.SubprocessError as e:
        return f"the oneDNN probe failed ({e})"
    lines = [line for line in out.splitlines() if ",isa:" in line]
    return lines[0].split(",isa:", 1)[1] if lines else "oneDNN printed no isa line (oneDNN off?)"


def score_in(model, state: dict, cand, dtype):
    """model.score (din) with the matmul inputs and weights in ``dtype``; float32 elsewhere."""
    import tensorflow as tf

    def c(t):
        return tf.cast(t, dtype)

    def mm(x, w):
        return tf.cast(tf.matmul(c(x), c(w)), tf.float32)

    ce = c(cand)
    h = state["user_bias"][:, None, :] + tf.cast(
        tf.einsum("bnd,bdh->bnh", ce, c(state["item_matrix"])), tf.float32
    )
    logits = tf.cast(tf.einsum("bnd,bld->bnl", ce, c(state["keys"])), tf.float32)
    mask = state["mask"][:, None, :]
    logits = tf.where(mask, logits, -1e9)
    weights = tf.nn.softmax(logits, axis=-1) * tf.cast(mask, tf.float32)
    att = tf.cast(tf.einsum("bnl,bld->bnd", c(weights), c(state["values"])), tf.float32)
    h = h + mm(tf.concat([att, att * cand], axis=-1), model.w_att.kernel)
    h = model.score_act(h)
    net = model.score_net
    for name in net._order:
        layer = getattr(net, name)
        h = mm(h, layer.kernel) + layer.bias if hasattr(layer, "kernel") else layer(h)
    return tf.squeeze(h, axis=-1)


def timed(fn, x, repeats: int) -> float:
    fn(x).numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, __file__)
    p.add_argument("--workdir", required=True, type=Path, help="workdir with model/ and embeddings/")
    p.add_argument(
        "--shapes",
        default="1x512,1x1024,1x3413,32x512",
        help="users x candidates per call (default: layer-0 rounds and the 1.37M skip start)",
    )
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--flop-per-item", type=float, default=82.5e3)
    p.add_argument("--out", type=Path, help="JSON file written")
    args = p.parse_args(argv)
    tf = harness.import_tensorflow()
    from model_export.evaluate import Evaluation
    from model_export.model import load_model_files

    isa = onednn_isa()
    print(f"oneDNN: {isa}", flush=True)
    model = load_model_files(args.workdir / "model")
    if model.config.arch != "din":
        p.error(f"the model is {model.config.arch}; this benchmark runs the din scorer")
    item_e = np.load(args.workdir / "embeddings" / "item_embeddings.npy", mmap_mode="r")
    evaluation = Evaluation(args.workdir, "test", 32, 0)
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes.split(","):
        batch, width = (int(x) for x in shape.split("x"))
        hist = evaluation.histories[np.arange(batch) % len(evaluation.histories)]
        hist_e = tf.constant(np.asarray(item_e[np.maximum(hist, 0)], np.float32))
        state = model.user_state(hist_e, tf.constant(hist >= 0))
        picks = np.sort(rng.choice(len(item_e), (batch, width)), axis=1)
        cand = tf.constant(np.asarray(item_e[picks.ravel()], np.float32).reshape(batch, width, -1))
        reference = None
        for dtype in (tf.float32, tf.bfloat16):
            for xla in (False, True):

                def fn(x, dtype=dtype, state=state):
                    return score_in(model, state, x, dtype)

                fn = tf.function(fn, jit_compile=xla)
                seconds = timed(fn, cand, args.repeats)
                scores = fn(cand).numpy()
                if reference is None:
                    reference = scores
                top = max(1, width // 10)
                kept = np.mean(
                    [
                        len(np.intersect1d(np.argsort(-a)[:top], np.argsort(-b)[:top])) / top
                        for a, b in zip(reference, scores, strict=True)
                    ]
                )
                row = {
                    "batch": batch,
                    "candidates": width,
                    "dtype": dtype.name,
                    "xla": xla,
                    "ms": round(1000 * seconds, 3),
                    "gflops": round(batch * width * args.flop_per_item / seconds / 1e9, 1),
                    "max_abs_diff_vs_float32": float(np.abs(scores - reference).max()),
                    "top10pct_kept": round(float(kept), 4),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {**harness.result_header(__file__, argv), "onednn_isa": isa, "rows": rows}
    if args.out:
        harness.write_result(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
