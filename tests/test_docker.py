"""What can be checked of docker/ without a Docker engine: the compose file's structure, loopback-only ports,
an MLflow command the installed `mlflow server` accepts, and a Dockerfile that ships every package."""

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_compose_file_is_a_loopback_only_mlflow_and_ray_cluster():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mlflow", "ray-head", "ray-worker"}
    for name, service in services.items():
        assert service["image"] == "orch-worker:latest" and service["build"]["dockerfile"] == "docker/Dockerfile"
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", [])), name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], (name, volume)
    assert services["ray-worker"]["command"] == ["start", "--address=ray-head:6379", "--block"]
    assert services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    mlflow = Path(sys.executable).parent / "mlflow"
    help_text = subprocess.run([str(mlflow), "server", "--help"], capture_output=True, text=True).stdout
    for option in services["mlflow"]["command"][1:]:
        assert option.split("=")[0] in help_text, option


def test_dockerfile_installs_every_package_of_the_project():
    folders = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for folder in folders.values():
        assert f"COPY {folder}/ {folder}/" in dockerfile, folder
    assert "pip install -e ." in dockerfile and 'ENTRYPOINT ["orch"]' in dockerfile
