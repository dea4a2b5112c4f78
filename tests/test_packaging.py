"""Packaging for libraries and applications alike: compatible ranges in pyproject.toml, exact pins
in the lock files (requirements/, scripts/lock.sh) that make and the images install, CPU and GPU
model runtimes as separate extras, and a wheel that carries its generated stubs, installs without
torch and serves."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
# Tools whose exact version is the point: the stub generator (generated code must match the
# protobuf runtime range), the formatter (output must not drift), the Helm SDK (its embedded Helm).
EXACT_PINS_ALLOWED = {"grpcio-tools", "ruff", "helm-python-sdk"}
# Which lock holds which extras on top of the core.
LOCK_EXTRAS = {
    "gateway.txt": (),
    "serving-cpu.txt": ("cpu", "stores"),
    "serving-gpu.txt": ("gpu", "stores"),
    "dev.txt": ("cpu", "stores", "train", "dev", "deploy", "bench"),
}


def requirements(*extras: str) -> list[Requirement]:
    listed = list(PROJECT["dependencies"])
    for extra in extras:
        listed += EXTRAS[extra]
    return [Requirement(text) for text in listed]


def locked(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements" / name).read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")) and "==" in line:
            package, _, version = line.split()[0].partition("==")
            pins[package.lower()] = version
    return pins


def test_library_dependencies_are_ranges_not_pins() -> None:
    for requirement in requirements(*EXTRAS):
        pinned = any(spec.operator in {"==", "==="} for spec in requirement.specifier)
        assert not pinned or requirement.name in EXACT_PINS_ALLOWED, f"{requirement}: use a compatible range"
        assert requirement.specifier, f"{requirement}: give at least the verified lower bound"


def test_cpu_and_gpu_runtimes_are_separate_extras_of_one_cuda_major() -> None:
    names = {extra: {Requirement(text).name for text in listed} for extra, listed in EXTRAS.items()}
    core = {requirement.name for requirement in requirements()}
    assert not core & {"faiss-cpu", "onnxruntime", "onnxruntime-gpu", "torch"}, "the core runs the gateway"
    assert "onnxruntime" in names["cpu"] and "onnxruntime-gpu" not in names["cpu"]
    assert "onnxruntime-gpu" in names["gpu"] and "onnxruntime" not in names["gpu"]
    assert not [name for name in names["gpu"] if "cu12" in name or "cuda12" in name]
    assert not {"faiss-gpu", "faiss-gpu-cu12"} & set().union(*names.values())
    assert "torch" in names["train"] and not [e for e, n in names.items() if "torch" in n and e != "train"]


def test_the_stub_generator_is_a_build_requirement() -> None:
    build = [Requirement(text) for text in PYPROJECT["build-system"]["requires"]]
    (tools,) = [r for r in build if r.name == "grpcio-tools"]
    (dev_tools,) = [r for r in requirements("dev") if r.name == "grpcio-tools"]
    assert str(tools.specifier) == str(dev_tools.specifier), "`make protos` and the wheel build agree"
    assert "grpc_tools.protoc" in (REPO_ROOT / "setup.py").read_text()
    assert "protos/recsys/v1/*.proto" in (REPO_ROOT / "MANIFEST.in").read_text()  # sdist builds too


@pytest.mark.parametrize("lock", sorted(LOCK_EXTRAS))
def test_each_lock_satisfies_the_ranges_it_was_made_from(lock: str) -> None:
    pins = locked(lock)
    for requirement in requirements(*LOCK_EXTRAS[lock]):
        name = requirement.name.lower()
        assert name in pins, f"{lock} lacks {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]}"
    assert ("torch" in pins) == (lock == "dev.txt"), "torch only where the tests train"


def test_make_installs_the_lock() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "LOCK ?= requirements/dev.txt" in makefile
    assert "pip install --quiet -r $(LOCK)" in makefile and "--no-deps -e ." in makefile
    assert 'pip install --quiet -e ".[' not in makefile


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_wheel_from_a_clean_tree_installs_without_torch_and_serves(
    rank_bundle: Path, tmp_path: Path
) -> None:
    """The files git would check out (tracked and new, nothing ignored: no generated stubs, no
    venv), built into a wheel, installed with the serving lock into a fresh venv, serving rank
    from a bundle until its gRPC health says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    clean = tmp_path / "clean"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for relative in filter(None, (name.decode() for name in listed)):
        source = REPO_ROOT / relative
        if source.is_file():
            (clean / relative).parent.mkdir(parents=True, exist_ok=True)
            (clean / relative).write_bytes(source.read_bytes())
    assert not (clean / "recsys" / "v1").exists(), "the stubs must come from the build"
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(clean)],
        check=True,
        timeout=600,
    )
    (wheel,) = dist.glob("recsys-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REPO_ROOT / "requirements" / "serving-cpu.txt")], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300)
    probe = (
        "import importlib.util as u, recsys.v1.rank_pb2 as r; print(u.find_spec('torch') is None, r.__file__)"
    )
    result = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    no_torch, stub_file = result.stdout.split()
    assert no_torch == "True" and "site-packages" in stub_file

    port = free_port()
    command = [str(python), "-m", "rank_service", "--bundle", str(rank_bundle), "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--metrics-port", "0", "--bundle-poll-s", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        status = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.5)
        assert status == health_pb2.HealthCheckResponse.SERVING, (
            server.stdout.read1().decode() if server.poll() is not None else "not serving"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
