"""k8s/: RayService manifests against KubeRay's CRD (made strict), Serve's schemas and ServerConfig;
the Dockerfile against pyproject's Ray pin; the Grafana dashboard against the metrics moray exports.

Oracles: the KubeRay v1.7.0 RayService CRD (a verbatim copy beside this file), KubeRay's own validation
rules (ray-operator/controllers/ray/utils/validation.go), Ray Serve's `ServeDeploySchema` and
`AutoscalingConfig`, Ray's installed sources for Serve's metric names, and a PromQL parser.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import re
import types
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import ray
import tomllib
import yaml
from jsonschema import Draft4Validator
from promql_parser import VectorSelector
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from moray.deploy.api.grpc import SERVICER_FUNCTION
from moray.deploy.serve.config import ServerConfig
from moray.deploy.serve.metrics import METRICS, exported_names

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD = Path(__file__).with_name("ray.io_rayservices.yaml")
SHARED_CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
DASHBOARD = K8S / "grafana" / "moray.json"
GPU = "nvidia.com/gpu"
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # KubeRay's RayServiceUpgradeType
MAX_RAYSERVICE_NAME = 47  # KubeRay utils.MaxRayServiceNameLength (53 - 6)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Standard Ray Serve metrics the dashboard may query besides moray's own; each is checked to exist in
# the installed Ray, under the name Ray exports (prefix `ray_`, like moray's).
SERVE_METRICS = {
    "ray_serve_deployment_replica_healthy": "healthy replicas per deployment, beside moray_shard_replicas",
}


# ---------------------------------------------------------------- loading


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rayservices() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml_docs(path) if doc.get("kind") == "RayService"]
    return found


SERVICES = rayservices()
SERVICE_IDS = [name for name, _ in SERVICES]


def by_file(name: str) -> dict[str, Any]:
    return next(doc for file, doc in SERVICES if file == name)


def make_strict(schema: Any) -> None:
    """Reject unknown fields, as the API server does: `additionalProperties: false` where unset."""
    if not isinstance(schema, dict):
        return
    if "properties" in schema:
        schema.setdefault("additionalProperties", False)
        for sub in schema["properties"].values():
            make_strict(sub)
    for key in ("items", "additionalProperties", "not"):
        make_strict(schema.get(key))
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            make_strict(sub)


@functools.cache
def strict_validator() -> Draft4Validator:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    make_strict(schema)
    Draft4Validator.check_schema(schema)
    return Draft4Validator(schema)


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    errors = strict_validator().iter_errors(manifest)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def serve_config(manifest: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    return config


def applications(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    apps: list[dict[str, Any]] = serve_config(manifest)["applications"]
    return apps


def cluster(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["rayClusterConfig"]
    return spec


def groups(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The head group, then every worker group."""
    return [cluster(manifest)["headGroupSpec"], *cluster(manifest)["workerGroupSpecs"]]


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = group["template"]["spec"]["containers"]
    return found


def gpus(group: dict[str, Any]) -> int:
    """GPUs a pod of this group gets (limits), after checking requests agree."""
    total = 0
    for c in containers(group):
        resources = c.get("resources", {})
        limit = int(resources.get("limits", {}).get(GPU, 0))
        assert int(resources.get("requests", {}).get(GPU, limit)) == limit, c["name"]
        total += limit
    return total


def cpus(group: dict[str, Any]) -> float:
    return sum(float(c["resources"]["limits"]["cpu"]) for c in containers(group))


def server_config(manifest: dict[str, Any]) -> ServerConfig:
    (app,) = applications(manifest)
    return ServerConfig(**app.get("args", {}))


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MORAY_API_KEY", raising=False)


# ---------------------------------------------------------------- the CRD


def test_both_manifests_are_found() -> None:
    assert {"rayservice-mixtral-8x7b.yaml", "rayservice-tiny.yaml"} <= set(SERVICE_IDS)


