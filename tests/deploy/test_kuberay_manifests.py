"""deploy/kuberay/*.yaml offline: each document against its kind's schema (KubeRay v1.7.0's CRDs, vendored in
schemas/; Kubernetes' own through kubernetes-validate), then what the schemas cannot see (the NPU declared to Ray
is the NPU the pod requests, the three clusters are one shape, images, volumes and the batch entrypoint agree with
the code). Nothing here talks to a cluster: it proves the manifests are well-formed, not that they run."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.31"  # the oldest Kubernetes that KubeRay 1.7 and these manifests are meant for
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayService": "ray.io_rayservices.yaml.gz",
             "RayJob": "ray.io_rayjobs.yaml.gz"}
CLUSTER_SPEC = {"RayCluster": "spec", "RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}
NPU_DEVICE = "huawei.com/Ascend910"  # the Ascend device plugin's resource name
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 3 MB of YAML


@functools.cache
def documents() -> tuple[tuple[str, dict], ...]:
    """Every document of deploy/kuberay/, parsed once (the tests copy before they change one)."""
    return tuple((p.name, doc) for p in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text()) if doc)


def by_kind(kind: str) -> dict:
    (doc,) = [d for _, d in documents() if d["kind"] == kind]
    return doc


def strict(schema):
    """The schema as the API server applies it to a create: a structural schema drops the fields it does not name
    (unless x-kubernetes-preserve-unknown-fields), and `kubectl apply` (field validation Strict by default since
    Kubernetes 1.27) rejects them. jsonschema knows neither, so say it: additionalProperties false on each object
    schema that lists its properties."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({name: strict(s) for name, s in v.items()} if k == "properties" else strict(v)) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load(gzip.open(SCHEMAS / CRD_FILES[kind]), Loader=SafeLoader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@functools.cache
def crd_validator(kind: str, strict_fields: bool) -> jsonschema.Draft7Validator:
    schema = crd_schema(kind)
    return jsonschema.Draft7Validator(strict(schema) if strict_fields else schema)


def crd_errors(doc: dict, strict_fields: bool = True) -> list[str]:
    """Every violation of the kind's v1 schema, as 'path: message'. CEL rules (x-kubernetes-validations) are not
    evaluated: no field they guard is set here."""
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in crd_validator(doc["kind"], strict_fields).iter_errors(doc)]
    # the CRD leaves metadata to the API server, which validates it as ObjectMeta: so does this, through a kind
    # whose schema is that and nothing else around it
    errors += core_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})})
    return sorted(errors)


def core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def errors(doc: dict) -> list[str]:
    return crd_errors(doc) if doc["apiVersion"] == "ray.io/v1" else core_errors(doc)


