"""`python -m streamer`: run the broker (the same as `weightstream broker`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from streamer.config import BrokerConfig
from streamer.server import run_until_signal, serve
from streamer.state import StateError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["add_broker_arguments", "broker_config", "main", "run_broker"]


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file with BrokerConfig fields")
    parser.add_argument("--endpoint", help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:5555)")
    parser.add_argument("--http-host", help="status endpoint host (default 127.0.0.1)")
    parser.add_argument(
        "--http-port", type=int, help="status endpoint port (default 8790; 0 picks one)"
    )
    parser.add_argument("--state-dir", help="persist the registry here to survive restarts")
    parser.add_argument(
        "--retention", type=int, help="latest versions kept readable per model (default 2)"
    )
    parser.add_argument(
        "--lease-ttl-s", type=float, help="lease lifetime without heartbeats (default 30)"
    )
    parser.add_argument(
        "--peer-timeout-s", type=float, help="silence before a peer counts as gone (default 10)"
    )
    security = parser.add_argument_group("security (docs/security.md)")
    security.add_argument("--key-file", help="the broker's CURVE key pair (NAME.key_secret)")
    security.add_argument(
        "--allowlist-file", help="TOML allowlist: each public key's name and rights"
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow binding off loopback without keys (anyone reaching it may publish)",
    )
    security.add_argument(
        "--max-version-jump", type=int, help="refuse a publish this far past the latest"
    )
    security.add_argument(
        "--http-read-token-file", help="bearer token the read-only HTTP routes then need"
    )
    security.add_argument(
        "--http-admin-token-file", help="bearer token of the HTTP admin routes (off without)"
    )
    parser.add_argument(
        "--pending-timeout-s",
        type=float,
        help="a version still missing ranks this long expires (default 120)",
    )
    parser.add_argument(
        "--gone-peer-ttl-s",
        type=float,
        help="a gone peer's status rows stay this long (default 300)",
    )
    parser.add_argument(
        "--waiter-ttl-s", type=float, help="a WaitApplied not reached expires (default 3600)"
    )
    parser.add_argument(
        "--http-idle-timeout-s",
        type=float,
        help="close HTTP connections idle or slower than this (default 15)",
    )
    parser.add_argument(
        "--max-heartbeats-per-s",
        type=float,
        metavar="RATE",
        help="heartbeat pacing: past this many heartbeats a second the broker asks peers to "
        "heartbeat less often and stretches its peer timeout and lease TTL alike (default "
        "2000; 0: a fixed interval)",
    )
    parser.add_argument(
        "--relay-fanout",
        type=int,
        metavar="K",
        help="relay: stripes per version and tree arity when subscribers offer to relay "
        "(default 2; 0: no routes, every subscriber reads from the trainer)",
    )
    parser.add_argument(
        "--no-link-manifest-push",
        dest="link_manifest_push",
        action="store_const",
        const=False,
        help="do not push manifests to node links with their announcements (their engines "
        "then fetch them, through the link's cache, or take them from relay peers)",
    )
    parser.add_argument(
        "--discard-bad-state",
        action="store_true",
        default=None,
        help="move a damaged state file aside and start empty (default: refuse to start)",
    )
    parser.add_argument(
        "--ready-file", help="write {endpoint, http_port} as JSON here once listening (for scripts)"
    )


def broker_config(args: argparse.Namespace) -> BrokerConfig:
    """TOML file first, then flags on top; raises ValueError on a bad value."""
    fields: dict[str, object] = {}
    if args.config:
        with open(args.config, "rb") as file:
            fields.update(tomllib.load(file))
    for name in BrokerConfig.__struct_fields__:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    try:
        return msgspec.convert(fields, BrokerConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad broker configuration: {exc}") from exc


def run_broker(config: BrokerConfig, *, ready_file: str | None = None) -> int:
    def on_ready(endpoint: str, http_port: int) -> None:
        if ready_file:
            tmp = Path(ready_file).with_suffix(".tmp")
            tmp.write_text(json.dumps({"endpoint": endpoint, "http_port": http_port}))
            os.replace(tmp, ready_file)

    try:
        run_until_signal(serve(config, on_ready=on_ready))
    except StateError as exc:
        logging.getLogger("streamer").error("broker not started: %s", exc)  # noqa: TRY400
        return 2
    logging.getLogger("streamer").info("broker stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamer", description="Run the weightstream broker."
    )
    add_broker_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = broker_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run_broker(config, ready_file=args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