def test_crd_copy_is_verbatim() -> None:
    if not SHARED_CRD.exists():
        pytest.skip("../shared/kuberay is not beside this checkout (CI)")
    assert CRD.read_bytes() == SHARED_CRD.read_bytes()


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_validates_against_strict_crd(file: str, manifest: dict[str, Any]) -> None:
    assert crd_errors(manifest) == []


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _drop(doc: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return doc


HEAD = ("spec", "rayClusterConfig", "headGroupSpec")
WORKER = ("spec", "rayClusterConfig", "workerGroupSpecs", 0)


@pytest.mark.parametrize(
    "broken",
    [
        lambda m: _set(m, ("spec", "serveConfigv2"), "applications: []"),  # typo'd key
        lambda m: _set(m, (*HEAD, "rayStartParam"), {}),
        lambda m: _set(m, (*WORKER, "minReplica"), 1),
        lambda m: _set(m, (*WORKER, "template", "spec", "containers", 0, "resource"), {}),
        lambda m: _set(m, (*HEAD, "template", "spec", "containers", 0, "ports", 0, "containerport"), 1),
        lambda m: _set(m, (*HEAD, "rayStartParams", "num-gpus"), 0),  # not a string
        lambda m: _drop(m, (*WORKER, "maxReplicas")),  # required
        lambda m: _set(m, ("spec", "serveConfigV2"), {"applications": []}),  # must be a string
    ],
    ids=["spec-typo", "head-typo", "worker-typo", "container-typo", "port-typo", "int-param",
         "no-max", "config-not-string"],
)
def test_strict_crd_rejects_broken_manifests(broken: Any) -> None:
    manifest = by_file("rayservice-tiny.yaml")
    assert crd_errors(manifest) == []
    assert crd_errors(broken(manifest)) != []


# ---------------------------------------------------------------- KubeRay's own rules


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_kuberay_rules(file: str, manifest: dict[str, Any]) -> None:
    name = manifest["metadata"]["name"]
    assert len(name) <= MAX_RAYSERVICE_NAME and DNS1035.match(name), name
    strategy = manifest["spec"].get("upgradeStrategy")
    if strategy is not None:
        assert strategy["type"] in UPGRADE_TYPES
        if strategy["type"] == "NewClusterWithIncrementalUpgrade":
            assert cluster(manifest).get("enableInTreeAutoscaling") and strategy.get("clusterUpgradeOptions")
    for group in groups(manifest):
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), params
        assert "labels" not in params  # KubeRay: use the group's `labels` field instead
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params))
        assert containers(group), "every group needs a container"
    assert cluster(manifest)["rayVersion"] == pinned_ray_version()


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_worker_group_replica_bounds(file: str, manifest: dict[str, Any]) -> None:
    for group in cluster(manifest)["workerGroupSpecs"]:
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high, group["groupName"]


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_ports_agree_with_serve_config(file: str, manifest: dict[str, Any]) -> None:
    config = serve_config(manifest)
    head_ports = {p["name"]: p["containerPort"] for p in containers(groups(manifest)[0])[0]["ports"]}
    assert head_ports["serve"] == config["http_options"]["port"] == 8000  # KubeRay's readiness probe port
    assert head_ports["serve-grpc"] == config["grpc_options"]["port"]
    assert head_ports["dashboard"] == 8265
    for group in groups(manifest):
        metrics_port = group["rayStartParams"].get("metrics-export-port", "8080")
        ports = {p["name"]: p["containerPort"] for p in containers(group)[0]["ports"]}
        assert ports["metrics"] == int(metrics_port) == 8080
    images = {c["image"] for g in groups(manifest) for c in containers(g)}
    assert len(images) == 1, f"one image for head and workers, got {images}"


