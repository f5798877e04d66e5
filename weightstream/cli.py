"""The `weightstream` command line.

weightstream broker     run the broker and its HTTP status endpoint
weightstream publish    publish a checkpoint directory, or a synthetic model, as version(s) N
weightstream subscribe  keep a local torch model on the newest version
weightstream status     the fleet as a table (or --json)
weightstream demo       broker + trainer + two subscribers, end to end, checked bit for bit
weightstream keys       make a CURVE key pair for a broker or a peer
weightstream admin      retire a version or delete a model (an admin key)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from typing import TYPE_CHECKING, Any

import msgspec
import zmq.asyncio

from streamer.__main__ import add_broker_arguments, broker_config, run_broker
from streamer.config import ClientConfig
from streamer.errors import StreamerError
from streamer.server import run_until_signal
from streamer.signing_keys import load_signing_key, load_trusted_keys
from streamer.transport.choice import parse_transports
from subscribers.subscriber import PullConfig
from weightstream.commands import PublishJob, SubscribeJob, run_publish, run_subscribe
from weightstream.status import fetch_status, render_status

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence

__all__ = ["main", "parse_versions"]

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
DEFAULT_HTTP = "http://127.0.0.1:8790"


def parse_versions(spec: str) -> list[int]:
    """`3`, `1-5` or `1,2,7` -> a list of increasing versions.

    >>> parse_versions("1-3,7")
    [1, 2, 3, 7]
    """
    versions: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise argparse.ArgumentTypeError(f"bad version list {spec!r}; write 3, 1-5 or 1,2,7")
        versions.extend(range(int(first), int(last or first) + 1))
    if versions != sorted(set(versions)):
        raise argparse.ArgumentTypeError(f"versions must increase: {spec!r}")
    return versions


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmg]i?)?b?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def _size(text: str) -> int:
    """`64MB`, `1GiB`, `1e9` -> bytes.

    >>> _size("64MiB"), _size("1GB"), _size("1e9")
    (67108864, 1000000000, 1000000000)
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write e.g. 64MB, 1GiB or 1e9")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def _transports(text: str) -> list[str]:
    try:
        return parse_transports(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        default=os.environ.get("WEIGHTSTREAM_BROKER", DEFAULT_BROKER),
        help=f"broker endpoint (env WEIGHTSTREAM_BROKER; default {DEFAULT_BROKER})",
    )
    parser.add_argument("--model", default="demo", help="model name (default demo)")
    parser.add_argument(
        "--transport",
        type=_transports,
        default=["auto"],
        metavar="LIST",
        help="bulk transports in order of preference: auto (default), or a comma-separated list "
        "of mooncake, zmq, shm (same-host shared memory)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="this machine's address as peers should reach it (default 127.0.0.1)",
    )
    _key_args(parser)


def _key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-file",
        default=os.environ.get("WEIGHTSTREAM_KEY_FILE"),
        help="this peer's CURVE key pair, NAME.key_secret (env WEIGHTSTREAM_KEY_FILE)",
    )
    parser.add_argument(
        "--broker-key-file",
        default=os.environ.get("WEIGHTSTREAM_BROKER_KEY_FILE"),
        help="the broker's public key, NAME.key (env WEIGHTSTREAM_BROKER_KEY_FILE)",
    )


def _client_config(args: argparse.Namespace) -> ClientConfig:
    return ClientConfig(
        broker=args.broker, key_file=args.key_file, broker_key_file=args.broker_key_file
    )


def _security_commands(commands: Any) -> None:
    """`keys new` and `admin retire|delete`."""
    keys = commands.add_parser("keys", help="make CURVE key pairs")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser("new", help="write NAME.key (public) and NAME.key_secret")
    new.add_argument("--name", required=True, help="the key's name (letters, digits, _ . -)")
    new.add_argument("--out", required=True, help="directory to write the key files into")

    admin = commands.add_parser("admin", help="retire a version or delete a model (admin key)")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    for name, text in (("retire", "stop serving a version"), ("delete", "forget a model")):
        sub = admin_commands.add_parser(name, help=text)
        sub.add_argument(
            "--broker",
            default=os.environ.get("WEIGHTSTREAM_BROKER", DEFAULT_BROKER),
            help=f"broker endpoint (env WEIGHTSTREAM_BROKER; default {DEFAULT_BROKER})",
        )
        sub.add_argument("--model", required=True)
        if name == "retire":
            sub.add_argument("--version", type=int, required=True)
        _key_args(sub)


