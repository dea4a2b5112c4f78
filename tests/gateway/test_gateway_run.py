"""`recsys run` (make run) end to end over prebuilt tiny bundles: three child processes reach
SERVING, `recsys query` gets items through them, and SIGTERM stops all three cleanly."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway import query
from recsys.app.run import Service, pick_port
from recsys.data.prepare import dataset_artifacts, prepare_dataset

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_pick_port_prefers_the_default_and_avoids_taken_ports():
    taken: set[int] = set()
    first = pick_port(0, taken)
    assert first in taken
    assert pick_port(first, taken) != first


def test_a_service_process_gets_its_own_environment_over_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_PROBE_VARIABLE", "GRPC_EXPERIMENTS")
    monkeypatch.setenv("GRPC_EXPERIMENTS", "inherited")
    logs = {}
    for name, env in (("own", {"GRPC_EXPERIMENTS": ""}), ("inherited", {})):
        service = Service(name, "tests.gateway.env_probe", 0, 0, [], tmp_path / f"{name}.log", env)
        service.start()
        assert service.process is not None and service.process.wait(timeout=60) == 0
        service.stop()
        logs[name] = (tmp_path / f"{name}.log").read_text().strip()
    assert logs == {"own": "GRPC_EXPERIMENTS=''", "inherited": "GRPC_EXPERIMENTS='inherited'"}


def test_recsys_run_serves_all_three_and_stops_them_on_sigterm(
    synthetic_dir: Path,
    synthetic_dataset,
    recall_bundle: Path,
    rank_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    artifacts = tmp_path / "artifacts"
    root = dataset_artifacts(prepare_dataset(str(synthetic_dir), artifacts), artifacts)  # where run looks
    shutil.copytree(recall_bundle, root / "recall")  # bundles present: run skips training
    shutil.copytree(rank_bundle, root / "rank")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "recsys", "run", "--data", str(synthetic_dir), "--artifacts", str(artifacts)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("Ctrl-C stops all three"):
                break
        text = "".join(output)
        assert "all three SERVING" in text, text
        addresses = dict(
            re.findall(r"^(recall|rank|gateway)\s+(127\.0\.0\.1:\d+)\s+metrics http://", text, re.M)
        )
        assert set(addresses) == {"recall", "rank", "gateway"}, text
        http_base = re.search(r"^(http://127\.0\.0\.1:\d+)$", text, re.M)  # the HTTP API, own line
        assert http_base is not None, text

        token_file = artifacts / "dev-token"  # the dev token: mode 0600, the token alone on one line
        assert f"dev token (all scopes: recommend, events, debug, admin) in {token_file}" in text
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert len(token_file.read_text().splitlines()) == 1
        assert token_file.read_text().strip() not in text  # printed where, never what
        user = synthetic_dataset.users.ids[0]
        argv = ["--gateway", addresses["gateway"], "--scenario", "home", "--user", user, "-n", "5"]
        out = io.StringIO()
        code = query.main([*argv, "--token-file", str(token_file)], out)
        assert code == 0 and "5 items" in out.getvalue() and "ok" in out.getvalue().splitlines()[-2]
        body = {"userId": user, "scenario": "home", "numItems": 5}
        token = token_file.read_text().strip()
        answer = httpx.post(
            f"{http_base[1]}/v1/recommend", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200 and len(answer.json()["items"]) == 5, answer.text
        assert httpx.post(f"{http_base[1]}/v1/recommend", json=body).status_code == 401
        monkeypatch.delenv("RECSYS_TOKEN", raising=False)
        monkeypatch.chdir(artifacts)  # no artifacts/dev-token below the working directory
        assert query.main(argv, io.StringIO()) == 1  # no token: UNAUTHENTICATED
        monkeypatch.chdir(artifacts.parent)  # `recsys query` finds artifacts/dev-token by itself
        assert query.main(argv, io.StringIO()) == 0

        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        assert process.returncode == 0, text + rest
        assert "stopped." in rest
        for name in ("recall", "rank", "gateway"):
            assert '"message": "stopped"' in (root / "logs" / f"{name}.log").read_text(), name
    finally:
        if process.poll() is None:  # a failed assertion: SIGTERM, so that run stops its children
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