# ---------------------------------------------------------------- serveConfigV2


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_serve_config_parses(file: str, manifest: dict[str, Any]) -> None:
    raw = serve_config(manifest)
    ServeDeploySchema.model_validate(raw)
    # Serve ignores unknown keys (forward compatibility); a typo there would go unnoticed, so check.
    assert set(raw) <= set(ServeDeploySchema.model_fields)
    for app in raw["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields)
        for deployment in app.get("deployments", []):
            assert set(deployment) <= set(DeploymentSchema.model_fields)


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_import_path_resolves_to_an_app_builder(file: str, manifest: dict[str, Any]) -> None:
    for app in applications(manifest):
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        # Serve's rule (call_user_app_builder_with_args_if_necessary): a function of exactly one parameter.
        assert isinstance(builder, types.FunctionType)
        assert len(inspect.signature(builder).parameters) == 1


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_grpc_servicer_functions_resolve(file: str, manifest: dict[str, Any]) -> None:
    functions = serve_config(manifest)["grpc_options"]["grpc_servicer_functions"]
    assert functions
    for path in functions:
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_args_are_a_server_config(file: str, manifest: dict[str, Any]) -> None:
    (app,) = applications(manifest)
    config = ServerConfig(**app["args"])
    raw = serve_config(manifest)
    assert config.app_name == app["name"]
    assert config.port == raw["http_options"]["port"] and config.grpc_port == raw["grpc_options"]["port"]
    assert config.host == raw["http_options"]["host"] == "0.0.0.0"  # pods must listen beyond localhost


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_exposed_apis_require_the_key_from_a_secret(file: str, manifest: dict[str, Any]) -> None:
    """Listening on the pod's address (0.0.0.0) is safe only with an API key: every container reads it
    from the Secret, which is not optional (a pod does not start without it)."""
    for group in groups(manifest):
        for container in containers(group):
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env["MORAY_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("moray-api-key", "api-key") and not ref.get("optional")
    assert serve_config(manifest)["grpc_options"]["grpc_servicer_functions"] == [SERVICER_FUNCTION]


@pytest.mark.parametrize(("file", "manifest"), SERVICES, ids=SERVICE_IDS)
def test_autoscaling_parses_with_serve(file: str, manifest: dict[str, Any]) -> None:
    for app in applications(manifest):
        for deployment in app.get("deployments", []):
            if deployment.get("autoscaling_config"):
                AutoscalingConfig(**deployment["autoscaling_config"])
    config = server_config(manifest)
    if config.autoscaling:
        AutoscalingConfig(min_replicas=config.shard_min_replicas, max_replicas=config.shard_max_replicas,
                          upscale_delay_s=config.upscale_delay_s, downscale_delay_s=config.downscale_delay_s)
        AutoscalingConfig(min_replicas=1, initial_replicas=config.dispatcher_replicas,
                          max_replicas=config.dispatcher_max_replicas)


# ---------------------------------------------------------------- hardware


def test_gpu_manifest_requests_gpus_for_experts_not_head() -> None:
    manifest = by_file("rayservice-mixtral-8x7b.yaml")
    head, *workers = groups(manifest)
    assert gpus(head) == 0 and head["rayStartParams"]["num-gpus"] == "0"
    roles = {g["labels"]["moray.io/role"]: g for g in workers}
    assert gpus(roles["expert-shard"]) > 0 and gpus(roles["dispatcher"]) > 0
    for group in workers:
        tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
        assert GPU in tolerated, group["groupName"]
    config = server_config(manifest)
    assert config.resolved_device() == "cuda" and config.dtype == "bfloat16"
    # One GPU per dispatcher replica and per shard replica (DESIGN.md): the groups must hold them all.
    at_min = sum(g["minReplicas"] * gpus(g) for g in workers)
    at_max = sum(g["maxReplicas"] * gpus(g) for g in workers)
    assert at_min >= config.num_shards * config.shard_min_replicas + config.dispatcher_replicas
    assert at_max >= config.num_shards * config.shard_max_replicas + config.dispatcher_max_replicas


def test_tiny_manifest_is_cpu_only_and_fits() -> None:
    manifest = by_file("rayservice-tiny.yaml")
    assert all(gpus(g) == 0 for g in groups(manifest))
    config = server_config(manifest)
    assert config.model is None and config.resolved_device() == "cpu"
    need = config.num_shards * config.shard_cpus + config.dispatcher_replicas * config.dispatcher_cpus
    assert sum(cpus(g) * g.get("minReplicas", 1) for g in groups(manifest)) >= need + 1  # + ingress, Serve


def test_weights_come_from_the_read_only_claim_the_job_fills() -> None:
    manifest = by_file("rayservice-mixtral-8x7b.yaml")
    model = Path(server_config(manifest).model or "")
    weights = yaml_docs(K8S / "mixtral-weights.yaml")
    claims = {d["metadata"]["name"] for d in weights if d["kind"] == "PersistentVolumeClaim"}
    for group in groups(manifest):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in containers(group)[0]["volumeMounts"]
                     if volumes[m["name"]].get("persistentVolumeClaim"))
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] in claims and claim["readOnly"] and mount["readOnly"]
        assert model.is_relative_to(mount["mountPath"])
    (job,) = [d for d in weights if d["kind"] == "Job"]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert f'local_dir="{model}"' in script


