"""Checks of deploy/: the Prometheus rules and the Grafana dashboard use only metrics the real
server exports (scraped after one Retrieve call), promtool accepts the configuration, the rules
and their unit tests, the dashboard has its panels, and the Kubernetes manifests hang together.

PyYAML is not a dependency of the project, so the rule files are read with a small extractor
for the subset of YAML they use; where PyYAML is installed, the extractor is checked against it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RECORDING_RULES = PROMETHEUS / "recording_rules.yml"
ALERT_RULES = PROMETHEUS / "alert_rules.yml"
RULE_FILES = (RECORDING_RULES, ALERT_RULES)
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "nann-retrieval.json"
K8S = DEPLOY / "k8s"

SERVICE = "nann.retrieval.v1.Retriever"
PANELS = {
    "qps": "Retrieve QPS",
    "latency": "Retrieve latency p50 / p99",
    "stages": "Stage latency (mean)",
    "items": "Items scored per request",
    "codes": "Responses by gRPC code",
    "errors": "Error ratio",
    "in_flight": "In-flight requests",
    "version": "Model version",
}
# Labels Prometheus attaches to every scraped series, not the server.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


# --- reading the files ------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rule_entries(path: Path) -> list[tuple[str, str]]:
    """``(key, value)`` for every ``record:``, ``alert:`` and ``expr:`` of a rule file, in order.

    Handles the YAML these files use: one-line plain or quoted values, and ``|`` / ``>`` block
    scalars (whose lines are kept as they are; PromQL does not care about line breaks).
    """
    lines = path.read_text().splitlines()
    entries = []
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(?:-\s+)?(record|alert|expr):\s*(.*?)\s*$", lines[i])
        i += 1
        if not m:
            continue
        key, rest = m.group(1), m.group(2)
        if re.fullmatch(r"[|>][+-]?(\s+#.*)?", rest):
            column = m.start(1)
            block = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > column):
                block.append(lines[i].strip())
                i += 1
            value = "\n".join(block).strip()
        else:
            value = rest
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
        entries.append((key, value))
    return entries


def rule_exprs(path: Path) -> list[str]:
    return [value for key, value in rule_entries(path) if key == "expr"]


def recorded_names() -> set[str]:
    return {value for key, value in rule_entries(RECORDING_RULES) if key == "record"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries ($__rate_interval too)
    # Grouping clauses go entirely, so that `sum by (job) (...)` reads as a call of sum.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # dashboard variables
    names = set()
    for m in re.finditer(r"(?<![\w:.])[a-zA-Z_:][\w:]*", text):
        if text[m.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if m.group(0).lower() not in _PROMQL_WORDS:
            names.add(m.group(0))
    return names


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """``(metric, label, operator, value)`` for every label matcher written after a metric name."""
    found = []
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(2)):
            found.append((m.group(1), label, op, value))
    return found


def all_exprs() -> list[tuple[str, str]]:
    """``(where, expr)`` for every rule expression and every dashboard query."""
    out = [(path.name, expr) for path in RULE_FILES for expr in rule_exprs(path)]
    board = dashboard()
    for p in board["panels"]:
        out += [(f"panel {p['title']!r}", t["expr"]) for t in p.get("targets", []) if t.get("expr")]
    return out


def scrape(text: str) -> tuple[set[str], dict[str, list]]:
    """Series names the exposition allows (by family type) and the samples by series name."""
    from prometheus_client.parser import text_string_to_metric_families

    allowed, samples = set(), {}
    for family in text_string_to_metric_families(text):
        allowed.update(family.name + s for s in _SERIES_SUFFIXES.get(family.type, ("",)))
        for sample in family.samples:
            allowed.add(sample.name)
            samples.setdefault(sample.name, []).append(sample)
    return allowed, samples


# --- the metric contract, against the real server ---------------------------------------------


@pytest.mark.e2e
def test_rules_and_dashboard_use_only_metrics_the_server_exports(served_workdir, start_server):
    import grpc
    import numpy as np

    from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

    server = start_server("--model", str(served_workdir / "export"))
    user = str(int(np.load(served_workdir / "features" / "users.npy")[0]))
    with grpc.insecure_channel(server.target) as channel:
        stub = retrieval_pb2_grpc.RetrieverStub(channel)
        call = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, k=5), timeout=60)
        candidates = [c for message in call for c in message.candidates]
        assert call.code() == grpc.StatusCode.OK
    assert candidates
    allowed, samples = scrape(server.metrics_text())

    recorded = recorded_names()
    unknown = []
    for where, expr in all_exprs():
        for name in sorted(metric_names(expr)):
            if name in allowed or name in recorded or name.startswith(":tensorflow:"):
                continue
            unknown.append(f"{where}: {name} (in {' '.join(expr.split())})")
    assert not unknown, "metrics neither exported by the server nor recorded:\n" + "\n".join(unknown)

    # Label names in matchers exist on the series (where the scrape has samples to tell).
    wrong_labels = []
    for where, expr in all_exprs():
        for metric, label, _, _ in matchers(expr):
            seen = samples.get(metric)
            if seen and label not in TARGET_LABELS and all(label not in s.labels for s in seen):
                wrong_labels.append(f"{where}: {metric} has no label {label!r}")
    assert not wrong_labels, "\n".join(wrong_labels)

    # The Retrieve call is labelled the way the rules select it, with the code's name.
    handled = samples["grpc_server_handled_total"]
    retrieve = [s for s in handled if s.labels["grpc_method"] == "Retrieve"]
    assert {s.labels["grpc_service"] for s in retrieve} == {SERVICE}
    assert any(s.labels["grpc_code"] == "OK" and s.value >= 1 for s in retrieve)
    for where, expr in all_exprs():
        for _, label, op, value in matchers(expr):
            if label == "grpc_service" and op == "=":
                assert value == SERVICE, f"{where}: grpc_service={value!r}"
            if label == "grpc_method" and op == "=":
                assert value == "Retrieve", f"{where}: grpc_method={value!r}"
    # Every stage the dashboard splits by has been observed, and the Table 1 gauges are set.
    assert {s.labels["stage"] for s in samples["nann_stage_seconds_count"]} >= {
        "feature_fetch",
        "model_call",
        "stream_write",
    }
    assert {s.labels["marking"] for s in samples["nann_table1_baseline_qps"]} == {"bitmap", "raw_set_ops"}
    assert samples["nann_model_ready"][0].value == 1


def test_metric_name_extraction():
    expr = (
        "histogram_quantile(0.99, sum by (job, le) ("
        'rate(grpc_server_handling_seconds_bucket{grpc_method="Retrieve", le=~"0.1|1e-3"}[5m] offset 1h)'
        ")) > 0.050 and on (job) nann:retrieve_qps:rate5m > 1e-3"
        " or absent(nann_model_ready) unless x_total[$__rate_interval]"
    )
    assert metric_names(expr) == {
        "grpc_server_handling_seconds_bucket",
        "nann:retrieve_qps:rate5m",
        "nann_model_ready",
        "x_total",
    }
    assert matchers(expr)[0] == ("grpc_server_handling_seconds_bucket", "grpc_method", "=", "Retrieve")


def test_rule_files_have_the_expected_rules():
    recorded = recorded_names()
    assert recorded, "no recording rules found"
    for name in recorded:  # level:metric:operations
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name
    for name in (
        "nann:retrieve_qps:rate1m",
        "nann:retrieve_latency_seconds:p50_rate1m",
        "nann:retrieve_latency_seconds:p99_rate1m",
        "nann:retrieve_server_errors:ratio_rate5m",
        "nann:retrieve_errors:ratio_rate5m",
        "nann:items_scored_per_request:mean_rate1m",
        "nann:stage_seconds:mean_rate1m",
    ):
        assert name in recorded
    alerts = [value for key, value in rule_entries(ALERT_RULES) if key == "alert"]
    assert len(alerts) == len(rule_exprs(ALERT_RULES)) >= 5
    text = ALERT_RULES.read_text()
    # Every alert carries a severity and both annotations.
    for key in ("severity", "summary", "description"):
        assert len(re.findall(rf"^\s+{key}:", text, re.M)) == len(alerts), key
    server_errors = " ".join(rule_exprs(RECORDING_RULES))
    for code in ("UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"):
        assert code in server_errors
    assert "NOT_FOUND" not in server_errors and "INVALID_ARGUMENT" not in server_errors


def test_rule_extraction_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: the extractor is checked where it is")
    for path in RULE_FILES:
        parsed = [
            (key, rule[key])
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]
            for key in ("record", "alert", "expr")
            if key in rule
        ]

        def norm(entries):
            return [(k, " ".join(str(v).split())) for k, v in entries]

        assert norm(rule_entries(path)) == norm(parsed), path.name


# --- promtool ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_promtool_accepts_config_rules_and_rule_tests():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian/Ubuntu package: prometheus)")
    rules = [p.name for p in RULE_FILES]
    commands = (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", *rules],
        ["test", "rules", "rules_test.yml"],
    )
    for args in commands:
        result = subprocess.run(
            [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


# --- Grafana -------------------------------------------------------------------------------------


def test_dashboard_has_its_panels():
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = {p["title"]: p for p in board["panels"]}
    assert set(PANELS.values()) <= set(panels), sorted(panels)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in board["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])

    def exprs(key):
        return " ".join(t["expr"] for t in panels[PANELS[key]]["targets"])

    assert "nann_table1_baseline_qps" in exprs("qps")
    assert "nann_table1_baseline_latency_seconds" in exprs("latency")
    assert "p50" in exprs("latency") and "p99" in exprs("latency")
    assert re.search(r"by \(grpc_code\)", exprs("codes"))
    assert "nann_in_flight_requests" in exprs("in_flight")
    assert "nann_model_version_info" in exprs("version")
    assert "stage_seconds" in exprs("stages")
    assert "items_scored" in exprs("items")

    # The latency panel's threshold line is the alert's objective.
    objective = re.search(r"p99_rate5m\s*>\s*([0-9.]+)", ALERT_RULES.read_text())
    assert objective
    steps = panels[PANELS["latency"]]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert float(objective.group(1)) in [s["value"] for s in steps]


def test_grafana_provisioning():
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s*url:\s*http://prometheus:9090\s*$", datasource, re.M)
    assert re.search(r"^\s*type:\s*prometheus\s*$", datasource, re.M)
    providers = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text()
    assert re.search(r"^\s*path:\s*/var/lib/grafana/dashboards\s*$", providers, re.M)
    assert re.search(r"^\s*type:\s*file\s*$", providers, re.M)


# --- Kubernetes ----------------------------------------------------------------------------------


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kustomization_lists_every_manifest():
    text = (K8S / "kustomization.yaml").read_text()
    resources = text.split("resources:", 1)[1]
    listed = set(re.findall(r"^\s*-\s+(\S+\.ya?ml)\s*$", resources, re.M))
    assert listed == {p.name for p in k8s_manifests()}


def test_termination_grace_exceeds_the_drain():
    deployment = (K8S / "deployment.yaml").read_text()
    configmap = (K8S / "configmap.yaml").read_text()
    grace_period = re.search(r"^\s*terminationGracePeriodSeconds:\s*(\d+)\s*$", deployment, re.M)
    drain = re.search(r"^\s*NANN_GRACE_S:\s*\"?([0-9.]+)\"?\s*$", configmap, re.M)
    assert grace_period and drain
    pre_stop = re.search(r"time\.sleep\(([0-9.]+)\)", deployment)  # the preStop pause, if any
    pause = float(pre_stop.group(1)) if pre_stop else 0.0
    assert int(grace_period.group(1)) > float(drain.group(1)) + pause


def test_k8s_manifests_parse_and_fit_together():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: the manifests' structure is not parsed")
    docs = [doc for path in k8s_manifests() for doc in yaml.safe_load_all(path.read_text()) if doc]
    by_kind = {}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        by_kind.setdefault(doc["kind"], []).append(doc)
    yaml.safe_load((K8S / "kustomization.yaml").read_text())

    (deployment,) = by_kind["Deployment"]
    (configmap,) = by_kind["ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["terminationGracePeriodSeconds"] > float(configmap["data"]["NANN_GRACE_S"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["image"] == "nann-retrieval:latest"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NANN_HOST"] == "0.0.0.0" and env["NANN_MODEL"] == "/models/nann/export"
    assert {r["configMapRef"]["name"] for r in container["envFrom"]} == {configmap["metadata"]["name"]}
    assert all(k.startswith("NANN_") for k in configmap["data"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9100}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert resources["limits"] == {"cpu": "2", "memory": "6Gi"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9100"

    # The model volume: the claim exists, is ReadOnlyMany, and ends up under NANN_MODEL.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"nann-models"}
    (pvc,) = by_kind["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "nann-models" and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    model_mount = next(
        m for m in container["volumeMounts"] if env["NANN_MODEL"].startswith(m["mountPath"].rstrip("/") + "/")
    )
    if "persistentVolumeClaim" not in volumes[model_mount["name"]]:  # copied by an init container
        init_mounts = {m["name"] for c in pod.get("initContainers", []) for m in c["volumeMounts"]}
        claim_volumes = {name for name, v in volumes.items() if "persistentVolumeClaim" in v}
        assert {model_mount["name"], *claim_volumes} <= init_mounts

    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    headless = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and headless[0]["spec"]["ports"][0]["port"] == 50051
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()

    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    (pdb,) = by_kind["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.e2e
def test_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH (it builds kustomizations offline: kubectl kustomize)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = re.findall(r"^kind:\s*(\S+)\s*$", result.stdout, re.M)
    assert sorted(kinds) == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
            "Service",
        ]
    )


@pytest.mark.e2e
def test_k8s_manifests_validate_against_the_api_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    version = kv.latest_version()
    docs = [doc for path in k8s_manifests() for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises on a schema violation or an unknown field
    # The validator does catch a mistake: a misspelt field and a wrong type.
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)


# --- docker-compose, Dockerfile, TF Serving ------------------------------------------------------

COMPOSE = ROOT / "docker-compose.yml"
TFSERVING = DEPLOY / "tfserving"


@pytest.mark.e2e
def test_docker_compose_validates():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not on PATH (Debian package docker-compose)")
    for profile in ([], ["--profile", "tfserving"]):
        result = subprocess.run(
            [compose, "-f", str(COMPOSE), *profile, "config", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr


def test_compose_services_fit_together():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {
        "init",
        "redis",
        "features-loader",
        "retrieval",
        "tfserving",
        "prometheus",
        "grafana",
        "locust",
    }
    retrieval = services["retrieval"]
    model = retrieval["environment"]["NANN_MODEL"]
    assert retrieval["build"]["target"] == "runtime" and "50051:50051" in retrieval["ports"]
    assert retrieval["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "inprocess" in retrieval["environment"]["NANN_BACKEND"]
    # The init service builds exactly where the server, the loader, TF Serving and locust look.
    assert "--build-only" in services["init"]["command"]
    root = services["init"]["command"][services["init"]["command"].index("--root") + 1]
    assert model == f"{root}/work/export"
    assert f"{root}/work/features" in services["features-loader"]["command"]
    assert services["locust"]["environment"]["NANN_LOADTEST_FEATURES"] == f"{root}/work/features"
    assert services["locust"]["command"][:2] == ["--host", "retrieval:50051"]
    assert services["locust"]["depends_on"]["retrieval"]["condition"] == "service_healthy"
    # TF Serving: an optional profile, on the same export, with every config file it names.
    tfs = services["tfserving"]
    assert tfs["profiles"] == ["tfserving"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in tfs["command"])
    assert flags["enable_model_warmup"] == "true" and flags["enable_batching"] == "true"
    assert "./deploy/tfserving:/config:ro" in tfs["volumes"]
    for key in ("model_config_file", "monitoring_config_file", "batching_parameters_file"):
        assert (TFSERVING / Path(flags[key]).name).is_file(), key
    models_config = (TFSERVING / "models.config").read_text()
    assert re.search(rf'base_path:\s*"{re.escape(model)}"', models_config)
    assert re.search(r"latest\s*\{\s*num_versions:\s*1\s*\}", models_config)
    assert re.search(r'name:\s*"nann"', models_config)
    assert 'path: "/monitoring/prometheus/metrics"' in (TFSERVING / "monitoring.config").read_text()
    # Prometheus and Grafana get the deploy/ files these tests check.
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    prometheus = (PROMETHEUS / "prometheus.yml").read_text()
    assert '"retrieval:9100"' in prometheus and '"tfserving:8501"' in prometheus


def test_tfserving_batches_fit_the_warmup_records():
    from model_export.export import WARMUP_BATCHES

    batching = (TFSERVING / "batching.config").read_text()
    max_batch = int(re.search(r"max_batch_size\s*\{\s*value:\s*(\d+)", batching).group(1))
    assert max_batch == max(
        batch for batch, _ in WARMUP_BATCHES
    )  # every batch shape TF Serving forms is warm


def test_dockerfile_runtime_stage():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    stages = {name: base for base, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)}
    assert set(stages) >= {"deps-server", "runtime", "loadtest", "trainer"}
    runtime = text.split("AS runtime", 1)[1]
    assert text.rstrip().endswith(runtime.rstrip())  # runtime is the last stage: the default target
    assert "COPY --from=deps-server /opt/venv /opt/venv" in runtime
    assert "deps-full" not in runtime and "model_export" not in runtime  # no training code or packages
    assert re.search(r"^USER nann$", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*\n\s*CMD \[\"python\", \"-m\", \"server.healthcheck\"\]", runtime, re.M)
    assert "NANN_HOST=0.0.0.0" in runtime and 'VOLUME ["/models"]' in runtime
    requirements = (ROOT / "requirements-server.txt").read_text()
    for package in ("hnswlib", "pandas", "matplotlib", "pytest", "ruff", "locust"):
        assert not re.search(rf"^{package}==", requirements, re.M | re.I), package
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # allow-list: runs/, .venv and .git stay out
    assert not any(line.startswith(("!runs", "!.venv", "!.git", "!benchmarks")) for line in ignore)


def test_dockerignore_lets_in_every_copied_path():
    # The allow-list must name every path a COPY takes from the build context: a missing entry
    # fails only at `docker build` (the trainer image once lacked walk/).
    import fnmatch

    ignore = (ROOT / ".dockerignore").read_text().split()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    text = (ROOT / "Dockerfile").read_text()
    copied = [s for group in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M) for s in group.split()]
    assert "walk/" in copied
    for source in copied:
        source = re.sub(r"\[(.)\]", r"\1", source).rstrip("/")  # the optional CA bundle's glob
        assert any(fnmatch.fnmatch(source, a) for a in allowed), f"{source}: COPYed, not let in"
