"""Bearer-token authentication and scope-based authorization for a public gRPC service.

Clients send ``authorization: Bearer <token>``. The server knows only each token's sha256, read
from a tokens file (YAML or JSON; a Kubernetes Secret mounted as a file works as is)::

    tokens:
      - name: web-frontend            # unique; shows up in logs instead of the token
        sha256: 3f0a...e91c           # hex sha256 of the token: printf %s "$TOKEN" | sha256sum
        scopes: [recommend, events]   # any of SCOPES

A request without a token, or with one not in the file, is answered UNAUTHENTICATED; a valid
token without the scope its method needs, PERMISSION_DENIED. Presented tokens are hashed and
compared with every known digest in constant time. The file is re-read when it changes (checked
at most every ``reload_interval_s``), so a rotated Secret takes effect without a restart; a file
that no longer parses is logged and the previous tokens stay in force.

Client side: :class:`BearerTokenInterceptor` here; the token helpers (:func:`read_token`,
:func:`bearer_metadata`, ``TOKEN_ENV``) live in :mod:`recsys.client` and are re-exported here.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from recsys.client import AUTHORIZATION, bearer_metadata
from recsys.client import TOKEN_ENV as TOKEN_ENV  # re-exported: defined once, in the client
from recsys.client import read_token as read_token
from recsys.serving.config import ConfigError
from recsys.serving.validation import MalformedRequest

logger = logging.getLogger(__name__)

SCOPES = ("recommend", "events", "debug", "admin")
DEV_TOKEN_FILE = "dev-token"  # in the artifacts folder: the token `make run` made (mode 0600)
TOKENS_FILE = "auth-tokens.json"  # in the artifacts folder: its digest, for the gateway

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token: its name, the sha256 of the token, and what it may do."""

    name: str
    sha256: bytes
    scopes: frozenset[str]


def token_digest(token: str) -> str:
    """Hex sha256 of ``token`` (what a tokens file stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)  # O_CREAT's mode is masked by the umask; be explicit
    os.replace(temporary, path)


def write_tokens_file(path: Path, tokens: Iterable[tuple[str, str, Collection[str]]]) -> None:
    """Write a tokens file (JSON, which is valid YAML; mode 0600) for ``(name, token, scopes)``
    triples. Only the tokens' digests are written."""
    document = {
        "tokens": [
            {"name": name, "sha256": token_digest(token), "scopes": sorted(scopes)}
            for name, token, scopes in tokens
        ]
    }
    write_private(path, json.dumps(document, indent=2) + "\n")