# ---------------------------------------------------------------- image


def pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [re.fullmatch(r"ray(\[[\w,-]+\])?==([\w.]+)", d.replace(" ", "")) for d in deps
              if re.match(r"ray\b", d) and "==" in d]
    assert pin is not None
    return pin.group(2)


def dockerfile_base() -> tuple[str, dict[str, str]]:
    """The FROM image with build-arg defaults filled in, and those defaults."""
    text = (K8S / "Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    (image,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
    return resolved, defaults


def test_dockerfile_ray_matches_pyproject() -> None:
    image, defaults = dockerfile_base()
    assert image == f"rayproject/ray:{pinned_ray_version()}-py311"
    assert defaults["RAY_VERSION"] == pinned_ray_version() == ray.__version__


def test_dockerfile_torch_matches_makefile() -> None:
    makefile_pin = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert makefile_pin is not None
    assert dockerfile_base()[1]["TORCH_VERSION"] == makefile_pin.group(1)


# ---------------------------------------------------------------- Grafana

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                 "and", "or", "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, groupings removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group() in _PROMQL_WORDS or s[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_promql_extractor() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, shard) (rate(ray_moray_x_bucket{a="b"}[$__rate_interval])))'
            " / on (layer) group_left sum(ray_y) + 2 * max without (le) (z_total offset 5m)")
    assert promql_metric_names(expr) == {"ray_moray_x_bucket", "ray_y", "z_total"}


def test_dashboard_loads_and_uses_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(expr.strip() for expr in dashboard_exprs())


def test_dashboard_queries_only_exported_metrics() -> None:
    queried = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    unknown = queried - exported_names() - set(SERVE_METRICS)
    assert unknown == set(), f"not exported by moray: {unknown}"


def test_dashboard_shows_every_metric() -> None:
    queried = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    missing = [spec.name for spec in METRICS if not spec.exported_names() & queried]
    assert missing == []


@pytest.mark.parametrize("name", sorted(SERVE_METRICS))
def test_allowed_serve_metrics_exist_in_ray(name: str) -> None:
    recorded = name.removeprefix("ray_")
    serve_dir = Path(ray.__file__).parent / "serve" / "_private"
    assert any(f'"{recorded}"' in p.read_text() for p in serve_dir.glob("*.py")), recorded


def test_dashboard_promql_parses() -> None:
    for expr in dashboard_exprs():
        concrete = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$app", "moray")
        ast = promql_parser.parse(concrete)  # raises on a syntax error
        names: set[str] = set()
        promql_parser.walk(ast, lambda e, n=names: n.add(e.name) if isinstance(e, VectorSelector) else None)
        assert names == promql_metric_names(expr), expr
