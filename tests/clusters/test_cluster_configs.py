"""The shipped cluster configs stay valid: Ray's own schema for the launcher configs, and the
fields that matter for the KubeRay manifests and the runtime image."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_validates_against_rays_schema(name):
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTERS / name).read_text())
    validate_config(config)  # raises on any schema violation
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no stage work
    assert types["gpu_workers"]["resources"]["GPU"] == 8 and types["gpu_workers"]["min_workers"] == 0
    assert types["cpu_workers"]["resources"]["data_node"] == 1
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head  # never a public dashboard
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert any("pip install" in c and "lmpipe" in c for c in config["setup_commands"])
    text = (CLUSTERS / name).read_text().lower()
    assert "aws_secret_access_key" not in text and "secret:" not in text  # credentials from roles, not files


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def test_raycluster_manifest():
    rc = yaml.safe_load((CLUSTERS / "kuberay" / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
    image = _containers(head["template"])[0]["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu = _containers(groups["gpu-workers"]["template"])[0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "8" and gpu["image"] == image
    assert groups["gpu-workers"]["minReplicas"] == 0 and groups["gpu-workers"]["maxReplicas"] >= 1
    for g in groups.values():
        c = _containers(g["template"])[0]
        assert c["resources"]["requests"] == c["resources"]["limits"]  # guaranteed QoS: no surprise evictions
        assert {"secretRef": {"name": "lmpipe-s3"}} in c["envFrom"]


def test_rayjob_manifest_runs_lmpipe_and_cleans_up():
    job = yaml.safe_load((CLUSTERS / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("lmpipe run /pipeline/pipeline.yaml")
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]
    mounts = _containers(head["template"])[0]["volumeMounts"]
    assert {"name": "pipeline", "mountPath": "/pipeline"} in mounts
    assert head["template"]["spec"]["volumes"][0]["configMap"]["name"] == "lmpipe-pipeline"
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_dockerfile_installs_lmpipe_without_credentials():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM rayproject/ray:2.60.0" in text
    assert "COPY --chown=ray:users pipeline ./pipeline" in text and "COPY --chown=ray:users stages ./stages" in text
    assert "-c constraints.txt" in text
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in instructions if "AWS_" in line or "TOKEN" in line.upper()]  # no credentials baked in


@pytest.mark.parametrize("name", ["demo.yaml", "cluster.yaml"])
def test_shipped_pipeline_files_validate(name, monkeypatch):
    from pipeline.config import load_config
    from pipeline.dag import build_dag

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    loaded = load_config(CLUSTERS.parent / "examples" / name)
    order = [n.name for n in build_dag(loaded)]
    assert order[0] == "ingest" and order[-2:] == ["train", "evaluate"]
    assert order.index("pii_masker") < order.index("exact_dedup") < order.index("decontaminate")  # filters, dedup, decontam
    if name == "cluster.yaml":
        assert loaded.resolved.work_dir.startswith("s3://")
        assert loaded.declared.mlflow.tracking_uri == "${MLFLOW_TRACKING_URI}"
        assert loaded.resolved_stage_configs["train"].cluster.use_gpu is True
