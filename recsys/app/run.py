"""`recsys run` (the body of `make run`): data -> bundles -> recall, rank and gateway on localhost.

Prepares the dataset, trains and exports the recall and rank bundles when they are missing
(``--quick``: the small settings that keep `make run` to a few minutes), then starts the three
services as child processes, waits until each reports SERVING over the standard gRPC health
service, prints their addresses and /metrics URLs, and stays up until Ctrl-C or SIGTERM, when it
stops the gateway, then rank, then recall, each gracefully.

The gateway requires a bearer token: the first run writes a random token with every scope to
``<artifacts>/dev-token`` (mode 0600; later runs reuse it) and its digest to
``<artifacts>/auth-tokens.json``, the gateway's tokens file. `recsys query` reads the token.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.query import DEFAULT_TOKEN_FILE
from recsys.bundle import BundleError, read_manifest
from recsys.data.dataset import Dataset
from recsys.serving.auth import (
    DEV_TOKEN_FILE,
    SCOPES,
    TOKENS_FILE,
    new_token,
    read_token,
    write_private,
    write_tokens_file,
)

log = logging.getLogger("recsys.app.run")

HOST = "127.0.0.1"
SERVING_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
HISTORY_LENGTH = 200  # events per user the gateway keeps (and seeds from the dataset)


@dataclass
class Service:
    """One child service process."""

    name: str
    module: str
    port: int
    metrics_port: int
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # set over this process's environment
    process: subprocess.Popen | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - open for the child's lifetime
        command = [
            sys.executable,
            "-m",
            self.module,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            *self.args,
        ]
        # Own session: Ctrl-C reaches only this process, which stops the children in order.
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_serving(self, timeout_s: float) -> None:
        """Poll the gRPC health service until SERVING; raise if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited with code {self.process.returncode if self.process else '?'}"
                        f"; last log lines:\n{self.log_tail()}"
                    )
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not SERVING after {timeout_s:.0f} s; log {self.log_path}"
                    )
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM (graceful: NOT_SERVING, then in-flight calls finish), SIGKILL if it hangs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_S)
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def pick_port(preferred: int, taken: set[int]) -> int:
    """``preferred`` when it is free on loopback, else any free port."""
    for candidate in (preferred, 0):
        if candidate in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, candidate))
            except OSError:
                continue
            port = sock.getsockname()[1]
            if port not in taken:
                taken.add(port)
                return port
    raise OSError("no free port")


def bundle_ready(bundle_dir: Path, kind: str) -> bool:
    try:
        read_manifest(bundle_dir, kind)
    except BundleError:
        return False
    return True


def build_bundles(data: str, artifacts: Path, quick: bool) -> tuple[Path, Path, Dataset]:
    """Prepare the dataset and build whichever bundle is missing; returns (recall, rank, dataset)."""
    from recsys.data.prepare import dataset_artifacts, prepare_dataset

    started = time.monotonic()
    dataset = prepare_dataset(data, artifacts, quick)
    root = dataset_artifacts(dataset, artifacts)
    recall_dir, rank_dir = root / "recall", root / "rank"
    print(
        f"data: {dataset.name}: {dataset.num_users} users, {dataset.num_items} items, "
        f"{dataset.num_interactions} interactions",
        flush=True,
    )
    if not bundle_ready(recall_dir, "recall"):
        from recall_service.train import RecallTrainConfig
        from recall_service.train import build_bundle as build_recall_bundle

        print(f"training the recall model (quick={quick}) ...", flush=True)
        build_recall_bundle(
            dataset, recall_dir, RecallTrainConfig.quick() if quick else RecallTrainConfig.default()
        )
        rank_missing = True
    else:
        rank_missing = not bundle_ready(rank_dir, "rank")
        print(f"recall bundle: {recall_dir} (exists)", flush=True)
    if rank_missing or not bundle_ready(rank_dir, "rank"):
        from rank_service.train import RankTrainConfig
        from rank_service.train import build_bundle as build_rank_bundle

        print(f"training the rank model on the recall bundle's candidates (quick={quick}) ...", flush=True)
        build_rank_bundle(
            dataset, recall_dir, rank_dir, RankTrainConfig.quick() if quick else RankTrainConfig.default()
        )
    else:
        print(f"rank bundle: {rank_dir} (exists)", flush=True)
    print(f"bundles ready in {time.monotonic() - started:.0f} s", flush=True)
    return recall_dir, rank_dir, dataset


def seed_history_store(dataset: Dataset, sqlite_path: Path, max_length: int) -> int:
    """Load every user's dataset history (newest ``max_length`` events) into the gateway's SQLite
    store, once, so `recsys query --user <a dataset user>` is personalised from the start.
    Events keep their order, stamped a minute apart ending now (dataset time units vary)."""
    import asyncio

    from gateway.history import SQLiteHistoryStore, StoredEvent

    if sqlite_path.exists():
        return 0
    now_ms = int(time.time() * 1000)
    events = []
    for user, sequence in enumerate(dataset.sequences):
        sequence = sequence[-max_length:]
        types = dataset.events_of(user)[-max_length:]
        stamps = [now_ms - 60_000 * (len(sequence) - i) for i in range(len(sequence))]
        user_id = dataset.users.external(user)
        for position, (item, event_type, stamp) in enumerate(zip(sequence, types, stamps, strict=True)):
            events.append(
                StoredEvent(
                    f"dataset-{user_id}-{position}",  # event ids are unique across users
                    user_id,
                    dataset.items.external(int(item)),
                    int(event_type) or 1,
                    stamp,
                )
            )
    store = SQLiteHistoryStore(sqlite_path, max_length)
    try:
        asyncio.run(store.append(events))
    finally:
        asyncio.run(store.close())
    return len(events)