@pytest.mark.parametrize("name, doc", documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_matches_its_schema(name, doc):
    assert doc["kind"] in (*CRD_FILES, "PersistentVolumeClaim", "Pod"), f"{name}: no schema checks {doc['kind']}"
    assert errors(doc) == [], name
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "names of Services derive from it"


def _node(doc: dict, path: tuple):
    for key in path:
        doc = doc[key]
    return doc


def _set(doc: dict, path: tuple, value) -> dict:
    """A copy of doc with the value at path (keys and list indices) replaced, or added."""
    doc = copy.deepcopy(doc)
    _node(doc, path[:-1])[path[-1]] = value
    return doc


def _without(doc: dict, path: tuple) -> dict:
    doc = copy.deepcopy(doc)
    del _node(doc, path[:-1])[path[-1]]
    return doc


WORKER = ("spec", "workerGroupSpecs", 0)
BROKEN = {  # kind -> (what changes, the error expected)
    "RayCluster": [
        (lambda d: _set(d, ("spec", "workerGroupSpec"), d["spec"]["workerGroupSpecs"]), "'workerGroupSpec' was unexpected"),
        (lambda d: _set(d, (*WORKER, "replicas"), "one"), "'one' is not of type 'integer'"),
        (lambda d: _set(d, (*WORKER, "template", "spec", "containers", 0, "resources", "limits", NPU_DEVICE), "four"),
         "'four' does not match"),
        (lambda d: _set(d, (*WORKER, "template", "spec", "containers", 0, "volumeMount"), []), "'volumeMount' was unexpected"),
        (lambda d: _without(d, (*WORKER, "groupName")), "'groupName' is a required property"),
        (lambda d: _set(d, ("metadata", "labels"), {"app": 1}), "1 is not of type"),
    ],
    "RayService": [
        (lambda d: _set(d, ("spec", "serveConfig"), d["spec"]["serveConfigV2"]), "'serveConfig' was unexpected"),
        (lambda d: _set(d, ("spec", "serveConfigV2"), yaml.safe_load(d["spec"]["serveConfigV2"])), "is not of type 'string'"),
        (lambda d: _set(d, ("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"), {"num-cpus": 8}),
         "8 is not of type 'string'"),
    ],
    "RayJob": [
        (lambda d: _set(d, ("spec", "entrypoint"), shlex.split(d["spec"]["entrypoint"])), "is not of type 'string'"),
        (lambda d: _set(d, ("spec", "shutdownAfterJobFinish"), True), "'shutdownAfterJobFinish' was unexpected"),
        (lambda d: _set(d, ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicy"), 1),
         "1 is not of type 'string'"),
    ],
    "PersistentVolumeClaim": [
        (lambda d: _set(d, ("spec", "accessMode"), ["ReadWriteMany"]), "'accessMode' was unexpected"),
        (lambda d: _set(d, ("spec", "accessModes"), "ReadWriteMany"), "is not of type 'array'"),
    ],
    "Pod": [
        (lambda d: _set(d, ("spec", "containers", 0, "volumeMount"), []), "'volumeMount' was unexpected"),
        (lambda d: _set(d, ("spec", "restartPolicy"), ["Never"]), "is not of type"),
    ],
}


@pytest.mark.parametrize("kind", BROKEN)
def test_schemas_reject_misspelt_fields_and_wrong_types(kind):
    doc = by_kind(kind)
    for change, expected in BROKEN[kind]:
        found = errors(change(doc))
        assert any(expected in e for e in found), (kind, expected, found)


def test_unknown_fields_are_caught_by_the_strict_reading_only():
    """The CRDs themselves allow what they do not name (the API server prunes it): without strict() a misspelt
    field would pass, so the rejection above is strict()'s, as `kubectl apply` would reject it."""
    misspelt = _set(by_kind("RayService"), ("spec", "serveConfig"), "applications: []")
    assert crd_errors(misspelt, strict_fields=False) == []
    assert crd_errors(misspelt) == ["spec: Additional properties are not allowed ('serveConfig' was unexpected)"]


def ray_start_resources(value: str) -> dict:
    """The custom resources `ray start` receives from rayStartParams' `resources`: KubeRay writes
    `ray start ... --resources=VALUE` into a bash command line (common/pod.go: convertParamMap), so the shell's
    word splitting and quote removal decide what Ray parses as JSON."""
    (word,) = shlex.split(f"--resources={value}")  # one word, or the flag's JSON breaks apart
    return json.loads(word.removeprefix("--resources="))


def test_the_npu_count_declared_to_ray_is_the_devices_requested():
    for kind in CLUSTER_SPEC:
        doc = by_kind(kind)
        spec = doc["spec"] if kind == "RayCluster" else doc["spec"][CLUSTER_SPEC[kind]]
        head = spec["headGroupSpec"]
        assert NPU_DEVICE not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "resources" not in head["rayStartParams"], "the head holds no NPU"
        for group in spec["workerGroupSpecs"]:
            (ray,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
            limits, requests = ray["resources"]["limits"], ray["resources"]["requests"]
            assert limits[NPU_DEVICE] == requests[NPU_DEVICE], "an extended resource's request must equal its limit"
            declared = ray_start_resources(group["rayStartParams"]["resources"])
            assert declared == {"NPU": limits[NPU_DEVICE]}, (kind, group["groupName"])
            assert group["template"]["spec"]["nodeSelector"] == {"accelerator": "huawei-Ascend910"}


def test_the_resources_quoting_is_checked():
    assert ray_start_resources('"{\\"NPU\\": 4}"') == {"NPU": 4}
    with pytest.raises(ValueError):  # unquoted: the shell splits the JSON at its space
        ray_start_resources('{"NPU": 4}')
    with pytest.raises(ValueError):  # double quotes alone: the shell drops them, leaving {NPU: 4}
        ray_start_resources('"{"NPU":4}"')


def test_the_three_clusters_are_one_shape():
    """RayService and RayJob each bring their own cluster: the same as raycluster.yaml, so a fix lands in all."""
    cluster = by_kind("RayCluster")["spec"]
    assert by_kind("RayService")["spec"]["rayClusterConfig"] == cluster
    assert by_kind("RayJob")["spec"]["rayClusterSpec"] == cluster


def _dockerfile_arg(name: str) -> str:
    text = (REPO / "deploy" / "docker" / "Dockerfile.ascend").read_text()
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", text, re.M)
    return value


def test_images_ray_version_and_model_store_agree():
    ascend = (REPO / "deploy" / "docker" / "Dockerfile.ascend").read_text()
    (image,) = re.findall(r"docker build -f deploy/docker/Dockerfile.ascend -t (\S+) \.", ascend)
    (pvc,) = [d for _, d in documents() if d["kind"] == "PersistentVolumeClaim"]
    spec = by_kind("RayCluster")["spec"]
    assert spec["rayVersion"] == _dockerfile_arg("RAY_VERSION")
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            assert container["image"] == image
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts["/models"]] == pvc["metadata"]["name"]


def test_the_batch_entrypoint_is_a_shardserve_batch_command_line(monkeypatch):
    from shardserve.cluster import cli

    argv = shlex.split(by_kind("RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["shardserve", "batch"]
    seen = {}
    monkeypatch.setattr(cli, "batch", lambda args: seen.setdefault("args", args))
    cli.main(argv[1:])  # the CLI's own parser: a misspelt or unknown flag exits here
    args = seen["args"]
    assert args.device == "npu" and args.tp_size * args.dp_size <= 4
    for path in (args.model_path, args.input, args.output):
        assert path.startswith("/models/"), path