def _run_security_command(args: argparse.Namespace) -> int:
    if args.command == "keys":
        from streamer.auth import Grant, create_keys, load_public_key, render_grants

        public, secret = create_keys(args.name, args.out)
        print(f"public key  {public}  (give it to the broker's operator, and to peers)")
        print(f"secret key  {secret}  (keep it; owner-only)")
        print("allowlist entry (fill in its rights):")
        key = load_public_key(public).decode()
        print(render_grants([Grant(name=args.name, public_key=key)]))
        return 0
    from streamer.client import connect

    async def admin() -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with connect(_client_config(args), role="observer", context=ctx) as client:
                if args.admin_command == "retire":
                    detail = await client.retire_version(args.model, args.version)
                else:
                    detail = await client.delete_model(args.model)
            print(f"{args.model}: {detail}")
        finally:
            ctx.destroy(linger=0)

    asyncio.run(admin())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default=os.environ.get("WEIGHTSTREAM_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run the broker and its HTTP status endpoint")
    add_broker_arguments(broker)

    publish = commands.add_parser("publish", help="publish version(s) of a model")
    _client_args(publish)
    publish.add_argument(
        "--version",
        "--versions",
        dest="versions",
        type=parse_versions,
        required=True,
        help="version(s) to publish: 3, 1-5 or 1,2,7",
    )
    source = publish.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a safetensors file or directory")
    source.add_argument(
        "--synthetic",
        type=_size,
        default=_size("64MB"),
        metavar="SIZE",
        help="publish a synthetic Llama-like model of SIZE (default 64MB)",
    )
    publish.add_argument("--seed", type=int, default=0)
    publish.add_argument("--rank", type=int, default=0)
    publish.add_argument("--world-size", type=int, default=1)
    publish.add_argument(
        "--job",
        default=os.environ.get("WEIGHTSTREAM_JOB") or os.environ.get("TORCHELASTIC_RUN_ID"),
        help="id of the trainer job, the same on every rank (env WEIGHTSTREAM_JOB, else "
        "torchrun's TORCHELASTIC_RUN_ID; needed with --world-size > 1)",
    )
    publish.add_argument("--bucket", type=_size, default=_size("64MiB"), metavar="SIZE")
    publish.add_argument(
        "--wait-subscribers",
        type=int,
        default=0,
        metavar="N",
        help="after each version, wait until N subscribers applied it",
    )
    publish.add_argument("--wait-timeout-s", type=float, default=600.0)
    publish.add_argument("--interval-s", type=float, default=0.0, help="pause between versions")
    publish.add_argument(
        "--exit", action="store_true", help="exit after publishing (the bytes stop being readable!)"
    )
    publish.add_argument(
        "--signing-key", metavar="KEYFILE", help="sign every shard with this Ed25519 key"
    )
    publish.add_argument(
        "--secure-digests",
        action="store_true",
        help="add a BLAKE3 digest to every bucket (untrusted networks; docs/security.md)",
    )

    subscribe = commands.add_parser("subscribe", help="keep a local model on the newest version")
    _client_args(subscribe)
    subscribe.add_argument(
        "--init",
        help="start from this safetensors checkpoint (default: shapes of the first version)",
    )
    subscribe.add_argument(
        "--dump-dir", help="after each version, write the live tensors here as vN.safetensors"
    )
    subscribe.add_argument(
        "--dump-all", action="store_true", help="keep every vN.safetensors, not only the newest"
    )
    subscribe.add_argument(
        "--exit-after-version", type=int, metavar="N", help="exit once version N is applied"
    )
    subscribe.add_argument(
        "--max-inflight",
        type=int,
        default=1,
        help="buckets fetched at once (default 1; more for RDMA)",
    )
    subscribe.add_argument(
        "--max-rate", type=_size, metavar="BYTES_PER_S", help="cap the pull rate"
    )
    subscribe.add_argument("--pull-timeout-s", type=float, default=600.0)
    subscribe.add_argument("--max-attempts", type=int, default=3)
    subscribe.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="KEYFILE",
        help="apply only versions signed by this publisher key (repeatable)",
    )
    subscribe.add_argument(
        "--require-digests",
        action="store_true",
        help="refuse versions without BLAKE3 bucket digests (needs --trust)",
    )

    status = commands.add_parser("status", help="show models and subscribers")
    status.add_argument(
        "--http",
        default=os.environ.get("WEIGHTSTREAM_HTTP", DEFAULT_HTTP),
        help=f"the broker's status URL (env WEIGHTSTREAM_HTTP; default {DEFAULT_HTTP})",
    )
    status.add_argument("--json", action="store_true")

    _security_commands(commands)

    demo = commands.add_parser(
        "demo", help="broker + trainer + subscribers on this machine, checked bit for bit"
    )
    demo.add_argument(
        "--size", type=_size, default=_size("128MB"), help="model size (default 128MB)"
    )
    demo.add_argument("--versions", type=int, default=5, help="versions to publish (default 5)")
    demo.add_argument("--subscribers", type=int, default=2, help="subscriber processes (default 2)")
    demo.add_argument(
        "--transport",
        type=_transports,
        default=["mooncake"],
        metavar="LIST",
        help="transports the demo's processes use (default mooncake, to show the network path)",
    )
    return parser


