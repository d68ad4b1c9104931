"""Command line of the offline pipeline: synthesize, train, evaluate.

    python -m model_export synthesize --items N --users U --out PATH
    python -m model_export train --interactions PATH --workdir DIR [--arch din|dnn|two_sided]
    python -m model_export evaluate --workdir DIR [--k 200] [--users N] [--json]
    python -m model_export tune --workdir DIR [--coverage 0.99 | --latency-ms X]
    python -m model_export export --workdir DIR

Errors about the input or the workdir are reported as one line on stderr
with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from nann_common.errors import NannError

logger = logging.getLogger("model_export")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ints(text: str, example: str = "100,200,400") -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like {example}, got {text!r}"
        ) from e


def _share_list(text: str) -> tuple[float, ...]:
    """Comma-separated shares in (0, 1]."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"every share must be in (0, 1], got {text!r}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    values = _ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _steps_list(text: str) -> tuple[int, ...]:
    """Rounds T per layer, top-down: 0 passes a layer's entry points straight down; layer 0 needs >= 1."""
    values = _ints(text, "1,0,5")
    if not values or min(values) < 0 or values[-1] < 1:
        raise argparse.ArgumentTypeError(
            f"every T must be >= 0 (0: the layer is not walked) and layer 0's (the last) >= 1, got {text!r}"
        )
    return values


