"""Typed serving configuration shared by every service, read once from env vars and flags.

Precedence: command-line flag, then the environment variable (``RECSYS_PORT`` for ``--port``,
see docs/CONVENTIONS.md), then the service's default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from recsys.bundle import MANIFEST, resolve_bundle

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_RPCS = 1000


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


@dataclass(frozen=True)
class ServingConfig:
    """Everything the serving bootstrap needs: addresses, shutdown grace, limits, TLS, logging."""

    host: str = "0.0.0.0"
    port: int = 0  # 0 = any free port (read back from RunningServer.port)
    metrics_port: int = 0  # 0 = any free port (read back from RunningServer.metrics_port)
    grace_seconds: float = 5.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # RPCs one server handles at once; beyond it gRPC answers RESOURCE_EXHAUSTED before reading the
    # request, so memory stays below about max_concurrent_rpcs x max_message_bytes (x ~3 in copies).
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    # Clients are sent GOAWAY after this long (gRPC adds +-10% jitter) and reconnect, re-resolving
    # DNS: with round-robin over a headless Service, replicas added by the autoscaler get traffic.
    # In-flight calls get the grace period to finish. 0 = connections never expire.
    max_connection_age_s: float = 60.0
    max_connection_age_grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, clients must present a cert it signed
    log_level: str = "INFO"
    # CPUs every thread of the process runs on ("0", "0-3", "0,2"; "" = wherever the OS puts them):
    # one whole-cascade replica per core stays on its core (its caches warm, no migrations).
    cpu_affinity: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @property
    def mutual_tls(self) -> bool:
        return self.tls_client_ca is not None

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        if not self.host:
            raise ConfigError("host: must not be empty")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ConfigError(f"{name}: must be an integer in 0..65535, got {value!r}")
        if self.port != 0 and self.port == self.metrics_port:
            raise ConfigError(f"metrics_port: must differ from port, both are {self.port}")
        if not self.grace_seconds >= 0:  # also rejects NaN
            raise ConfigError(f"grace_seconds: must be >= 0, got {self.grace_seconds!r}")
        if isinstance(self.max_message_bytes, bool) or not isinstance(self.max_message_bytes, int):
            raise ConfigError(f"max_message_bytes: must be an integer, got {self.max_message_bytes!r}")
        if not 1024 <= self.max_message_bytes <= 2**31 - 1:
            raise ConfigError(f"max_message_bytes: must be in 1024..2147483647, got {self.max_message_bytes}")
        if isinstance(self.max_concurrent_rpcs, bool) or not isinstance(self.max_concurrent_rpcs, int):
            raise ConfigError(f"max_concurrent_rpcs: must be an integer, got {self.max_concurrent_rpcs!r}")
        if not 1 <= self.max_concurrent_rpcs <= 1_000_000:
            raise ConfigError(f"max_concurrent_rpcs: must be in 1..1000000, got {self.max_concurrent_rpcs}")
        for name in ("max_connection_age_s", "max_connection_age_grace_s"):
            value = getattr(self, name)
            if not 0 <= value <= 86400:  # also rejects NaN
                raise ConfigError(f"{name}: must be in 0..86400 seconds, got {value!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert, tls_key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}: file not found: {path}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.cpu_affinity:
            cpus = parse_cpu_list(self.cpu_affinity)  # ConfigError naming the setting when malformed
            if not hasattr(os, "sched_setaffinity"):
                raise ConfigError("cpu_affinity: this platform cannot pin threads to CPUs")
            allowed = os.sched_getaffinity(0)
            if not cpus <= allowed:
                raise ConfigError(
                    f"cpu_affinity: CPUs {sorted(cpus - allowed)} are not available to this process "
                    f"(available: {format_cpu_list(allowed)})"
                )


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs of a Linux CPU list ("0", "0-3", "0,2,4-5"); ConfigError when malformed or empty."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ConfigError(f"cpu_affinity: {text!r} is not a CPU list like 0, 0-3 or 0,2")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ConfigError(f"cpu_affinity: range {part.strip()!r} runs backwards")
        cpus.update(range(first, last + 1))
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """``cpus`` as a Linux CPU list (ranges collapsed): {0, 1, 2, 5} -> "0-2,5"."""
    parts: list[str] = []
    for cpu in sorted(cpus):
        if parts and cpu == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def env_default(name: str, default: T, cast: Callable[[str], Any] = str) -> Any:
    """The value of environment variable ``name`` passed through ``cast``, or ``default`` when the
    variable is unset or empty. A value ``cast`` rejects raises ConfigError naming the variable."""
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return cast(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: invalid value {raw!r} ({exc})") from None


def add_env_arguments(
    group: argparse._ArgumentGroup,
    settings: Sequence[tuple[str, Callable[[str], Any], Any, str]],
    choices: dict[str, Sequence[str]] | None = None,
) -> None:
    """One ``--kebab-name`` flag per ``(name, cast, default, help)``, defaulting to its
    ``RECSYS_<NAME>`` variable, then to ``default``; raises ConfigError on a bad variable."""
    for name, cast, default, text in settings:
        variable = f"RECSYS_{name.upper()}"
        value = env_default(variable, default, cast)
        group.add_argument(
            f"--{name.replace('_', '-')}",
            type=cast,
            default=value,
            choices=(choices or {}).get(name),
            help=f"{text} (env {variable}; now {value})",
        )


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


# flag -> (env var, cast, help); the flag's dest is the ServingConfig field name.
_SERVING_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--host": ("RECSYS_HOST", str, "address to bind the gRPC and metrics servers"),
    "--port": ("RECSYS_PORT", int, "gRPC port (0 = any free port)"),
    "--metrics-port": ("RECSYS_METRICS_PORT", int, "HTTP /metrics port (0 = any free port)"),
    "--grace-seconds": ("RECSYS_GRACE_SECONDS", float, "in-flight calls get this long on shutdown"),
    "--max-message-bytes": ("RECSYS_MAX_MESSAGE_BYTES", int, "largest gRPC message sent or received"),
    "--max-concurrent-rpcs": (
        "RECSYS_MAX_CONCURRENT_RPCS",
        int,
        "RPCs handled at once; more are refused with RESOURCE_EXHAUSTED before their request is read",
    ),
    "--max-connection-age-s": (
        "RECSYS_MAX_CONNECTION_AGE_S",
        float,
        "clients reconnect (and re-resolve) after this long, so new replicas get traffic; 0 = never",
    ),
    "--max-connection-age-grace-s": (
        "RECSYS_MAX_CONNECTION_AGE_GRACE_S",
        float,
        "in-flight calls on an expired connection get this long",
    ),
    "--tls-cert": ("RECSYS_TLS_CERT", _optional_path, "server certificate chain (PEM); enables TLS"),
    "--tls-key": ("RECSYS_TLS_KEY", _optional_path, "server private key (PEM)"),
    "--tls-client-ca": ("RECSYS_TLS_CLIENT_CA", _optional_path, "client CA (PEM); enables mutual TLS"),
    "--log-level": ("RECSYS_LOG_LEVEL", _log_level, f"one of {', '.join(LOG_LEVELS)}"),
    "--cpu-affinity": (
        "RECSYS_CPU_AFFINITY",
        str,
        "CPUs all of this process's threads run on, e.g. 0 or 0-3 ('' = any)",
    ),
}


def add_serving_arguments(
    parser: argparse.ArgumentParser,
    default_port: int,
    default_metrics_port: int,
    *,
    max_message_bytes: int = ServingConfig.max_message_bytes,
    max_concurrent_rpcs: int = ServingConfig.max_concurrent_rpcs,
) -> None:
    """Add the common serving flags to ``parser``; each defaults to its env var, then the default
    (a service may pass its own message size and concurrency defaults).

    An invalid environment value makes the parser exit with a usage error naming the variable.
    """
    defaults: dict[str, Any] = {
        "host": ServingConfig.host,
        "port": default_port,
        "metrics_port": default_metrics_port,
        "grace_seconds": ServingConfig.grace_seconds,
        "max_message_bytes": max_message_bytes,
        "max_concurrent_rpcs": max_concurrent_rpcs,
        "max_connection_age_s": ServingConfig.max_connection_age_s,
        "max_connection_age_grace_s": ServingConfig.max_connection_age_grace_s,
        "tls_cert": None,
        "tls_key": None,
        "tls_client_ca": None,
        "log_level": ServingConfig.log_level,
        "cpu_affinity": ServingConfig.cpu_affinity,
    }
    group = parser.add_argument_group("serving (flags override RECSYS_* environment variables)")
    for flag, (env_name, cast, help_text) in _SERVING_FLAGS.items():
        dest = flag[2:].replace("-", "_")
        try:
            default = env_default(env_name, defaults[dest], cast)
        except ConfigError as exc:
            parser.error(str(exc))
        shown = "unset" if default is None else default
        group.add_argument(
            flag,
            dest=dest,
            type=cast,
            default=default,
            metavar=dest.upper(),
            help=f"{help_text} (env {env_name}; now {shown})",
        )


def serving_config_from_args(args: argparse.Namespace) -> ServingConfig:
    """Build and validate the ServingConfig from flags added by ``add_serving_arguments``.

    Raises ConfigError naming the invalid setting (ports, TLS pairs, missing files, log level).
    """
    return ServingConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        grace_seconds=args.grace_seconds,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_connection_age_s=args.max_connection_age_s,
        max_connection_age_grace_s=args.max_connection_age_grace_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        log_level=args.log_level,
        cpu_affinity=args.cpu_affinity,
    )


DEVICES = ("auto", "cpu", "gpu")
ModelConfigT = TypeVar("ModelConfigT", bound="ModelServingConfig")


@dataclass(frozen=True)
class ModelServingConfig:
    """Serving settings plus what a model-serving process (recall, rank) needs: its bundle, the
    device, micro-batching and compute threads. Each service subclasses it to set its name,
    ports and defaults, so both read the same RECSYS_* variables and flags the same way."""

    serving: ServingConfig
    bundle: Path
    device: str = "auto"
    max_batch: int = 64  # requests per model run
    max_wait_ms: float = 0.0  # how long an idle batcher waits for companions (0 = dispatch at once)
    threads: int = 1  # Faiss / ONNX Runtime compute threads
    max_queue: int = 256  # requests waiting for a batch beyond this are shed (RESOURCE_EXHAUSTED)
    # How often the bundle location is checked for a new version (the `current` link's target or
    # a rewritten manifest), which is then loaded, verified and warmed in the background and
    # swapped in; 0 = load once, never watch.
    bundle_poll_s: float = 5.0

    component: ClassVar[str] = "model"
    default_port: ClassVar[int] = 0
    default_metrics_port: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError(f"max_batch: must be in 1..4096, got {self.max_batch}")
        if not 0.0 <= self.max_wait_ms <= 1000.0:
            raise ConfigError(f"max_wait_ms: must be in 0..1000, got {self.max_wait_ms}")
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"threads: must be in 1..256, got {self.threads}")
        if not 1 <= self.max_queue <= 1_000_000:
            raise ConfigError(f"max_queue: must be in 1..1000000, got {self.max_queue}")
        if not 0.0 <= self.bundle_poll_s <= 86400.0:  # also rejects NaN
            raise ConfigError(f"bundle_poll_s: must be in 0..86400 seconds, got {self.bundle_poll_s}")
        if not (resolve_bundle(self.bundle) / MANIFEST).is_file():
            raise ConfigError(
                f"bundle: no {self.component} bundle at {self.bundle} "
                f"(build it with `recsys train {self.component}`)"
            )

    @classmethod
    def build_parser(cls) -> argparse.ArgumentParser:
        """Serving flags plus --bundle/--device/--max-batch/--max-wait-ms/--threads, each
        defaulting to its RECSYS_* variable, then to the class's default."""
        parser = argparse.ArgumentParser(
            prog=f"recsys serve {cls.component}", description=f"Serve the {cls.component} stage over gRPC."
        )
        add_serving_arguments(parser, cls.default_port, cls.default_metrics_port)
        group = parser.add_argument_group(f"{cls.component} (flags override RECSYS_* environment variables)")
        defaults = {f.name: f.default for f in fields(cls)}
        try:
            settings: list[tuple[str, type, Any, str]] = [
                (
                    "bundle",
                    Path,
                    Path(f"artifacts/synthetic/{cls.component}"),
                    f"{cls.component} bundle folder (or a folder of versions with a `current` link)",
                ),
                ("device", str, defaults["device"], "where the model (and index) run"),
                *cls._compute_settings(""),
            ]
            add_env_arguments(group, settings, choices={"device": DEVICES})
        except ConfigError as error:
            parser.error(str(error))
        return parser

    @classmethod
    def _compute_settings(cls, prefix: str) -> list[tuple[str, type, Any, str]]:
        """(name, cast, default, help) of batching, threads and bundle watching, names prefixed."""
        defaults = {f.name: f.default for f in fields(cls)}
        return [
            (f"{prefix}max_batch", int, defaults["max_batch"], "most requests per model run"),
            (
                f"{prefix}max_wait_ms",
                float,
                defaults["max_wait_ms"],
                "longest an idle batcher waits for companions (0 = dispatch at once)",
            ),
            (f"{prefix}threads", int, defaults["threads"], "Faiss/ONNX Runtime compute threads"),
            (f"{prefix}max_queue", int, defaults["max_queue"], "requests waiting beyond this are shed"),
            (
                f"{prefix}bundle_poll_s",
                float,
                defaults["bundle_poll_s"],
                "seconds between checks for a new bundle version to hot-swap (0 = never)",
            ),
        ]

    @classmethod
    def add_embedded_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Flags for this stage's model served inside another process (the gateway's):
        ``--<component>-bundle`` (unset: the stage is called over gRPC) and
        ``--<component>-max-batch/-max-wait-ms/-threads/-max-queue/-bundle-poll-s``, each
        defaulting to its ``RECSYS_<COMPONENT>_*`` variable, then to the service's own default."""
        prefix = f"{cls.component}_"
        group = parser.add_argument_group(
            f"{cls.component} in this process (flags override RECSYS_{cls.component.upper()}_* variables)"
        )
        try:
            bundle = (
                f"{prefix}bundle",
                _optional_path,
                None,
                f"{cls.component} bundle served in this process (unset: {cls.component} over gRPC)",
            )
            add_env_arguments(group, [bundle, *cls._compute_settings(prefix)])
        except ConfigError as error:
            parser.error(str(error))

    @classmethod
    def from_embedded_args(
        cls: type[ModelConfigT], args: argparse.Namespace, device: str = "auto"
    ) -> ModelConfigT | None:
        """The config of :meth:`add_embedded_arguments`' flags; None without a bundle. Raises
        ConfigError when invalid."""
        prefix = f"{cls.component}_"
        bundle = getattr(args, f"{prefix}bundle")
        if bundle is None:
            return None
        settings = {name: getattr(args, f"{prefix}{name}") for name, *_ in cls._compute_settings("")}
        return cls.embedded(bundle, device, **settings)

    @classmethod
    def embedded(
        cls: type[ModelConfigT], bundle: Path, device: str = "auto", **settings: Any
    ) -> ModelConfigT:
        """A config for this stage served inside another process: no server settings of its own."""
        return cls(serving=ServingConfig(), bundle=bundle, device=device, **settings)

    @classmethod
    def from_args(cls: type[ModelConfigT], argv: Sequence[str] | None = None) -> ModelConfigT:
        """Parse flags (defaulting to env vars, then built-in defaults); raises ConfigError when invalid."""
        args = cls.build_parser().parse_args(None if argv is None else list(argv))
        return cls(
            serving=serving_config_from_args(args),
            bundle=args.bundle,
            device=args.device,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            threads=args.threads,
            max_queue=args.max_queue,
            bundle_poll_s=args.bundle_poll_s,
        )
