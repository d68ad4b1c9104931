"""``model_export tune``: the cheapest replayed query that meets a coverage target, checked on test
users it never saw, written where the next export takes it as its defaults."""

import csv
import json
import shutil

import pytest

from model_export import tune as tune_module
from model_export.export import ExportConfig, default_config
from nann_common.errors import ArtifactError, InputError


@pytest.fixture(scope="module")
def tuned(served_workdir, tmp_path_factory):
    """A copy of the shared workdir (tests must not write into it), tuned for coverage 0.95."""
    work = tmp_path_factory.mktemp("tune") / "work"
    for part in ("dataset", "model", "embeddings", "index"):
        shutil.copytree(served_workdir / part, work / part)
    report = tune_module.tune(work, coverage=0.95, users=60, test_users=60, k=50)
    return work, report


def test_the_choice_meets_the_target_on_validation_and_test_users(tuned):
    work, report = tuned
    v = report["validation"]
    assert v["coverage"] - tune_module.MARGIN_SE * v["coverage_se"] >= 0.95
    # Test users are held apart; the margin of two standard errors is what keeps them above it.
    assert report["test_meets_target"] and report["test"]["coverage"] >= 0.95, report["test"]
    assert report["test"]["scored"] < report["items"]


def test_the_choice_is_the_cheapest_query_that_meets_it(tuned):
    work, report = tuned
    with open(work / "tune" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    meeting = [r for r in rows if r["meets"] == "True"]
    assert meeting and len(meeting) < len(rows), "a target every query meets checks nothing"
    cheapest = min(float(r["scored"]) for r in meeting)
    assert report["validation"]["scored"] == pytest.approx(cheapest)
    assert (work / "tune" / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_next_export_takes_the_tuned_query_as_its_defaults(tuned):
    work, report = tuned
    config = default_config(work)
    q = report["query"]
    assert (config.mode, list(config.ef), list(config.steps), config.k) == (
        q["mode"],
        q["ef"],
        q["steps"],
        50,
    )
    assert config.history_stride == q["history_stride"] and config.query_source.startswith("tuned")


def test_an_untuned_workdir_exports_the_built_in_defaults(served_workdir):
    assert default_config(served_workdir) == ExportConfig()


def test_a_tuning_of_another_index_is_refused(tuned, tmp_path):
    work, _ = tuned
    other = tmp_path / "work"
    shutil.copytree(work, other)
    meta = json.loads((other / "index" / "meta.json").read_text())
    meta["files"]["graph.npz"]["sha256"] = "0" * 64  # another build: the index's digest changes
    (other / "index" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="tuned on another index"):
        default_config(other)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"coverage": 1.5}, "--coverage must be in"),
        ({"coverage": None, "latency_ms": None}, "give one target"),
        ({"coverage": 0.9, "latency_ms": 5.0}, "give one target"),
        ({"coverage": None, "latency_ms": -1.0}, "--latency-ms must be > 0"),
    ],
)
def test_bad_targets_are_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        tune_module.tune(tmp_path, **kwargs)


def test_an_unreachable_target_says_what_came_closest():
    rows = [
        {
            "candidate": tune_module.Candidate("beam", 1, (400,), (5,)),
            "coverage": 0.9,
            "coverage_se": 0.01,
            "scored": 10.0,
            "meets": False,
        },
    ]
    with pytest.raises(InputError, match="the best is beam ef 400 T 5 at 0.9000"):
        tune_module._choose(rows, 0.99, None)
