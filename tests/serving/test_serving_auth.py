"""Bearer tokens: the tokens file (parsing, errors that never show a digest, rotation without a
restart), constant-time lookup, the metadata parser, and the client helpers."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import grpc
import pytest

from recsys.serving.auth import (
    SCOPES,
    AccessPolicy,
    BearerAuthInterceptor,
    TokenFile,
    Unauthorized,
    bearer_metadata,
    bearer_token,
    load_tokens,
    read_token,
    token_digest,
    write_private,
    write_tokens_file,
)
from recsys.serving.config import ConfigError


def test_a_written_tokens_file_holds_only_digests_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    write_tokens_file(path, [("web", "web-secret", ["recommend", "events"]), ("ops", "ops-secret", SCOPES)])
    text = path.read_text()
    assert "web-secret" not in text and token_digest("web-secret") in text
    entries = load_tokens(path)
    assert [(entry.name, sorted(entry.scopes)) for entry in entries] == [
        ("web", ["events", "recommend"]),
        ("ops", sorted(SCOPES)),
    ]


def test_yaml_tokens_file_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - name: web\n    sha256: {token_digest('t1')}\n    scopes: [recommend]\n")
    tokens = TokenFile(path)
    entry = tokens.authenticate("t1")
    assert entry is not None and entry.name == "web" and entry.scopes == {"recommend"}
    assert tokens.authenticate("t2") is None
    assert tokens.authenticate("") is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not: [valid", "not valid YAML/JSON"),
        ("[]", "must be a mapping with a 'tokens' list"),
        ("tokens: []", "lists no tokens"),
        ("tokens: [{name: a, sha256: abc, scopes: [recommend]}]", "tokens[0].sha256: must be 64 hex digits"),
        ("tokens: [{name: a, sha256: DIGEST, scopes: [root]}]", "tokens[0].scopes: unknown scope 'root'"),
        ("tokens: [{name: a, sha256: DIGEST, scopes: []}]", "tokens[0].scopes: must be a non-empty list"),
        ("tokens: [{name: a, sha256: DIGEST, scopes: [events], token: x}]", "tokens[0]: must be a mapping"),
        (
            "tokens: [{name: a, sha256: DIGEST, scopes: [events]},"
            " {name: a, sha256: DIGEST, scopes: [events]}]",
            "tokens[1].name: must be a unique non-empty string",
        ),
    ],
)
def test_a_bad_tokens_file_is_refused_naming_the_entry(tmp_path: Path, document: str, message: str) -> None:
    digest = token_digest("secret")
    path = tmp_path / "tokens.yaml"
    path.write_text(document.replace("DIGEST", digest))
    with pytest.raises(ConfigError) as caught:
        load_tokens(path)
    assert str(caught.value).startswith(f"auth_tokens_file: {path}: ")
    assert message in str(caught.value)
    assert digest not in str(caught.value)


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth_tokens_file: .*cannot read"):
        load_tokens(tmp_path / "absent.yaml")


def test_a_rotated_file_takes_effect_and_a_broken_one_keeps_the_old_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    write_tokens_file(path, [("old", "old-token", ["recommend"])])
    now = [0.0]
    tokens = TokenFile(path, reload_interval_s=5.0, clock=lambda: now[0])
    assert tokens.authenticate("old-token") is not None

    write_tokens_file(path, [("new", "new-token", ["recommend"])])  # replaced, like a Secret update
    now[0] = 1.0  # not yet time to look
    assert tokens.authenticate("old-token") is not None
    now[0] = 6.0
    assert tokens.authenticate("new-token") is not None
    assert tokens.authenticate("old-token") is None

    path.write_text("tokens: oops")
    now[0] = 12.0
    assert tokens.authenticate("new-token") is not None  # the broken edit is ignored


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("Authorization", "bearer  abc "),), "abc"),
        ((("x-other", "1"), ("authorization", "Bearer abc")), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer"),), None),
        ((("authorization", "Bearer "),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token_parsing(metadata, token) -> None:
    assert bearer_token(metadata) == token


def test_check_maps_missing_invalid_and_unscoped_tokens_to_their_codes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    write_tokens_file(path, [("reader", "reader-token", ["recommend"])])
    policy = AccessPolicy(method_scopes={"/pkg.S/Read": "recommend", "/pkg.S/Write": "events"})
    interceptor = BearerAuthInterceptor(TokenFile(path), policy)
    assert interceptor.check("/pkg.S/Read", bearer_metadata("reader-token")).name == "reader"
    cases = [
        ("/pkg.S/Read", (), grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>'"),
        ("/pkg.S/Read", bearer_metadata("guess"), grpc.StatusCode.UNAUTHENTICATED, "invalid token"),
        (
            "/pkg.S/Write",
            bearer_metadata("reader-token"),
            grpc.StatusCode.PERMISSION_DENIED,
            "Write needs scope 'events'; token 'reader' lacks it",
        ),
        ("/pkg.S/Other", bearer_metadata("reader-token"), grpc.StatusCode.PERMISSION_DENIED, "not permitted"),
    ]
    for method, metadata, code, details in cases:
        with pytest.raises(Unauthorized) as caught:
            interceptor.check(method, metadata)
        assert caught.value.code == code and details in caught.value.details
        assert "reader-token" not in caught.value.details


def test_an_unknown_scope_in_a_policy_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown scope 'root'"):
        AccessPolicy(method_scopes={"/pkg.S/M": "root"})


def test_write_private_is_owner_only_and_read_token_takes_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dev-token"
    write_private(path, "tok-123\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token(path) == "tok-123"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no token"):
        read_token(path)


def test_tokens_file_is_json(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    write_tokens_file(path, [("dev", "t", ["admin"])])
    assert json.loads(path.read_text())["tokens"][0] == {
        "name": "dev",
        "sha256": token_digest("t"),
        "scopes": ["admin"],
    }
