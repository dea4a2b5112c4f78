"""The gateway's typed configuration, read once from env vars and flags (flags win)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.history import SQLITE_SYNCHRONOUS
from recsys.scenario.config import DEFAULT_SCENARIOS_FILE as DEFAULT_SCENARIOS
from recsys.serving.auth import load_tokens
from recsys.serving.config import (
    ConfigError,
    ServingConfig,
    add_serving_arguments,
    env_default,
    serving_config_from_args,
)

DEFAULT_PORT = 50050
DEFAULT_METRICS_PORT = 9090
DEFAULT_HTTP_PORT = 8080  # the CLI's default; a GatewayConfig built in code takes any free port
HISTORY_BACKENDS = ("sqlite", "redis")
# Limits of the public port, sized for the chart's 512 MiB gateway pods. The largest valid request
# (1000 events with 256-character ids) is about 1 MB, so 4 MiB messages refuse nothing legitimate;
# larger ones are answered RESOURCE_EXHAUSTED by gRPC from their length prefix, unread. Each call
# being read or handled costs about 3x its size (transport buffer, bytes, parsed message), and
# calls beyond GATEWAY_MAX_CONCURRENT_RPCS are refused before their request is read. Measured on
# one gateway process (62 MiB at rest): 40 concurrent 15 MiB requests against these defaults are
# all refused (peak RSS 73 MiB; with 16 MiB messages and no cap: all read, 1.5 GiB); 100-200
# concurrent 4 MB requests peak at 325-665 MiB, so a pod expecting such floods needs a lower
# --max-message-bytes or more memory. The in-flight limit (max_in_flight, counted in
# recsys_requests_total{outcome="shed"}) stays below the RPC cap so overload is shed visibly.
GATEWAY_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
GATEWAY_MAX_CONCURRENT_RPCS = 64


def address_list(text: str) -> tuple[str, ...]:
    """``"a:1,b:2"`` -> ``("a:1", "b:2")``."""
    return tuple(address.strip() for address in text.split(",") if address.strip())


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs: where its downstreams are, its scenarios, its history store."""

    serving: ServingConfig = field(
        default_factory=lambda: ServingConfig(
            port=DEFAULT_PORT,
            metrics_port=DEFAULT_METRICS_PORT,
            max_message_bytes=GATEWAY_MAX_MESSAGE_BYTES,
            max_concurrent_rpcs=GATEWAY_MAX_CONCURRENT_RPCS,
        )
    )
    scenarios_path: Path = DEFAULT_SCENARIOS
    recall_address: str = "127.0.0.1:50051"
    # Sharded recall (one address per shard, in shard order): fanned out under one deadline and
    # merged (gateway/recall_fanout.py); empty = the one recall_address.
    recall_addresses: tuple[str, ...] = ()
    rank_address: str = "127.0.0.1:50052"
    history_backend: str = "sqlite"
    sqlite_path: Path = Path("artifacts/gateway-history.sqlite3")
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_history_length: int = 200
    sqlite_synchronous: str = "NORMAL"  # NORMAL survives a process crash; FULL also power loss
    dedupe_retention_hours: float = 168.0  # how long an accepted event_id stays a duplicate
    max_in_flight: int = 48  # below serving.max_concurrent_rpcs: see GATEWAY_MAX_CONCURRENT_RPCS
    default_deadline_ms: float = 1000.0  # cap when a caller sends no deadline
    reload_interval_s: float = 2.0  # how often the scenario file's mtime is checked
    downstream_tls_ca: Path | None = None  # set: TLS to recall/rank, verified against this CA
    # Calls out at once to recall and to rank (each); the requests that arrive meanwhile go out
    # together as one batch call when one returns (recsys/serving/batch_calls.py). 0 = one call
    # per request. With several recall/rank pods, at least their number keeps every pod busy.
    downstream_in_flight: int = 1
    # The longest a request waits behind those calls: then what is queued goes out anyway, past
    # the limit, so one stalled call cannot hold the others until their deadlines. 0 = no bound.
    downstream_max_hold_ms: float = 0.0
    # Bearer tokens and their scopes (recsys/serving/auth.py). Without a tokens file the gateway
    # refuses to start unless allow_unauthenticated is set (it then logs a warning); with one,
    # allow_unauthenticated is ignored.
    auth_tokens_file: Path | None = None
    allow_unauthenticated: bool = False
    # The HTTP/JSON API and web console (gateway/http_api.py) on serving.host, beside gRPC.
    http_enabled: bool = True
    http_port: int = 0  # 0 = any free port (read back from GatewayServer.http_port)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        if self.history_backend not in HISTORY_BACKENDS:
            raise ConfigError(f"history_backend: must be sqlite or redis, got {self.history_backend!r}")
        for name in ("recall_address", "rank_address"):
            if ":" not in getattr(self, name):
                raise ConfigError(f"{name}: must be HOST:PORT, got {getattr(self, name)!r}")
        for address in self.recall_addresses:
            if ":" not in address:
                raise ConfigError(f"recall_addresses: each must be HOST:PORT, got {address!r}")
        if not 1 <= self.max_history_length <= 1000:
            raise ConfigError(f"max_history_length: must be in 1..1000, got {self.max_history_length}")
        if self.sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise ConfigError(
                f"sqlite_synchronous: must be one of {', '.join(SQLITE_SYNCHRONOUS)},"
                f" got {self.sqlite_synchronous!r}"
            )
        if not self.dedupe_retention_hours > 0:
            raise ConfigError(f"dedupe_retention_hours: must be > 0, got {self.dedupe_retention_hours}")
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight: must be >= 1, got {self.max_in_flight}")
        if not 0 <= self.downstream_in_flight <= 1024:
            raise ConfigError(f"downstream_in_flight: must be in 0..1024, got {self.downstream_in_flight}")
        if not 0.0 <= self.downstream_max_hold_ms <= 10_000.0:  # also rejects NaN
            raise ConfigError(
                f"downstream_max_hold_ms: must be in 0..10000 ms, got {self.downstream_max_hold_ms}"
            )
        if not self.default_deadline_ms > 0:
            raise ConfigError(f"default_deadline_ms: must be > 0, got {self.default_deadline_ms}")
        if not self.reload_interval_s > 0:
            raise ConfigError(f"reload_interval_s: must be > 0, got {self.reload_interval_s}")
        if not Path(self.scenarios_path).is_file():
            raise ConfigError(f"scenarios_path: file not found: {self.scenarios_path}")
        if self.downstream_tls_ca is not None and not Path(self.downstream_tls_ca).is_file():
            raise ConfigError(f"downstream_tls_ca: file not found: {self.downstream_tls_ca}")
        if (
            isinstance(self.http_port, bool)
            or not isinstance(self.http_port, int)
            or not 0 <= self.http_port <= 65535
        ):
            raise ConfigError(f"http_port: must be an integer in 0..65535, got {self.http_port!r}")
        if (
            self.http_enabled
            and self.http_port != 0
            and self.http_port in (self.serving.port, self.serving.metrics_port)
        ):
            raise ConfigError(f"http_port: must differ from port and metrics_port, got {self.http_port}")
        if self.auth_tokens_file is not None:
            load_tokens(self.auth_tokens_file)  # fail at start, naming the bad entry
        elif not self.allow_unauthenticated:
            raise ConfigError(
                "auth_tokens_file: required (--auth-tokens-file / RECSYS_AUTH_TOKENS_FILE); to serve "
                "without authentication pass --allow-unauthenticated (RECSYS_ALLOW_UNAUTHENTICATED=1)"
            )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> GatewayConfig:
        """Parse flags (each defaulting to its ``RECSYS_*`` env var); exits 2 on a bad value."""
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            return cls(
                serving=serving_config_from_args(args),
                scenarios_path=Path(args.scenarios),
                recall_address=args.recall_address,
                recall_addresses=args.recall_addresses,
                rank_address=args.rank_address,
                history_backend=args.history_backend,
                sqlite_path=Path(args.sqlite_path),
                redis_url=args.redis_url,
                max_history_length=args.max_history_length,
                sqlite_synchronous=args.sqlite_synchronous,
                dedupe_retention_hours=args.dedupe_retention_hours,
                max_in_flight=args.max_in_flight,
                default_deadline_ms=args.default_deadline_ms,
                reload_interval_s=args.reload_interval_s,
                downstream_tls_ca=Path(args.downstream_tls_ca) if args.downstream_tls_ca else None,
                downstream_in_flight=args.downstream_in_flight,
                downstream_max_hold_ms=args.downstream_max_hold_ms,
                auth_tokens_file=Path(args.auth_tokens_file) if args.auth_tokens_file else None,
                allow_unauthenticated=args.allow_unauthenticated,
                http_enabled=args.http,
                http_port=args.http_port,
            )
        except ConfigError as error:
            parser.error(str(error))
            raise  # unreachable: parser.error exits


