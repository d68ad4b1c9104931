"""Training step time against corpus size: LazyAdam vs Keras' dense Adam.

Times the real train step (din, sampled softmax with 199 noise labels, FGSM) on
random batches of 128 for each corpus size and optimizer, each in a fresh
model, and reports the median step. With dense Adam the step grows with the
number of items (every row of the id table and its moments is rewritten each
step); with LazyAdam it should not.

    python -m benchmarks.train_step --items 50000 1365188 --steps 10
"""

from __future__ import annotations

import json
import time

import numpy as np

from benchmarks import harness


def time_steps(items: int, optimizer: str, arch: str, fgsm_eps: float, steps: int, batch: int) -> list[float]:
    tf = harness.import_tensorflow()
    from model_export.model import ModelConfig, build_model
    from model_export.train import make_optimizer, make_train_step

    rng = np.random.default_rng(0)
    categories = 5000
    model = build_model(ModelConfig(items, categories, arch=arch), rng.integers(0, categories, items))
    opt = make_optimizer(optimizer, 3e-3)
    opt.build(model.trainable_variables)
    log_q = tf.constant(np.full(items, -np.log(items)), tf.float32)
    step = make_train_step(model, opt, log_q, fgsm_eps, 50, 199)

    def random_batch():
        return (
            tf.constant(rng.integers(0, items, (batch, 50)), tf.int32),
            tf.constant(rng.integers(0, items, batch), tf.int32),
            tf.constant(rng.integers(0, items, 199), tf.int32),
        )

    step(*random_batch())  # tracing
    times = []
    for _ in range(steps):
        b = random_batch()
        started = time.perf_counter()
        [float(x) for x in step(*b)]
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--items", type=int, nargs="+", default=[50_000, 1_365_188])
    parser.add_argument(
        "--optimizers",
        nargs="+",
        help="from model_export.train.OPTIMIZERS, e.g. lazy_adam adam (default: all of them)",
    )
    parser.add_argument("--arch", default="din", choices=("din", "dnn", "two_sided"))
    parser.add_argument("--fgsm-eps", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    harness.import_tensorflow()
    from model_export.train import OPTIMIZERS

    unknown = sorted(set(args.optimizers or ()) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"--optimizers: unknown {', '.join(unknown)}; known: {', '.join(OPTIMIZERS)}")
    optimizers = args.optimizers or list(OPTIMIZERS)

    rows = []
    for items in args.items:
        for optimizer in optimizers:
            times = time_steps(items, optimizer, args.arch, args.fgsm_eps, args.steps, args.batch_size)
            median = float(np.median(times))
            rows.append(
                {
                    "items": items,
                    "optimizer": optimizer,
                    "median_step_ms": round(1000 * median, 1),
                    "examples_per_second": round(args.batch_size / median, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        **harness.result_header(__file__, argv),
        "arch": args.arch,
        "fgsm_eps": args.fgsm_eps,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rows": rows,
    }
    out = harness.write_result(harness.RESULTS / f"train_step_{args.arch}.json", result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
