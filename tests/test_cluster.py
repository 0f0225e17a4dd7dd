"""cluster.yaml and docker/Dockerfile, checked offline by the code that will consume them.

``ray up`` runs ``prepare_config`` then ``validate_config`` (Ray's JSON schema, which rejects unknown keys)
before it touches AWS, and Ray's AWS provider passes each ``node_config`` to EC2 ``RunInstances``, whose
parameters boto3 validates against the EC2 service model before sending. Running the same checks here makes a
typo fail CI rather than a ``ray up``; each check is also shown to reject a broken copy (none is vacuous).
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def ray_validate(config: dict) -> dict:
    """What ``ray up`` does to the file before any cloud call: fill defaults, prepare, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def run_instances_errors(node_config: dict) -> str:
    """boto3's own validation of the RunInstances request Ray's AWS provider builds from ``node_config``
    (it adds MinCount, MaxCount and tags); an empty string when the request is valid."""
    import botocore.session
    from botocore.validate import ParamValidator

    ec2 = botocore.session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
    return report.generate_report() if report.has_errors() else ""


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _node_types(config: dict, gpu: bool) -> dict[str, dict]:
    return {
        name: t
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"] and (t["resources"].get("GPU", 0) > 0) == gpu
    }


def test_ray_accepts_the_cluster_config(config):
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def _rename(path: tuple[str, ...], old: str, new: str) -> Callable[[dict], None]:
    def mutate(c: dict) -> None:
        node = c
        for key in path:
            node = node[key]
        node[new] = node.pop(old)

    return mutate


def _set(path: tuple[str, ...], value: object) -> Callable[[dict], None]:
    def mutate(c: dict) -> None:
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


BROKEN = {
    "misspelt top-level key": _rename((), "idle_timeout_minutes", "idle_timeout_minute"),
    "misspelt docker key": _rename(("docker",), "run_options", "run_option"),
    "misspelt node-type key": _rename(("available_node_types", "gpu_worker"), "min_workers", "min_worker"),
    "fractional GPU count": _set(("available_node_types", "gpu_worker", "resources", "GPU"), 0.5),
    "head type not defined": _set(("head_node_type",), "ray.head.default"),
    "min workers above the cluster max": _set(("available_node_types", "cpu_worker", "min_workers"), 99),
}


@pytest.mark.parametrize("mutate", BROKEN.values(), ids=BROKEN.keys())
def test_ray_rejects_a_broken_copy(config, mutate):
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(broken)


def test_every_node_config_is_a_valid_run_instances_request(config):
    for name, node_type in config["available_node_types"].items():
        assert run_instances_errors(node_type["node_config"]) == "", name
    broken = copy.deepcopy(config["available_node_types"]["gpu_worker"]["node_config"])
    broken["InstanceTyp"] = broken.pop("InstanceType")
    assert "Unknown parameter" in run_instances_errors(broken)


def test_node_types(config):
    head = config["available_node_types"][config["head_node_type"]]
    resources = head["resources"]
    assert resources.get("CPU") == 0 and not resources.get("GPU"), "no work may land on the head"
    gpu, cpu = _node_types(config, gpu=True), _node_types(config, gpu=False)
    assert gpu, "a GPU worker type, for pretraining"
    assert cpu, "a CPU worker type, for ingest and feature extraction"
    for node_type in [*gpu.values(), *cpu.values()]:
        assert node_type["min_workers"] == 0, "worker types scale from zero"
        assert node_type["max_workers"] >= 1
    assert sum(t["max_workers"] for t in [*gpu.values(), *cpu.values()]) <= config["max_workers"]


def bash_syntax_errors(command: str) -> str:
    return subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, check=False).stderr


def test_node_commands_are_valid_bash(config):
    """The folded YAML commands Ray runs on the nodes parse as bash: a slip fails here, not at boot."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    commands = [c for key in keys for c in config[key]]
    assert commands and all(bash_syntax_errors(c) == "" for c in commands)
    assert bash_syntax_errors("for s in a b; do echo $s") != ""


def test_image_and_environment(config):
    image = config["docker"]["image"]
    assert re.fullmatch(r"\S+:[\w.-]+", image) and not image.endswith(":latest"), "a pinned image tag"
    env = {
        m.group(1): m.group(2)
        for opt in config["docker"]["run_options"]
        if (m := re.fullmatch(r"--env[ =](\w+)=(\S+)", opt))
    }
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    key_file = env["MERMED_DEID_KEY_FILE"]
    assert any(
        re.fullmatch(rf"--volume \S+:{re.escape(str(Path(key_file).parent))}:ro", opt)
        for opt in config["docker"]["run_options"]
    ), "the key file lives in a read-only mounted secret"
    assert env["RAY_AUTH_MODE"] == "token"


SECRET_PATTERNS = {
    "an AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "an AWS secret key or session token": r"(?i)aws_(secret_access_key|session_token)\s*[=:]",
    "the de-identification key itself": r"MERMED_DEID_KEY\s*[=:]",
    "a literal Ray auth token": r"RAY_AUTH_TOKEN\s*[=:]\s*[\w-]",
}


def secrets_in(text: str) -> list[str]:
    return [what for what, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)]


def test_no_secret_is_written_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert secrets_in(text) == []
    planted = [
        "    - --env AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        "    - --env AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "    - --env MERMED_DEID_KEY=0123456789abcdef",
        "    - --env RAY_AUTH_TOKEN=3f9a0c",
    ]
    assert secrets_in(text + "\n" + "\n".join(planted)) == list(SECRET_PATTERNS)


def test_dockerfile_matches_the_pinned_ray():
    """A job client and its cluster must run the same Ray: the base image's tag is constraints.txt's Ray."""
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py311-gpu\s*$", text, re.M)
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert base and pinned and base.group(1) == pinned.group(1)
    assert re.search(r"pip install .*-c constraints\.txt -e \.", text)