def load_tokens(path: Path) -> tuple[TokenEntry, ...]:
    """Parse a tokens file; ConfigError naming ``auth_tokens_file`` and the bad entry otherwise.
    Error messages never include digests or tokens."""

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"auth_tokens_file: {path}: {reason}")

    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise fail(f"cannot read ({error.strerror})") from None
    except yaml.YAMLError:
        raise fail("not valid YAML/JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("tokens"), list):
        raise fail("must be a mapping with a 'tokens' list")
    entries: list[TokenEntry] = []
    names: set[str] = set()
    for i, item in enumerate(document["tokens"]):
        where = f"tokens[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "sha256", "scopes"}:
            raise fail(f"{where}: must be a mapping of name, sha256 and scopes")
        name, digest, scopes = item.get("name"), item.get("sha256"), item.get("scopes")
        if not isinstance(name, str) or not name or name in names:
            raise fail(f"{where}.name: must be a unique non-empty string")
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
            raise fail(f"{where}.sha256: must be 64 hex digits (the sha256 of the token)")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise fail(f"{where}.scopes: must be a non-empty list of {', '.join(SCOPES)}")
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise fail(f"{where}.scopes: unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
        names.add(name)
        entries.append(TokenEntry(name, bytes.fromhex(digest), frozenset(scopes)))
    if not entries:
        raise fail("lists no tokens")
    return tuple(entries)


class TokenFile:
    """The tokens of a tokens file, re-read when the file changes."""

    def __init__(
        self,
        path: Path,
        reload_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._signature = self._stat()
        self.entries = load_tokens(self.path)
        self._checked_at = clock()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()  # follows the ..data link a Secret volume swaps on update
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _reload_if_changed(self) -> None:
        now = self._clock()
        if now - self._checked_at < self.reload_interval_s:
            return
        self._checked_at = now
        signature = self._stat()
        if signature is None or signature == self._signature:
            return
        self._signature = signature
        try:
            self.entries = load_tokens(self.path)
        except ConfigError as error:
            logger.error("tokens file rejected, keeping the previous tokens: %s", error)
            return
        logger.info("tokens file reloaded", extra={"tokens": len(self.entries)})

    def authenticate(self, token: str) -> TokenEntry | None:
        """The entry whose digest matches ``token``, else None. Every digest is compared (in
        constant time), so the time taken says nothing about which, if any, matched."""
        self._reload_if_changed()
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        match = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.sha256):
                match = entry
        return match


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry in ``metadata``, or None."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


@dataclass(frozen=True)
class AccessPolicy:
    """Which scope each method needs (full method names, ``/package.Service/Method``).

    ``open_services`` need no token (health checks, reflection). A method of any other service
    that is not in ``method_scopes`` is refused to everyone (fail closed). ``request_scopes`` adds
    scopes that depend on the request, e.g. ``debug=true`` needing ``debug``.
    """

    method_scopes: Mapping[str, str]
    open_services: frozenset[str] = frozenset()
    request_scopes: Mapping[str, Callable[[Any], Collection[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.method_scopes.values()) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope {unknown[0]!r}")

    def is_open(self, method: str) -> bool:
        service = method.lstrip("/").rpartition("/")[0]
        return service in self.open_services


class Unauthorized(Exception):
    """The call is refused: ``code`` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _method_name(method: str) -> str:
    return method.rpartition("/")[2]


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Server interceptor enforcing an :class:`AccessPolicy` with the tokens of a :class:`TokenFile`.

    Refused calls are answered without parsing their request (no deserializer runs).
    """

    def __init__(self, tokens: TokenFile, policy: AccessPolicy) -> None:
        self.tokens = tokens
        self.policy = policy

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> TokenEntry:
        """The caller's token entry if it may call ``method``; raises :class:`Unauthorized`."""
        token = bearer_token(metadata)
        if token is None:
            raise Unauthorized(
                grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
            )
        entry = self.tokens.authenticate(token)
        if entry is None:
            raise Unauthorized(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        scope = self.policy.method_scopes.get(method)
        if scope is None:
            raise Unauthorized(grpc.StatusCode.PERMISSION_DENIED, f"{_method_name(method)}: not permitted")
        if scope not in entry.scopes:
            raise Unauthorized(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{_method_name(method)} needs scope '{scope}'; token '{entry.name}' lacks it",
            )
        return entry

    def check_request(self, method: str, request: Any, entry: TokenEntry) -> None:
        """Raise PERMISSION_DENIED :class:`Unauthorized` when ``request`` needs a scope (such as
        ``debug``) that ``entry`` lacks; the HTTP API calls this too."""
        request_scopes = self.policy.request_scopes.get(method)
        if request_scopes is None:
            return
        missing = sorted(set(request_scopes(request)) - entry.scopes)
        if missing:
            raise Unauthorized(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this request needs scope '{missing[0]}'; token '{entry.name}' lacks it",
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.policy.is_open(method):
            return handler
        try:
            entry = self.check(method, handler_call_details.invocation_metadata)
        except Unauthorized as refusal:
            logger.debug("call refused", extra={"method": _method_name(method), "code": refusal.code.name})
            return _refusing(handler, refusal)
        if method not in self.policy.request_scopes or handler.request_streaming:
            return handler
        name = "unary_stream" if handler.response_streaming else "unary_unary"
        check = functools.partial(self.check_request, method, entry=entry)
        return handler._replace(**{name: _checking_request(getattr(handler, name), check)})


def _refusing(handler: grpc.RpcMethodHandler, refusal: Unauthorized) -> grpc.RpcMethodHandler:
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(refusal.code, refusal.details)

    kind = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(handler.request_streaming, handler.response_streaming)]
    return handler._replace(request_deserializer=None, **{kind: refuse})


def _checking_request(behavior: Callable[..., Any], check: Callable[[Any], None]) -> Callable[..., Any]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):  # answered INVALID_ARGUMENT further in
            return await behavior(request, context)
        try:
            check(request)
        except Unauthorized as refusal:
            await context.abort(refusal.code, refusal.details)
        return await behavior(request, context)

    return checked


# -- client side ----------------------------------------------------------------------------


class BearerTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Client interceptor adding ``authorization: Bearer <token>`` to every unary call of a
    channel: ``grpc.aio.insecure_channel(address, interceptors=[BearerTokenInterceptor(token)])``."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *self._metadata)
        return await continuation(client_call_details._replace(metadata=metadata), request)
