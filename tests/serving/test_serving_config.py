"""ServingConfig from flags and RECSYS_* env vars: precedence, parsing and validation."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from recsys.serving.config import (
    ConfigError,
    ServingConfig,
    add_serving_arguments,
    env_default,
    format_cpu_list,
    parse_cpu_list,
    serving_config_from_args,
)

SERVING_ENV_VARS = (
    "RECSYS_HOST",
    "RECSYS_PORT",
    "RECSYS_METRICS_PORT",
    "RECSYS_GRACE_SECONDS",
    "RECSYS_MAX_MESSAGE_BYTES",
    "RECSYS_MAX_CONCURRENT_RPCS",
    "RECSYS_MAX_CONNECTION_AGE_S",
    "RECSYS_MAX_CONNECTION_AGE_GRACE_S",
    "RECSYS_TLS_CERT",
    "RECSYS_TLS_KEY",
    "RECSYS_TLS_CLIENT_CA",
    "RECSYS_LOG_LEVEL",
    "RECSYS_CPU_AFFINITY",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVING_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def parse(argv: list[str]) -> ServingConfig:
    parser = argparse.ArgumentParser(prog="recall")
    add_serving_arguments(parser, default_port=50051, default_metrics_port=9091)
    return serving_config_from_args(parser.parse_args(argv))


def test_service_defaults_apply_without_env_or_flags() -> None:
    assert parse([]) == ServingConfig(host="0.0.0.0", port=50051, metrics_port=9091)
    assert ServingConfig().max_message_bytes == 16 * 1024 * 1024


def test_env_overrides_defaults_and_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_PORT", "6000")
    monkeypatch.setenv("RECSYS_METRICS_PORT", "6001")
    monkeypatch.setenv("RECSYS_GRACE_SECONDS", "2.5")
    monkeypatch.setenv("RECSYS_MAX_MESSAGE_BYTES", "4096")
    monkeypatch.setenv("RECSYS_LOG_LEVEL", "debug")
    monkeypatch.setenv("RECSYS_HOST", "127.0.0.1")

    from_env = parse([])
    assert (from_env.port, from_env.metrics_port, from_env.grace_seconds) == (6000, 6001, 2.5)
    assert (from_env.max_message_bytes, from_env.log_level, from_env.host) == (4096, "DEBUG", "127.0.0.1")

    from_flags = parse(["--port", "7000", "--grace-seconds", "0", "--log-level", "warning", "--host", "::"])
    assert (from_flags.port, from_flags.metrics_port, from_flags.grace_seconds) == (7000, 6001, 0.0)
    assert (from_flags.log_level, from_flags.host) == ("WARNING", "::")


def test_empty_env_value_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_PORT", "")
    assert parse([]).port == 50051


def test_invalid_env_value_is_a_usage_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECSYS_PORT", "fifty")
    with pytest.raises(SystemExit) as exited:
        parse([])
    assert exited.value.code == 2
    assert "RECSYS_PORT" in capsys.readouterr().err


def test_invalid_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--log-level", "loud"])
    assert "--log-level" in capsys.readouterr().err


def test_tls_paths_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("placeholder PEM")
    monkeypatch.setenv("RECSYS_TLS_CERT", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("RECSYS_TLS_KEY", str(tmp_path / "key.pem"))
    config = parse(["--tls-client-ca", str(tmp_path / "ca.pem")])
    assert config.tls_cert == tmp_path / "cert.pem" and config.tls_key == tmp_path / "key.pem"
    assert config.tls_enabled and config.mutual_tls


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "65536"], "port: must be an integer in 0..65535"),
        (["--metrics-port", "-1"], "metrics_port: must be an integer in 0..65535"),
        (["--port", "9000", "--metrics-port", "9000"], "metrics_port: must differ from port"),
        (["--grace-seconds", "-1"], "grace_seconds: must be >= 0"),
        (["--grace-seconds", "nan"], "grace_seconds: must be >= 0"),
        (["--max-message-bytes", "10"], "max_message_bytes: must be in 1024.."),
        (["--host", ""], "host: must not be empty"),
        (["--max-concurrent-rpcs", "0"], "max_concurrent_rpcs: must be in 1..1000000"),
        (["--max-connection-age-s", "-1"], "max_connection_age_s: must be in 0..86400"),
        (["--max-connection-age-grace-s", "nan"], "max_connection_age_grace_s: must be in 0..86400"),
        (["--cpu-affinity", "0-"], "cpu_affinity: '0-' is not a CPU list"),
        (["--cpu-affinity", "a"], "cpu_affinity: 'a' is not a CPU list"),
        (["--cpu-affinity", "3-1"], "cpu_affinity: range '3-1' runs backwards"),
        (["--cpu-affinity", "100000"], "100000] are not available to this process"),
    ],
)
def test_invalid_values_are_rejected_naming_the_setting(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse(argv)


def test_tls_needs_cert_and_key_together_and_existing_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("placeholder PEM")
    with pytest.raises(ConfigError, match="tls_cert, tls_key: give both or neither"):
        parse(["--tls-cert", str(cert)])
    with pytest.raises(ConfigError, match="tls_key: file not found"):
        parse(["--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.pem")])
    with pytest.raises(ConfigError, match="tls_client_ca: mutual TLS needs tls_cert"):
        ServingConfig(tls_client_ca=cert)


def test_env_default_casts_or_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_default("RECSYS_THREADS", 2, int) == 2
    monkeypatch.setenv("RECSYS_THREADS", "4")
    assert env_default("RECSYS_THREADS", 2, int) == 4
    monkeypatch.setenv("RECSYS_THREADS", "four")
    with pytest.raises(ConfigError, match="RECSYS_THREADS: invalid value 'four'"):
        env_default("RECSYS_THREADS", 2, int)


def test_concurrency_and_connection_age_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    def limits(config: ServingConfig) -> tuple[int, float, float]:
        return config.max_concurrent_rpcs, config.max_connection_age_s, config.max_connection_age_grace_s

    assert limits(parse([])) == (1000, 60.0, 10.0)
    monkeypatch.setenv("RECSYS_MAX_CONCURRENT_RPCS", "32")
    monkeypatch.setenv("RECSYS_MAX_CONNECTION_AGE_S", "0")
    assert limits(parse(["--max-connection-age-grace-s", "2.5"])) == (32, 0.0, 2.5)


def test_a_service_can_set_its_own_size_and_concurrency_defaults() -> None:
    parser = argparse.ArgumentParser(prog="gateway")
    add_serving_arguments(parser, 50050, 9090, max_message_bytes=4 << 20, max_concurrent_rpcs=64)
    config = serving_config_from_args(parser.parse_args([]))
    assert (config.max_message_bytes, config.max_concurrent_rpcs) == (4 << 20, 64)


def test_cpu_lists_parse_and_print_like_linux_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_cpu_list("0") == {0}
    assert parse_cpu_list("0-2, 5,7-8") == {0, 1, 2, 5, 7, 8}
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert format_cpu_list({3}) == "3"
    first = min(os.sched_getaffinity(0))
    monkeypatch.setenv("RECSYS_CPU_AFFINITY", str(first))
    assert parse([]).cpu_affinity == str(first)
    assert parse(["--cpu-affinity", ""]).cpu_affinity == ""  # the flag overrides: no pinning