def build_parser() -> argparse.ArgumentParser:
    """The gateway's flags: the common serving flags plus its own."""
    parser = argparse.ArgumentParser(prog="recsys serve gateway", description="The recommendation gateway.")
    add_serving_arguments(
        parser,
        DEFAULT_PORT,
        DEFAULT_METRICS_PORT,
        max_message_bytes=GATEWAY_MAX_MESSAGE_BYTES,
        max_concurrent_rpcs=GATEWAY_MAX_CONCURRENT_RPCS,
    )
    group = parser.add_argument_group("gateway (flags override RECSYS_* environment variables)")
    defaults = GatewayConfig.__dataclass_fields__

    def add(flag: str, env: str, cast: type, help_text: str) -> None:
        dest = flag[2:].replace("-", "_")
        field_name = {"scenarios": "scenarios_path"}.get(dest, dest)
        default = defaults[field_name].default
        try:
            value = env_default(env, default, cast)
        except ConfigError as error:
            parser.error(str(error))
        shown = redacted_url(value) if dest == "redis_url" else value  # --help never shows a password
        group.add_argument(
            flag, dest=dest, type=cast, default=value, help=f"{help_text} (env {env}; now {shown})"
        )

    add("--scenarios", "RECSYS_SCENARIOS", str, "scenario pipelines YAML")
    add("--recall-address", "RECSYS_RECALL_ADDRESS", str, "recall service HOST:PORT")
    add(
        "--recall-addresses",
        "RECSYS_RECALL_ADDRESSES",
        address_list,
        "sharded recall: comma-separated HOST:PORT per shard, in shard order (empty = --recall-address)",
    )
    add("--rank-address", "RECSYS_RANK_ADDRESS", str, "rank service HOST:PORT")
    add("--history-backend", "RECSYS_HISTORY_BACKEND", str, "event history store: sqlite or redis")
    add("--sqlite-path", "RECSYS_SQLITE_PATH", str, "SQLite history file")
    add("--redis-url", "RECSYS_REDIS_URL", str, "Redis URL for the redis history backend")
    add("--max-history-length", "RECSYS_MAX_HISTORY_LENGTH", int, "events per user in the history window")
    add(
        "--sqlite-synchronous",
        "RECSYS_SQLITE_SYNCHRONOUS",
        str.upper,
        "SQLite durability: NORMAL (survives a process crash) or FULL (also power loss)",
    )
    add(
        "--dedupe-retention-hours",
        "RECSYS_DEDUPE_RETENTION_HOURS",
        float,
        "how long an accepted event_id is remembered as a duplicate (any user)",
    )
    add("--max-in-flight", "RECSYS_MAX_IN_FLIGHT", int, "requests in flight before shedding")
    add("--default-deadline-ms", "RECSYS_DEFAULT_DEADLINE_MS", float, "deadline when the caller sets none")
    add("--reload-interval-s", "RECSYS_RELOAD_INTERVAL_S", float, "scenario file poll interval")
    add("--downstream-tls-ca", "RECSYS_DOWNSTREAM_TLS_CA", str, "CA to verify recall/rank TLS with")
    add(
        "--downstream-in-flight",
        "RECSYS_DOWNSTREAM_IN_FLIGHT",
        int,
        "calls out at once to recall and to rank; requests arriving meanwhile go in one batch call "
        "(0 = a call per request; with several pods, at least their number)",
    )
    add(
        "--downstream-max-hold-ms",
        "RECSYS_DOWNSTREAM_MAX_HOLD_MS",
        float,
        "longest a request waits behind those calls before it goes out anyway, past the limit "
        "(0 = until a call returns)",
    )
    add(
        "--auth-tokens-file",
        "RECSYS_AUTH_TOKENS_FILE",
        str,
        "bearer tokens (sha256) and scopes, YAML/JSON; a mounted Secret works (recsys/serving/auth.py)",
    )
    try:
        allow = env_default("RECSYS_ALLOW_UNAUTHENTICATED", False, _flag)
        http_enabled = env_default("RECSYS_HTTP", True, _flag)
        http_port = env_default("RECSYS_HTTP_PORT", DEFAULT_HTTP_PORT, int)
    except ConfigError as error:
        parser.error(str(error))
    group.add_argument(
        "--http",
        action=argparse.BooleanOptionalAction,
        default=http_enabled,
        help="serve the HTTP/JSON API and the web console (/console) beside gRPC; --no-http turns "
        f"them off (env RECSYS_HTTP=0; now {http_enabled})",
    )
    group.add_argument(
        "--http-port",
        type=int,
        default=http_port,
        help=f"HTTP/JSON API and console port, 0 = any free port (env RECSYS_HTTP_PORT; now {http_port})",
    )
    group.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=allow,
        help="serve without a tokens file: anyone who reaches the port may call every method "
        f"(env RECSYS_ALLOW_UNAUTHENTICATED=1; now {allow})",
    )
    return parser


def _flag(value: str) -> bool:
    """An environment switch: 1/true/yes/on or 0/false/no/off."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1/true/yes/on or 0/false/no/off")


def redacted_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for help text and logs)."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not separator or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