def _int_lists(text: str) -> tuple[tuple[int, ...], ...]:
    """Comma-separated settings, each a slash-separated list: 100/200,400/400."""
    try:
        return tuple(_int_list(part.replace("/", ",")) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated settings of slash-separated integers >= 1 like 100/200,400/400, "
            f"got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_export",
        description="NANN offline pipeline: interactions -> trained neural scorer -> evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    syn = sub.add_parser(
        "synthesize",
        help="write a synthetic interactions file in the Taobao UserBehavior CSV format",
        description="Writes a synthetic UserBehavior-format CSV (no header: "
        "user_id,item_id,category_id,behavior_type,timestamp) with category structure, power-law "
        "popularity and users whose next item depends on their recent behaviours.",
    )
    syn.add_argument("--items", type=_positive_int, required=True, help="number of items in the corpus")
    syn.add_argument("--users", type=_positive_int, required=True, help="number of users")
    syn.add_argument("--out", required=True, help="CSV file to write (replaced atomically)")
    syn.add_argument(
        "--categories",
        type=_positive_int,
        default=None,
        help="number of categories (default: items / 440, as in the real data)",
    )
    syn.add_argument(
        "--mean-length",
        type=float,
        default=100.0,
        help="mean behaviours per user (default 100, as in the real data)",
    )
    syn.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    tr = sub.add_parser(
        "train",
        help="prepare the interactions and train the scoring model (resumes from checkpoints)",
        description="Loads and splits the interactions (as the paper: users with >= 10 behaviours, "
        "validation/test users predict their ceil(l/2)-th behaviour), trains s_u(e_v) with sampled "
        "softmax (plus the FGSM auxiliary loss with --fgsm-eps > 0), and writes model/ and embeddings/ "
        "into the workdir. Re-running with the same parameters resumes from the last checkpoint.",
    )
    tr.add_argument(
        "--interactions",
        required=True,
        help="UserBehavior CSV, or MovieLens ratings.csv (or its directory, with movies.csv)",
    )
    tr.add_argument(
        "--format",
        choices=("userbehavior", "movielens"),
        default="userbehavior",
        help="input format (default userbehavior)",
    )
    tr.add_argument("--workdir", required=True, help="directory for the dataset, checkpoints, logs and model")
    tr.add_argument(
        "--arch",
        choices=("din", "dnn", "two_sided"),
        default="din",
        help="din: target attention (default); dnn: sum-pooling; two_sided: inner product",
    )
    tr.add_argument("--epochs", type=_positive_int, default=2, help="epochs to train in total (default 2)")
    tr.add_argument(
        "--fgsm-eps",
        type=float,
        default=0.0,
        help="FGSM epsilon, the max-norm of the perturbation of e_v (default 0: off). The paper uses "
        "3e-4 (UserBehavior) and 1e-2 (industry). On our corpora 3e-4 changes nothing measurable; 3e-3 "
        "to 1e-1 raised coverage by about 2 points on hnswlib's graph as built (one corpus of three) "
        "and by nothing on the default refined graph; FGSM makes a training step about twice as slow "
        "(docs/fgsm.md)",
    )
    tr.add_argument(
        "--fgsm-weight",
        type=float,
        default=1.0,
        help="weight of the FGSM loss L_AUX beside L_NCE (default 1, as the paper)",
    )
    tr.add_argument(
        "--fgsm-direction",
        choices=("score", "loss"),
        default="score",
        help="sign of the perturbation: score = of grad s_u(e_v), as the paper's eq. 6 (default); loss = "
        "of grad L_NCE, FGSM as Goodfellow et al. (pushes the positive down and the noise labels up)",
    )
    tr.add_argument(
        "--negatives",
        type=_positive_int,
        default=199,
        help="noise labels per positive, drawn by popularity (default 199)",
    )
    tr.add_argument("--batch-size", type=_positive_int, default=128, help="examples per batch (default 128)")
    tr.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    tr.add_argument(
        "--max-len",
        type=_positive_int,
        default=50,
        help="behaviours before the target the model sees (default 50)",
    )
    tr.add_argument(
        "--min-behaviours",
        type=_positive_int,
        default=10,
        help="keep users with at least this many behaviours (default 10)",
    )
    tr.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip and count malformed rows instead of stopping at the first",
    )
    tr.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=500,
        help="batches between checkpoints (default 500; one is also written per epoch)",
    )
    tr.add_argument(
        "--examples-per-epoch",
        type=int,
        default=0,
        help="train on a seeded sample of this many positions per epoch (default 0 = all); for corpora "
        "whose full epoch takes hours",
    )
    tr.add_argument(
        "--optimizer",
        choices=("lazy_adam", "adam"),
        default="lazy_adam",
        help="lazy_adam (default): Adam that updates only the embedding rows a batch touches, so a "
        "step costs the same at any corpus size; adam: Keras' dense Adam, which rewrites every "
        "embedding row each step (several times slower from about a million items)",
    )
    tr.add_argument(
        "--restart", action="store_true", help="discard the workdir's dataset and checkpoints and start over"
    )
    tr.add_argument(
        "--seed", type=int, default=0, help="random seed for split, sampling and init (default 0)"
    )

    ev = sub.add_parser(
        "evaluate",
        help="recall, recall-delta and coverage of exhaustive, beam or hnsw retrieval",
        description="Evaluates the workdir's model on the evaluated users. exhaustive scores every item "
        "(recall-all@k); beam (NANN) and hnsw (the SL2G baseline) run the exported SavedModel and are "
        "compared with the exhaustive top-k (computed once and cached in the workdir's eval/).",
    )
    ev.add_argument("--workdir", required=True, help="a workdir written by train (and export, for beam/hnsw)")
    ev.add_argument("--k", type=_positive_int, default=200, help="top-k to retrieve (default 200)")
    ev.add_argument(
        "--mode",
        choices=("exhaustive", "default", "beam", "beam_history", "hnsw", "beam_sets"),
        default="exhaustive",
        help="search mode (default exhaustive; 'default' = the latest export's default query; "
        "beam_sets = beam with raw set-op marking)",
    )
    ev.add_argument(
        "--ef",
        type=_int_list,
        default=None,
        help="beam widths top-down from the start layer to layer 0, e.g. 100,200,400 "
        "(default: the export's); hnsw uses the last one as ef_0",
    )
    ev.add_argument(
        "--steps",
        type=_steps_list,
        default=None,
        help="rounds T per layer, top-down, e.g. 1,1,3 (default: the export's); "
        "T 0 passes a layer's entry points straight to the layer below",
    )
    ev.add_argument(
        "--users",
        type=int,
        default=0,
        help="evaluate a seeded sample of N users (default 0 = all evaluated users)",
    )
    ev.add_argument(
        "--split", choices=("test", "valid"), default="test", help="evaluated users (default test)"
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the --users sample (default 0)")
    ev.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on the last line"
    )
    ev.add_argument(
        "--filter-selectivity",
        type=_share_list,
        default=None,
        help="measure filters instead: the default query under category allow-lists drawn to allow "
        "each of these shares of the items (e.g. 0.5,0.1,0.01,0.001), and under exclusions of the "
        "user's history and of 1k / 10k random items, against exhaustive search under the same filter; "
        "writes DIR/eval/filters/ (--users default 200 here)",
    )
    ev.add_argument(
        "--exclude-history",
        action="store_true",
        help="with --filter-selectivity: every filter also excludes the user's history",
    )

    tu = sub.add_parser(
        "tune",
        help="choose the export's query defaults for this corpus: the cheapest query that meets a target",
        description="Replays candidate queries (beam or beam_history with every 1st/2nd/4th start node; ef "
        "and T per layer) over the exact scores of validation users, measures each against their "
        "exhaustive top k, picks the cheapest (fewest items scored) whose coverage clears --coverage by two "
        "standard errors, or with --latency-ms the best covered whose latency (measured through the "
        "latest export, fitted to the items scored) fits, and checks the choice on test users it never "
        "saw. Writes DIR/tune/ (query.json, table.csv, table.md, tune.png); the next export takes the "
        "choice as its query defaults.",
    )
    tu.add_argument("--workdir", required=True, help="a workdir with model/, embeddings/ and index/")
    target = tu.add_mutually_exclusive_group()
    target.add_argument(
        "--coverage", type=float, default=None, help="coverage@k to reach on validation users (default 0.99)"
    )
    target.add_argument(
        "--latency-ms",
        type=float,
        default=None,
        help="batch-1 latency budget instead: the best coverage within it (needs an export to measure)",
    )
    tu.add_argument("--k", type=_positive_int, default=200, help="top-k the coverage is of (default 200)")
    tu.add_argument(
        "--users", type=_positive_int, default=200, help="validation users tuned on (default 200)"
    )
    tu.add_argument(
        "--test-users",
        type=_positive_int,
        default=200,
        help="test users the choice is checked on (default 200)",
    )
    tu.add_argument("--seed", type=int, default=0, help="seed of the user samples (default 0)")

    sw = sub.add_parser(
        "sweep",
        help="coverage and recall against %% of corpus scored, beam vs hnsw (PNG + CSV + JSON)",
        description="Runs the exported SavedModel over a grid of layer-0 beam widths and rounds and "
        "writes a Figure-3-style plot with its numbers (sweep.png, sweep.csv, sweep.json).",
    )
    sw.add_argument("--workdir", required=True, help="a workdir with an export")
    sw.add_argument("--out", default=None, help="output folder (default DIR/eval/sweep)")
    sw.add_argument("--users", type=int, default=0, help="seeded sample of N evaluated users (default all)")
    sw.add_argument("--k", type=_positive_int, default=200, help="top-k (default 200)")
    sw.add_argument("--split", choices=("test", "valid"), default="test")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument(
        "--beam-ef0",
        type=_int_list,
        default=None,
        help="beam widths of layer 0 for beam (default 200,...,800)",
    )
    sw.add_argument(
        "--beam-t0",
        type=_int_list,
        default=None,
        help="most rounds T_0 on layer 0 for beam (default 1,2,3,5)",
    )
    sw.add_argument(
        "--hnsw-ef0", type=_int_list, default=None, help="ef of layer 0 for hnsw (default 200,...,1600)"
    )
    sw.add_argument(
        "--beam-upper",
        type=_int_lists,
        default=None,
        metavar="EF/EF,...",
        help="beam widths above layer 0, top-down, one setting per comma, e.g. 100/200,400/400 "
        "(default: the export's); each is combined with every --beam-ef0 and --beam-t0",
    )

    ex = sub.add_parser(
        "export",
        help="write ONE SavedModel: e_v + HNSW graph + scorer + Beam-retrieval",
        description="Reads model/, embeddings/ and index/ (python -m index_builder) and writes "
        "DIR/export/<next version>/, one SavedModel for both serving paths: its serving_default "
        "and retrieve signatures are stock TensorFlow ops that TF Serving loads, and retrieve_xla "
        "(the same walk with the scorer compiled by XLA) is what the in-process server runs. The "
        "values given here are the query defaults; the retrieve signatures take them per request.",
    )
    ex.add_argument("--workdir", required=True, help="a workdir with model/, embeddings/ and index/")
    ex.add_argument(
        "--start-layer",
        type=int,
        default=None,
        help="layer scored exhaustively to seed the walk (default: the highest layer with at "
        "least max(its ef, items/2000) nodes: layer 2 at 1.3M-4M items with M=32)",
    )
    ex.add_argument(
        "--k",
        type=_positive_int,
        default=None,
        help="default top-k (default 200; with DIR/tune, the tuned k)",
    )
    ex.add_argument(
        "--ef",
        type=_int_list,
        default=None,
        help="default beam widths, top-down to layer 0 (default 100,200,400, the paper's; with "
        "DIR/tune, the tuned ones)",
    )
    ex.add_argument(
        "--steps",
        type=_steps_list,
        default=None,
        help="default most rounds T per layer, top-down (default 1,0,5, or the tuned ones: layer 1 "
        "is not walked; the paper's is 1,1,3); "
        "each layer's loop stops early once no new item enters the beam; T 0 skips a layer's "
        "walk (its entry points go straight down), layer 0's T must be >= 1",
    )
    ex.add_argument(
        "--mode",
        choices=("beam", "beam_history"),
        default=None,
        help="default search mode (with DIR/tune, the tuned one): beam_history (default: "
        "every --history-stride-th start-layer node plus the user's own behaviours as entry points; "
        "with the default steps it holds "
        "the paper's beam 1,1,3 coverage for about 0.6x of its items on large corpora) or beam "
        "(the start layer scored whole, then the walk; the paper's); both are always available "
        "per request",
    )
    ex.add_argument(
        "--history-stride",
        type=int,
        default=None,
        help="beam_history scores every F-th start-layer node (default 2, or the tuned one); 0 skips "
        "the upper layers and starts from the behaviours alone",
    )
    ex.add_argument(
        "--score-split",
        type=_positive_int,
        default=2,
        help="the XLA signature (retrieve_xla, what the in-process server runs) scores each call "
        "as this many XLA calls over slices of the candidates (default 2): one XLA call runs on "
        "one thread, and TensorFlow runs independent calls side by side; 2 on 2 cores with one "
        "intra-op thread measured fastest (docs/parameters.md). retrieve, for TF Serving, is not split",
    )
    ex.add_argument(
        "--exact-below",
        type=int,
        default=None,
        help="filters: score a filter's allowed items exactly when every user of a call allows at "
        "most this many (times the walk's growth with selectivity); default: 2 x the items the "
        "default query scores, measured at export (docs/parameters.md, Filters)",
    )

    fe = sub.add_parser(
        "features",
        help="write the feature snapshot DIR/features/ that the server's stores load",
        description="Re-reads the interactions file the workdir was trained on and writes every "
        "user's most recent behaviours as original item ids, oldest first (users.npy, offsets.npy, "
        "items.npy; the schema is in its meta.json). The server's embedded store maps it; "
        "`python -m server.features load` copies it into Redis.",
    )
    fe.add_argument("--workdir", required=True, help="a trained workdir (dataset/ and model/)")
    fe.add_argument(
        "--max-behaviours",
        type=_positive_int,
        default=None,
        help="behaviours kept per user, the most recent (default: the model's --max-len)",
    )
    return parser