def dev_credentials(artifacts: Path) -> tuple[Path, Path]:
    """The dev token (every scope) in ``artifacts/dev-token``, made on the first run and reused
    after (mode 0600, the token alone on one line), and the gateway's tokens file beside it
    (its sha256 only). Returns (token file, tokens file)."""
    token_path = artifacts / DEV_TOKEN_FILE
    try:
        token = read_token(token_path)
        os.chmod(token_path, 0o600)
    except (OSError, ValueError):
        token = new_token()
        write_private(token_path, token + "\n")
    tokens_path = artifacts / TOKENS_FILE
    write_tokens_file(tokens_path, [("dev", token, SCOPES)])
    return token_path, tokens_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys run", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--quick", action="store_true", help="quick data and training settings (make run)")
    parser.add_argument("--scenarios", type=Path, help="scenario YAML for the gateway (default: shipped)")
    parser.add_argument("--history-backend", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--redis-url", default="", help="for --history-backend redis")
    parser.add_argument(
        "--no-seed-history",
        action="store_true",
        help="start the gateway's SQLite history empty instead of with the dataset's histories",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    recall_dir, rank_dir, dataset = build_bundles(args.data, args.artifacts, args.quick)
    root = recall_dir.parent
    logs = root / "logs"
    taken: set[int] = set()
    sqlite_path = root / "gateway-history.sqlite3"
    if args.history_backend == "sqlite" and not args.no_seed_history:
        seeded = seed_history_store(dataset, sqlite_path, HISTORY_LENGTH)
        if seeded:
            print(f"gateway history: {seeded} dataset events loaded into {sqlite_path}", flush=True)
    token_path, tokens_path = dev_credentials(args.artifacts)
    gateway_args = [
        "--auth-tokens-file",
        str(tokens_path),
        "--max-history-length",
        str(HISTORY_LENGTH),
        "--sqlite-path",
        str(sqlite_path),
        "--history-backend",
        args.history_backend,
    ]
    if args.scenarios is not None:
        gateway_args += ["--scenarios", str(args.scenarios)]
    if args.redis_url:
        gateway_args += ["--redis-url", args.redis_url]
    recall = Service(
        "recall",
        "recall_service",
        pick_port(50051, taken),
        pick_port(9091, taken),
        ["--bundle", str(recall_dir)],
        logs / "recall.log",
    )
    rank = Service(
        "rank",
        "rank_service",
        pick_port(50052, taken),
        pick_port(9092, taken),
        ["--bundle", str(rank_dir)],
        logs / "rank.log",
    )
    http_port = pick_port(8080, taken)  # the gateway's HTTP/JSON API and web console
    gateway = Service(
        "gateway",
        "gateway",
        pick_port(50050, taken),
        pick_port(9090, taken),
        [
            *gateway_args,
            "--recall-address",
            recall.address,
            "--rank-address",
            rank.address,
            "--http-port",
            str(http_port),
        ],
        logs / "gateway.log",
    )
    services = [recall, rank, gateway]

    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        recall.start()
        rank.start()
        for service in (recall, rank):
            service.wait_serving(SERVING_TIMEOUT_S)
        gateway.start()
        gateway.wait_serving(SERVING_TIMEOUT_S)
        print(
            f"\nall three SERVING {time.monotonic() - started:.0f} s after start (logs in {logs}):",
            flush=True,
        )
        for service in services:
            print(
                f"{service.name:<8} {service.address}  metrics http://{HOST}:{service.metrics_port}/metrics"
            )
        http_base = f"http://{HOST}:{http_port}"
        print(
            f"\ngateway HTTP/JSON API (POST /v1/recommend, /v1/events; /openapi.json) and console "
            f"({http_base}/console#token=<dev token>&scenario=home&user=<user>):\n{http_base}",
            flush=True,
        )
        target = "" if gateway.port == 50050 else f" --gateway {gateway.address}"
        if token_path.resolve() != DEFAULT_TOKEN_FILE.resolve():
            target += f" --token-file {token_path}"  # where `recsys query` does not look by itself
        print(
            f"\ndev token (all scopes: {', '.join(SCOPES)}) in {token_path} (mode 0600); "
            "`recsys query` sends it as 'authorization: Bearer <token>'",
            flush=True,
        )
        user, item = dataset.users.ids[0], dataset.items.ids[0]
        print(
            f"\ntry:  recsys query{target} --scenario home --user {user} --debug\n"
            f"      recsys query{target} --scenario item_detail --user {user} --item {item}\n"
            f"      recsys query events{target} --user {user} --item {item} --type add_to_cart\n"
            f'      curl -H "Authorization: Bearer $(cat {token_path})" '
            f'-d \'{{"userId": "{user}", "scenario": "home", "numItems": 5}}\' '
            f"{http_base}/v1/recommend\n"
            "Ctrl-C stops all three.",
            flush=True,
        )
        while not stop_requested:
            dead = [s for s in services if not s.alive()]
            if dead:
                print(
                    f"{dead[0].name} exited unexpectedly; last log lines:\n{dead[0].log_tail()}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.5)
        print("stopping gateway, rank, recall ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"recsys run: {error}", file=sys.stderr)
        return 1
    finally:
        for service in reversed(services):
            service.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if stop_requested:
            print("stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
