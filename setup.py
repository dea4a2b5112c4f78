"""Build hook: the gRPC stubs (``recsys.v1``) are generated from ``protos/`` while the wheel is built.

Everything else is in pyproject.toml. The stubs are never committed (``make protos`` writes them
into the source tree for development); this writes them into the build directory, so a wheel, an
sdist install or ``pip install git+...`` has them, made by the grpcio-tools that
``[build-system] requires`` pins.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
STUB_PACKAGE = "recsys/v1"


class BuildPyWithStubs(build_py):
    """``build_py`` plus ``grpc_tools.protoc`` over ``protos/recsys/v1/*.proto`` into build_lib."""

    def run(self) -> None:
        super().run()
        if not self.dry_run:
            generate_stubs(Path(self.build_lib))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        stubs = [str(Path(self.build_lib) / STUB_PACKAGE / name) for name in stub_names()]
        return [*super().get_outputs(include_bytecode), *stubs]


def stub_names() -> list[str]:
    names = ["__init__.py"]
    for proto in sorted((PROTO_ROOT / STUB_PACKAGE).glob("*.proto")):
        names += [f"{proto.stem}_pb2.py", f"{proto.stem}_pb2.pyi", f"{proto.stem}_pb2_grpc.py"]
    return names


def generate_stubs(out: Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    protos = sorted((PROTO_ROOT / STUB_PACKAGE).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / STUB_PACKAGE}")
    out.mkdir(parents=True, exist_ok=True)
    # The same flags as `make protos`, plus protoc's own well-known types on the include path.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {[p.name for p in protos]}")
    (out / STUB_PACKAGE / "__init__.py").touch()


setup(cmdclass={"build_py": BuildPyWithStubs})