def _synthesize(args) -> int:
    from model_export.synthetic import synthesize

    try:
        summary = synthesize(
            args.items,
            args.users,
            args.out,
            categories=args.categories,
            seed=args.seed,
            mean_length=args.mean_length,
        )
    except ValueError as e:
        raise NannError(str(e)) from e
    logger.info("wrote %s: %s", args.out, json.dumps(summary, default=str))
    return 0


def _prepare_dataset(args):
    from model_export import data
    from nann_common import artifacts

    directory = Path(args.workdir) / "dataset"
    params = {
        "format": args.format,
        "min_behaviours": args.min_behaviours,
        "seed": args.seed,
        "skip_bad_rows": args.skip_bad_rows,
    }
    if directory.exists() and not args.restart:
        meta = artifacts.read_meta(directory, "dataset", verify=False)
        same_params = all(meta["params"].get(k) == v for k, v in params.items())
        if same_params and _same_inputs(args, meta["inputs"]):
            logger.info("reusing the prepared dataset in %s", directory)
            return data.load_dataset(directory)
        raise NannError(
            f"{directory} was prepared from another input or with other parameters; "
            "use another --workdir, or pass --restart to replace it"
        )
    dataset = data.load_dataset_from_file(
        args.interactions,
        args.format,
        min_behaviours=args.min_behaviours,
        seed=args.seed,
        skip_bad_rows=args.skip_bad_rows,
    )
    data.save_dataset(dataset, directory)
    return data.load_dataset(directory)