def _run(coroutine: Coroutine[Any, Any, None]) -> int:
    """Run until done or SIGTERM/SIGINT; a signal is a normal, clean exit."""
    run_until_signal(coroutine)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # mooncake's glog is loud at INFO
    try:
        return _dispatch(parser, args)
    except (StreamerError, TimeoutError, OSError, ValueError) as exc:
        # An expected failure (no broker, bad checkpoint path...): one clear line, no traceback.
        logging.getLogger("weightstream").error("%s", exc)  # noqa: TRY400
        return 1


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "broker":
        return run_broker(broker_config(args), ready_file=args.ready_file)
    if args.command == "status":
        status = asyncio.run(fetch_status(args.http.rstrip("/")))
        print(json.dumps(status, indent=2) if args.json else render_status(status))
        return 0
    if args.command in ("keys", "admin"):
        return _run_security_command(args)
    if args.command == "demo":
        from weightstream.demo import run_demo

        return run_demo(
            size=args.size,
            versions=args.versions,
            subscribers=args.subscribers,
            transport=args.transport,
        )
    client = _client_config(args)
    if args.command == "publish":
        if args.world_size > 1 and not args.job:
            parser.error(
                f"--world-size {args.world_size} needs --job ID, the same on every rank "
                "(or set WEIGHTSTREAM_JOB; torchrun sets TORCHELASTIC_RUN_ID)"
            )
        job = PublishJob(
            client=client,
            model=args.model,
            versions=args.versions,
            checkpoint=args.checkpoint,
            synthetic_bytes=args.synthetic,
            seed=args.seed,
            rank=args.rank,
            world_size=args.world_size,
            transport=args.transport,
            host=args.host,
            bucket_bytes=args.bucket,
            wait_subscribers=args.wait_subscribers,
            wait_timeout_s=args.wait_timeout_s,
            interval_s=args.interval_s,
            serve_after=not args.exit,
            job=args.job,
            signing_key=load_signing_key(args.signing_key) if args.signing_key else None,
            secure_digests=args.secure_digests,
        )
        return _run(run_publish(job))
    try:
        pull = msgspec.convert(
            {
                "max_inflight": args.max_inflight,
                "max_bytes_per_s": args.max_rate,
                "pull_timeout_s": args.pull_timeout_s,
                "max_attempts": args.max_attempts,
                "require_digests": args.require_digests,
            },
            PullConfig,
        )
    except msgspec.ValidationError as exc:
        parser.error(str(exc))
    if args.require_digests and not args.trust:
        parser.error("--require-digests needs --trust KEYFILE: unsigned digests prove nothing")
    job_s = SubscribeJob(
        client=client,
        model=args.model,
        transport=args.transport,
        host=args.host,
        pull=pull,
        init_checkpoint=args.init,
        dump_dir=args.dump_dir,
        dump_all=args.dump_all,
        exit_after_version=args.exit_after_version,
        trusted_keys=load_trusted_keys(args.trust) if args.trust else None,
    )
    return _run(run_subscribe(job_s))


if __name__ == "__main__":
    sys.exit(main())
