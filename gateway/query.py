"""`recsys query`: call the gateway from a terminal.

recsys query --scenario home --user U [--item X ...] [--category C] [-n 10] [--debug]
recsys query events --user U --item X --type add_to_cart [--event-id ID] [--scenario S]

Calls carry ``authorization: Bearer <token>``: the token in --token-file, else $RECSYS_TOKEN,
else the one `make run` wrote to artifacts/dev-token (when that file exists).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from gateway.config import DEFAULT_PORT
from recsys.client import (
    TOKEN_ENV,
    Event,
    Recommendation,
    RecsysClient,
    RecsysError,
    UnauthenticatedError,
    event_type_value,
    read_token,
)
from recsys.serving.auth import DEV_TOKEN_FILE
from recsys.serving.config import env_default

DEFAULT_GATEWAY = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_TOKEN_FILE = Path("artifacts") / DEV_TOKEN_FILE


class TokenError(Exception):
    """The token file named on the command line cannot be used."""


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    """--token-file; the help says whether $RECSYS_TOKEN is set, never its value."""
    shown = "set" if os.environ.get(TOKEN_ENV, "").strip() else "unset"
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token (default: env {TOKEN_ENV}, now {shown}; "
        f"else {DEFAULT_TOKEN_FILE} when it exists)",
    )


def token_from_args(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file, else $RECSYS_TOKEN, else artifacts/dev-token if present."""
    path = args.token_file
    if path is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if token:
            return token
        if not DEFAULT_TOKEN_FILE.is_file():
            return None
        path = DEFAULT_TOKEN_FILE
    try:
        return read_token(path)
    except (OSError, ValueError) as error:
        raise TokenError(f"--token-file: cannot read a token from {path}: {error}") from None


def _gateway_argument(parser: argparse.ArgumentParser) -> None:
    default = env_default("RECSYS_GATEWAY_ADDRESS", DEFAULT_GATEWAY)
    parser.add_argument(
        "--gateway", default=default, help=f"gateway HOST:PORT (env RECSYS_GATEWAY_ADDRESS; now {default})"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="call deadline, seconds")
    add_token_argument(parser)


def build_recommend_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys query",
        description="Recommendations from the gateway (`recsys query events --help` to send events).",
    )
    _gateway_argument(parser)
    parser.add_argument("--scenario", default="home", help="scenario name from the gateway's config")
    parser.add_argument("--user", default="", help="user id")
    parser.add_argument(
        "--item",
        action="append",
        default=[],
        help="context item (viewed item / cart item); repeat for several",
    )
    parser.add_argument("--category", default="", help="context category (category scenario)")
    parser.add_argument("-n", "--num-items", type=int, default=10)
    parser.add_argument("--debug", action="store_true", help="explain each item")
    return parser


def build_events_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys query events", description="Send one event to the gateway.")
    _gateway_argument(parser)
    parser.add_argument("--user", required=True)
    parser.add_argument("--item", required=True)
    parser.add_argument("--type", default="view", help="view, click, add_to_cart or purchase")
    parser.add_argument("--event-id", default="", help="idempotency key (default: a new UUID)")
    parser.add_argument("--scenario", default="")
    return parser


def format_response(response: Recommendation, debug: bool) -> str:
    """A readable table of the items plus the response's status line."""
    header = f"{'#':>3}  {'item':<24} {'score':>10}  {'source':<10}"
    if debug:
        header += f"  {'recall':>8} {'rank':>8}  explanation"
    lines = [header, "-" * len(header)]
    for position, item in enumerate(response.items, 1):
        line = f"{position:>3}  {item.item_id:<24} {item.score:>10.4f}  {item.source:<10}"
        if debug:
            line += f"  {item.recall_score:>8.4f} {item.rank_score:>8.4f}  {item.explanation}"
        lines.append(line)
    timings = "  ".join(f"{stage} {ms:.1f}ms" for stage, ms in response.timings_ms.items())
    status = "DEGRADED (" + ", ".join(response.degraded_reasons) + ")" if response.degraded else "ok"
    lines.append(f"{len(response.items)} items  model {response.model_version or '-'}  {status}")
    lines.append(f"timings: {timings}")
    return "\n".join(lines)


def _client(args: argparse.Namespace) -> RecsysClient:
    return RecsysClient(args.gateway, token=token_from_args(args), timeout_s=args.timeout)


def _recommend(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        response = client.recommend(
            args.user,
            args.scenario,
            num_items=args.num_items,
            context_items=args.item,
            category=args.category,
            debug=args.debug,
            request_id=uuid.uuid4().hex,
        )
    print(format_response(response, args.debug), file=out)
    return 0


def _events(args: argparse.Namespace, out: TextIO) -> int:
    try:
        event_type_value(args.type)
    except ValueError:
        print(
            f"--type: unknown event type {args.type!r} (view, click, add_to_cart, purchase)", file=sys.stderr
        )
        return 2
    event_id = {"event_id": args.event_id} if args.event_id else {}  # else a new UUID
    event = Event(user_id=args.user, item_id=args.item, type=args.type, scenario=args.scenario, **event_id)
    with _client(args) as client:
        result = client.log_events([event])
    print(f"event {event.event_id}: accepted {result.accepted}, duplicates {result.duplicates}", file=out)
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if out is None else out
    try:
        if argv[:1] == ["events"]:
            return _events(build_events_parser().parse_args(argv[1:]), out)
        return _recommend(build_recommend_parser().parse_args(argv), out)
    except TokenError as error:
        print(error, file=sys.stderr)
        return 2
    except RecsysError as error:
        print(error, file=sys.stderr)  # CODE: details (INVALID_ARGUMENT names the field)
        if isinstance(error, UnauthenticatedError):
            print(
                f"pass --token-file FILE or set {TOKEN_ENV} (`make run` writes {DEFAULT_TOKEN_FILE})",
                file=sys.stderr,
            )
        return 1