def _same_inputs(args, recorded: dict) -> bool:
    """True if the interactions named by the flags have the checksums recorded in a dataset's meta."""
    from nann_common.artifacts import sha256_file

    path = Path(args.interactions)
    ratings = path / "ratings.csv" if path.is_dir() else path
    current = {"sha256": ratings}
    if args.format == "movielens":
        current["movies_sha256"] = ratings.parent / "movies.csv"
    return all(p.is_file() and sha256_file(p) == recorded.get(key) for key, p in current.items())


def _train(args) -> int:
    from model_export.train import TrainConfig, train

    try:
        config = TrainConfig(
            arch=args.arch,
            epochs=args.epochs,
            batch_size=args.batch_size,
            negatives=args.negatives,
            fgsm_eps=args.fgsm_eps,
            fgsm_weight=args.fgsm_weight,
            fgsm_direction=args.fgsm_direction,
            learning_rate=args.lr,
            max_len=args.max_len,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            examples_per_epoch=args.examples_per_epoch,
            optimizer=args.optimizer,
        )
    except ValueError as e:
        raise NannError(str(e)) from e
    workdir = Path(args.workdir)
    created = not workdir.exists()
    try:
        dataset = _prepare_dataset(args)
        summary = train(dataset, workdir, config, restart=args.restart)
    except BaseException:
        if created and workdir.exists() and not any(workdir.iterdir()):
            workdir.rmdir()
        raise
    logger.info("training done: %s", json.dumps(summary))
    return 0


