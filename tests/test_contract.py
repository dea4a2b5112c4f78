"""The contract (protos/recsys/v1, config in protos/buf.yaml) is linted and guarded with buf:
`buf lint` is clean, its exceptions excuse only the names the contract already published, and
`buf breaking` against the last commit on main finds nothing. buf comes from npm (`make buf`,
a step of `make test`); where it could not be installed these tests skip and say why."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"  # where `make buf` installs it
BASELINE_ENV = "RECSYS_BUF_AGAINST"  # a git ref (the Makefile's BUF_AGAINST); default main

# The findings protos/buf.yaml's `ignore_only` entries excuse, by rule, file and element: names
# published before the lint ran (see the comments there). Exactly these, so a NEW enum value,
# service or RPC in those files is still linted.
PUBLISHED_NAMES = {
    ("ENUM_VALUE_PREFIX", "recsys/v1/common.proto", "VIEW"),
    ("ENUM_VALUE_PREFIX", "recsys/v1/common.proto", "CLICK"),
    ("ENUM_VALUE_PREFIX", "recsys/v1/common.proto", "ADD_TO_CART"),
    ("ENUM_VALUE_PREFIX", "recsys/v1/common.proto", "PURCHASE"),
    ("SERVICE_SUFFIX", "recsys/v1/gateway.proto", "Gateway"),
    ("RPC_REQUEST_STANDARD_NAME", "recsys/v1/recall.proto", "CatalogRequest"),
    ("RPC_RESPONSE_STANDARD_NAME", "recsys/v1/recall.proto", "CatalogChunk"),
}


@pytest.fixture(scope="module")
def buf() -> str:
    """The buf binary: $BUF, else .tools/ (`make buf`), else one on PATH."""
    for candidate in (os.environ.get("BUF"), str(BUF), shutil.which("buf")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    reason = (
        "npm is not installed (buf comes from npm's @bufbuild/buf)"
        if shutil.which("npm") is None
        else "run `make buf` (the npm install of @bufbuild/buf failed or has not run)"
    )
    pytest.skip(f"buf not available, contract lint/breaking checks skipped: {reason}")


def run_buf(buf: str, *args: str, cwd: Path = ROOT) -> tuple[int, list[dict[str, Any]], str]:
    """Run buf with JSON findings: (exit code, findings, stderr)."""
    result = subprocess.run(
        [buf, *args, "--error-format", "json"], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    findings = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, findings, result.stderr


def element(finding: dict[str, Any]) -> str:
    """The name a lint finding is about: the first quoted name in its message."""
    match = re.search(r'"([^"]+)"', finding["message"])
    return match.group(1) if match else ""


def describe(findings: list[dict[str, Any]]) -> str:
    return "\n".join(f"{f['path']}:{f.get('start_line', 0)}: {f['type']}: {f['message']}" for f in findings)


def test_buf_lint_is_clean(buf: str):
    code, findings, stderr = run_buf(buf, "lint", "protos")
    assert (code, findings) == (0, []), describe(findings) or stderr


def test_lint_exceptions_excuse_only_the_published_names(buf: str, tmp_path: Path):
    config = yaml.safe_load((PROTOS / "buf.yaml").read_text())
    assert set(config["lint"]["ignore_only"]) == {rule for rule, _, _ in PUBLISHED_NAMES}
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    del config["lint"]["ignore_only"]  # lint the same files without the exceptions
    (copy / "buf.yaml").write_text(yaml.safe_dump(config))
    _, findings, stderr = run_buf(buf, "lint", "protos", cwd=tmp_path)
    found = {(f["type"], Path(f["path"]).relative_to("protos").as_posix(), element(f)) for f in findings}
    assert found == PUBLISHED_NAMES, describe(findings) or stderr


def baseline(ref: str) -> str:
    """buf's input for the protos at git ``ref`` (or ``origin/<ref>``); skips when neither exists."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no baseline for buf breaking")

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)

    for candidate in (ref, f"origin/{ref}"):
        commit = git("rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}").stdout.strip()
        if commit:
            break
    else:
        pytest.skip(
            f"no {ref!r} (nor origin/{ref}) to compare the contract with, e.g. a single-branch "
            f"clone: fetch it, or set BUF_AGAINST / ${BASELINE_ENV} to another ref"
        )
    git_dir = git("rev-parse", "--path-format=absolute", "--git-common-dir").stdout.strip()
    return f"{git_dir}#ref={commit},subdir=protos"


def test_buf_breaking_finds_nothing_against_main(buf: str):
    against = baseline(os.environ.get(BASELINE_ENV, "").strip() or "main")
    code, findings, stderr = run_buf(buf, "breaking", "protos", "--against", against)
    assert (code, findings) == (0, []), describe(findings) or stderr


def test_buf_breaking_catches_a_broken_contract(buf: str, tmp_path: Path):
    """The guard works: dropping a response field and renaming the public service both fail."""
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    gateway = copy / "recsys" / "v1" / "gateway.proto"
    text = gateway.read_text()
    assert re.search(r"^\s*bool degraded = 4;.*\n", text, re.M) and "service Gateway {" in text
    text = re.sub(r"^\s*bool degraded = 4;.*\n", "", text, flags=re.M)
    gateway.write_text(text.replace("service Gateway {", "service GatewayService {"))
    code, findings, stderr = run_buf(buf, "breaking", "protos", "--against", str(PROTOS), cwd=tmp_path)
    assert code != 0, stderr
    assert {"FIELD_NO_DELETE", "SERVICE_NO_DELETE"} <= {finding["type"] for finding in findings}
