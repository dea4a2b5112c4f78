"""The `recsys` dispatcher: every verb resolves to an importable entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recsys.app import cli


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in cli.COMMANDS:
        assert verb in out


@pytest.mark.parametrize(
    "target", sorted({t for components in cli.COMMANDS.values() for t in components.values()})
)
def test_every_entry_point_resolves_to_a_callable(target: str) -> None:
    assert callable(cli._resolve(target))


def test_unknown_component_exits_with_usage_error() -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["train", "nonsense"])
    assert raised.value.code == 2


def test_python_dash_m_recsys_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "recsys", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "serve" in done.stdout


def test_bench_counts_are_usage_errors_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.app import e2e_bench

    with pytest.raises(SystemExit) as exit_info:
        e2e_bench.build_parser().parse_args(["--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats: must be >= 1, got 0" in capsys.readouterr().err
    assert e2e_bench.build_parser().parse_args(["--repeats", "2"]).repeats == 2