def _evaluate(args) -> int:
    from model_export.evaluate import EvalConfig, evaluate

    if args.filter_selectivity is not None:
        from model_export import filter_eval

        result = filter_eval.filter_study(
            args.workdir,
            args.filter_selectivity,
            exclude_history=args.exclude_history,
            users=args.users or 200,
            k=args.k,
            split=args.split,
            seed=args.seed,
        )
        folder = filter_eval.write(args.workdir, result)
        print(json.dumps(result) if args.json else filter_eval.markdown(result))
        logger.info("wrote %s/{result.json,table.md}", folder)
        return 0
    if args.exclude_history:
        raise NannError("--exclude-history goes with --filter-selectivity")

    mode = args.mode
    if mode == "default":
        from model_export.export import latest_export
        from nann_common.contract import load_contract

        mode = load_contract(latest_export(args.workdir), verify=False).default_mode
    config = EvalConfig(
        k=args.k,
        mode=mode,
        users=args.users,
        split=args.split,
        seed=args.seed,
        ef=args.ef,
        steps=args.steps,
    )
    result = evaluate(args.workdir, config)
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{key}={value}" for key, value in result.items()))
    return 0


def _sweep(args) -> int:
    from model_export.sweep import sweep

    sweep(
        args.workdir,
        args.out,
        users=args.users,
        k=args.k,
        split=args.split,
        seed=args.seed,
        beam_ef0=args.beam_ef0,
        beam_t0=args.beam_t0,
        hnsw_ef0=args.hnsw_ef0,
        beam_upper=args.beam_upper,
    )
    return 0


def _tune(args) -> int:
    from model_export.tune import DEFAULT_COVERAGE, tune

    coverage = args.coverage if args.coverage is not None or args.latency_ms is not None else DEFAULT_COVERAGE
    report = tune(
        args.workdir,
        coverage=coverage,
        latency_ms=args.latency_ms,
        users=args.users,
        test_users=args.test_users,
        k=args.k,
        seed=args.seed,
    )
    q, v, t = report["query"], report["validation"], report["test"]
    print(
        f"tuned: {q['mode']} stride {q['history_stride']} ef {','.join(map(str, q['ef']))} "
        f"T {','.join(map(str, q['steps']))}: coverage@{report['k']} {v['coverage']:.4f} on "
        f"{report['validation_users']} validation users, {t['coverage']:.4f} (lowest {t['lowest']:.3f}) "
        f"on {report['test_users']} test users, {t['scored']:.0f} items scored "
        f"({100 * t['scored'] / report['items']:.2f}% of the corpus); the built-in default query on the "
        f"same test users: {report['builtin']['coverage']:.4f} at {report['builtin']['scored']:.0f} items; "
        f"table in {args.workdir}/tune/"
    )
    return 0


def _export(args) -> int:
    import dataclasses

    from model_export.export import QUERY_FIELDS, default_config, export

    config = default_config(args.workdir)  # the tuned query defaults, if `tune` ran, else the built-in ones
    given = {name: getattr(args, name) for name in QUERY_FIELDS if getattr(args, name) is not None}
    if given:
        source = (
            "flags"
            if len(given) == len(QUERY_FIELDS)
            else f"{config.query_source}, flags for {', '.join(given)}"
        )
        config = dataclasses.replace(config, **given, query_source=source)
    config = dataclasses.replace(
        config, start_layer=args.start_layer, score_split=args.score_split, exact_below=args.exact_below
    )
    logger.info("query defaults from %s", config.query_source)
    print(export(args.workdir, config))
    return 0


def _features(args) -> int:
    from model_export.features import write_features

    print(write_features(args.workdir, args.max_behaviours))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handler = {
        "synthesize": _synthesize,
        "train": _train,
        "evaluate": _evaluate,
        "export": _export,
        "sweep": _sweep,
        "tune": _tune,
        "features": _features,
    }[args.command]
    try:
        return handler(args)
    except NannError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
