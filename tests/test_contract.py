"""The boundary the server stands on: the export's serving contract, the feature snapshot, the proto."""

from __future__ import annotations

import csv
import filecmp
import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from conftest import ROOT

from model_export.data import load_dataset
from nann_common import contract
from nann_common.errors import ArtifactError
from server import config as server_config


def test_export_meta_carries_everything_a_caller_needs(served_workdir):
    c = contract.latest_contract(served_workdir / "export")
    meta = json.loads((served_workdir / "export" / "1" / "meta.json").read_text())
    serving = meta["serving"]
    item_ids = np.load(served_workdir / "embeddings" / "item_ids.npy")
    assert c.version == 1 and c.num_items == len(item_ids)
    assert c.start_layer == 1 and c.default_ef == (20, 40) and c.default_steps == (0, 5) and c.default_k == 10
    assert c.default_mode == "beam_history" and c.has_xla_signature and 1 in c.xla_batches
    assert c.max_len == 50 and set(c.modes) == set(contract.MODES)
    assert c.layer_sizes[0] == len(item_ids)
    assert serving["signatures"]["retrieve"]["inputs"] == list(contract.RETRIEVE_INPUTS)
    assert serving["signatures"]["retrieve_xla"]["inputs"] == list(contract.RETRIEVE_INPUTS)
    for name in (contract.FILTER_SIGNATURE, contract.XLA_FILTER_SIGNATURE):
        assert serving["signatures"][name] == {
            "inputs": list(contract.RETRIEVE_INPUTS + contract.FILTER_INPUTS),
            "outputs": list(contract.RETRIEVE_OUTPUTS + contract.FILTER_OUTPUTS),
        }
    assert serving["signatures"]["serving_default"]["inputs"] == ["history"]
    # Filters: the category vocabulary (the dataset's labels, in dense order) and the planner's bound.
    assert c.has_filters and c.exact_below > 0
    assert c.category_labels() == [str(x) for x in load_dataset(served_workdir / "dataset").category_names]
    assert {"k", "ef", "steps", "history"} <= set(serving["bounds"])
    np.testing.assert_array_equal(c.item_ids(), item_ids)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"k": 41}, "k must be in 1..min(ef of layer 0, items) = 1..40, got 41"),
        ({"ef": (20,)}, "ef needs 2 values"),
        ({"steps": (1, 0)}, "and layer 0's (the last) >= 1, got 1,0"),
        ({"steps": (-1, 1)}, "every steps value must be >= 0"),
        ({"mode": "greedy"}, "mode must be one of"),
    ],
)
def test_contract_rejects_what_the_signature_would(served_workdir, kwargs, message):
    c = contract.latest_contract(served_workdir / "export")
    with pytest.raises(contract.InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        c.resolve(**kwargs)


def test_contract_fills_defaults(served_workdir):
    q = contract.latest_contract(served_workdir / "export").resolve()
    assert (q.k, q.ef, q.steps, q.mode) == (10, (20, 40), (0, 5), "beam_history")


def test_the_default_mode_is_the_exports(served_workdir):
    meta = json.loads((served_workdir / "export" / "1" / "meta.json").read_text())
    path = served_workdir / "export" / "1"
    meta["serving"]["defaults"]["mode"] = "hnsw"
    assert contract.ServingContract.from_meta(path, meta).resolve().mode == "hnsw"
    assert contract.ServingContract.from_meta(path, meta).resolve(mode="beam").mode == "beam"
    del meta["serving"]["defaults"]["mode"]  # an export from before modes had a default
    assert contract.ServingContract.from_meta(path, meta).resolve().mode == "beam"


def test_a_base_directory_without_versions_says_how_to_make_one(tmp_path):
    with pytest.raises(ArtifactError, match="model_export export"):
        contract.latest_contract(tmp_path)


def test_feature_snapshot_holds_every_user_of_the_file_oldest_first(served_workdir):
    """Checked against the interactions CSV itself, not against the loader that wrote it."""
    source = json.loads((served_workdir / "dataset" / "meta.json").read_text())["inputs"]["file"]
    rows = defaultdict(list)
    with open(source) as f:
        for n, (user, item, _cat, _beh, ts) in enumerate(csv.reader(f)):
            rows[int(user)].append((int(ts), n, int(item)))
    d = served_workdir / "features"
    users, offsets, items = (np.load(d / f"{x}.npy") for x in ("users", "offsets", "items"))
    meta = json.loads((d / "meta.json").read_text())
    cap = meta["params"]["max_behaviours"]
    assert users.tolist() == sorted(rows)
    for i, user in enumerate(users.tolist()):
        expect = [item for _, _, item in sorted(rows[user])][-cap:]
        assert items[offsets[i] : offsets[i + 1]].tolist() == expect, user
    assert set(meta["schema"]) == {"users.npy", "offsets.npy", "items.npy"}


def test_generated_proto_code_matches_the_proto(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "no code generated"
    for rel in generated:
        assert filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False), (
            f"{rel} differs from the proto; run `python proto/generate.py` and commit"
        )


def test_settings_come_from_flags_then_environment_then_defaults(tmp_path):
    env = {"NANN_PORT": "6000", "NANN_MAX_K": "300", "NANN_ALLOW_EXHAUSTIVE": "true"}
    c = server_config.load_config(["--model", str(tmp_path), "--port", "7000"], env)
    assert c.port == 7000 and c.max_k == 300 and c.allow_exhaustive is True
    assert c.features_spec == f"embedded:{tmp_path.parent / 'features'}"
    assert c.host == "127.0.0.1" and c.chunk_size == 200
    # The measured best for a loaded server, with no flag to know: the XLA signature, one intra-op thread.
    assert c.scorer == "auto" and c.intra_op_threads == 1


@pytest.mark.parametrize(
    "argv,env,message",
    [
        ([], {}, "--model (or NANN_MODEL) is required"),
        (["--model", "m", "--backend", "tfs"], {}, "--backend must be inprocess or tfserving://"),
        (["--model", "m", "--features", "s3://x"], {}, "--features must be embedded:DIR or redis://"),
        (["--model", "m"], {"NANN_WORKERS": "many"}, "NANN_WORKERS='many' is not a valid int"),
        (["--model", "m", "--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
        (["--model", "m", "--max-k", "0"], {}, "--max-k must be >= 1"),
        (["--model", "m", "--scorer", "fast"], {}, "--scorer must be auto, xla or stock"),
    ],
)
def test_bad_settings_name_the_flag(argv, env, message):
    with pytest.raises(server_config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        server_config.load_config(argv, env)


def test_the_in_process_backend_runs_the_xla_signature_unless_told_or_unable(served_workdir):
    import dataclasses

    from nann_common.errors import NannError
    from server.backends import InProcessBackend
    from server.metrics import Metrics

    current = contract.latest_contract(served_workdir / "export")
    older = dataclasses.replace(current, xla_batches=())  # an export from before retrieve_xla

    def signature(scorer, c):
        return InProcessBackend(served_workdir / "export", Metrics(), scorer=scorer)._signature(c)

    assert signature("auto", current) == contract.XLA_SIGNATURE
    assert signature("stock", current) == contract.RETRIEVE_SIGNATURE
    assert signature("auto", older) == contract.RETRIEVE_SIGNATURE
    with pytest.raises(NannError, match="--scorer stock"):
        signature("xla", older)
