"""The `weightstream` command line.

weightstream broker     run the broker and its HTTP status endpoint (needs no torch)
weightstream publish    publish a checkpoint directory, or a synthetic model, as version(s) N
weightstream subscribe  keep a local torch model on the newest version
weightstream status     the fleet as a table (or --json) (needs no torch)
weightstream demo       broker + trainer + two subscribers, end to end, checked bit for bit
weightstream keys       make a CURVE key pair for a broker or a peer
weightstream admin      retire a version or delete a model (an admin key)

Every subcommand imports what it needs when it runs: the broker, `status` and `--help` load
no torch. Expected failures (no broker, a port in use, a bad path) are one line on stderr and
exit code 1; usage errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from weightstream.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from weightstream.names import ForeignPackage, check_top_level_names

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence

__all__ = ["main", "parse_endpoint", "parse_versions"]

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
DEFAULT_HTTP = "http://127.0.0.1:8790"
NEXT = "next:"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the usage itself is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weightstream")
    except PackageNotFoundError:
        return "unknown (not installed: run from a source tree)"


def parse_versions(spec: str) -> list[int]:
    """`3`, `1-5` or `1,2,7` -> a list of increasing versions.

    >>> parse_versions("1-3,7")
    [1, 2, 3, 7]
    """
    versions: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise argparse.ArgumentTypeError(
                f"bad version list {spec!r}; write 3, 1-5, 1,2,7 or next:5"
            )
        if last and int(last) < int(first):
            raise argparse.ArgumentTypeError(
                f"empty version range {part.strip()!r}: write the lower version first ({last}-{first})"
            )
        versions.extend(range(int(first), int(last or first) + 1))
    if versions != sorted(set(versions)):
        raise argparse.ArgumentTypeError(f"versions must increase: {spec!r}")
    return versions


def _versions(spec: str) -> list[int] | int:
    """A version list, or `next:N` (N versions after the broker's latest) as the int N."""
    if spec.startswith(NEXT):
        count = spec[len(NEXT) :]
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"bad {spec!r}: write next:N with N >= 1")
        return int(count)
    return parse_versions(spec)


_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5}|\*)|ipc://\S+")


def parse_endpoint(text: str) -> str:
    """A ZeroMQ endpoint the broker binds or a client connects to: tcp://HOST:PORT or ipc://PATH.

    >>> parse_endpoint("tcp://127.0.0.1:5555")
    'tcp://127.0.0.1:5555'
    """
    match = _ENDPOINT.fullmatch(text)
    if match is None or (match.group(2) not in (None, "*") and int(match.group(2)) > 65535):
        raise argparse.ArgumentTypeError(
            f"bad endpoint {text!r}: write tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555) or ipc://PATH"
        )
    return text


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}: use one of {', '.join(LOG_LEVELS)}"
        )
    return level


def _lag(text: str) -> int:
    try:
        lag = int(text)
    except ValueError:
        lag = -1
    if lag < 0:
        raise argparse.ArgumentTypeError(f"bad lag {text!r}: a number of versions, 0 or more")
    return lag


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmg]i?)?b?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def _size(text: str) -> int:
    """`64MB`, `1GiB`, `1e9` -> bytes (MB and GB are powers of ten, MiB and GiB of two).

    >>> _size("64MiB"), _size("1GB"), _size("1e9")
    (67108864, 1000000000, 1000000000)
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write e.g. 64MB, 1GiB or 1e9")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def _transports(text: str) -> list[str]:
    from streamer.transport.choice import parse_transports

    try:
        return parse_transports(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common_args(*, top: bool) -> _Parser:
    """--log-level and --log-format, accepted before and after the subcommand."""
    common = _Parser(add_help=False)
    env_level = os.environ.get("WEIGHTSTREAM_LOG_LEVEL", "INFO")
    common.add_argument(
        "--log-level",
        type=_log_level,
        default=env_level if top else argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (env WEIGHTSTREAM_LOG_LEVEL; default INFO)",
    )
    common.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("WEIGHTSTREAM_LOG_FORMAT", "text") if top else argparse.SUPPRESS,
        help="text, or json: one object per line with the key=value fields parsed out "
        "(env WEIGHTSTREAM_LOG_FORMAT; default text)",
    )
    return common


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        type=parse_endpoint,
        default=os.environ.get("WEIGHTSTREAM_BROKER", DEFAULT_BROKER),
        help=f"broker endpoint (env WEIGHTSTREAM_BROKER; default {DEFAULT_BROKER})",
    )
    parser.add_argument("--model", default="demo", help="model name (default demo)")
    parser.add_argument(
        "--transport",
        type=_transports,
        default=["auto"],
        metavar="LIST",
        help="bulk transports in order of preference: auto (default: mooncake, or zmq where "
        "mooncake is missing, plus shm between processes of one host), or a comma-separated "
        "list of mooncake, zmq, shm (same-host shared memory)",
    )
    parser.add_argument(
        "--protocol",
        choices=("tcp", "rdma"),
        default="tcp",
        help="mooncake's protocol: tcp (default) or rdma (needs RDMA NICs on both sides)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="this machine's address as peers should reach it (default 127.0.0.1)",
    )
    parser.add_argument(
        "--name",
        dest="peer_name",
        default=os.environ.get("WEIGHTSTREAM_NAME", ""),
        metavar="NAME",
        help="a stable name for this process in status and metric labels, kept across its "
        "restarts, e.g. node-3/gpu-0 (env WEIGHTSTREAM_NAME; default host:pid)",
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


def _client_config(args: argparse.Namespace) -> Any:
    from streamer.config import ClientConfig

    return ClientConfig(
        broker=args.broker,
        key_file=args.key_file,
        broker_key_file=args.broker_key_file,
        name=getattr(args, "peer_name", ""),
    )


def _security_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """`keys new` and `admin retire|delete`."""
    keys = commands.add_parser("keys", parents=[common], help="make CURVE key pairs")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser("new", help="write NAME.key (public) and NAME.key_secret")
    new.add_argument("--name", required=True, help="the key's name (letters, digits, _ . -)")
    new.add_argument("--out", required=True, help="directory to write the key files into")

    admin = commands.add_parser(
        "admin", parents=[common], help="retire a version or delete a model (admin key)"
    )
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    for name, text in (("retire", "stop serving a version"), ("delete", "forget a model")):
        sub = admin_commands.add_parser(name, help=text)
        sub.add_argument(
            "--broker",
            type=parse_endpoint,
            default=os.environ.get("WEIGHTSTREAM_BROKER", DEFAULT_BROKER),
            help=f"broker endpoint (env WEIGHTSTREAM_BROKER; default {DEFAULT_BROKER})",
        )
        sub.add_argument("--model", required=True, help="the model")
        if name == "retire":
            sub.add_argument("--version", type=int, required=True, help="the version to retire")
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
    import asyncio

    import zmq.asyncio

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
    from streamer.__main__ import add_broker_arguments

    common = _common_args(top=False)
    parser = _Parser(
        prog="weightstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_args(top=True)],
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"weightstream {_version()}",
        help="print the version",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser(
        "broker", parents=[common], help="run the broker and its HTTP status endpoint"
    )
    add_broker_arguments(broker)
    for action in broker._actions:
        if action.dest == "endpoint":
            action.type = parse_endpoint  # the same one-line error as the clients' --broker

    link = commands.add_parser(
        "link",
        parents=[common],
        help="one broker connection for the engines of this node (they --broker the link)",
        description="Run a node link: the engines of this node connect to it (`weightstream "
        "subscribe --broker ipc://PATH`) instead of to the broker; it holds one connection to "
        "the broker for them all, with this node's key, and fetches each manifest once. "
        "Every engine stays a subscriber of its own in the broker's status.",
    )
    link.add_argument(
        "--broker",
        type=parse_endpoint,
        default=os.environ.get("WEIGHTSTREAM_BROKER", DEFAULT_BROKER),
        help=f"broker endpoint (env WEIGHTSTREAM_BROKER; default {DEFAULT_BROKER})",
    )
    link.add_argument(
        "--listen",
        default=os.environ.get("WEIGHTSTREAM_LINK", "ipc:///tmp/weightstream-link/link.sock"),
        help="where this node's engines connect: ipc://PATH (its directory is made mode 0700) "
        "or tcp://127.0.0.1:PORT (env WEIGHTSTREAM_LINK; default "
        "ipc:///tmp/weightstream-link/link.sock)",
    )
    link.add_argument("--link-id", default="", help="the link's routing id (default: made up)")
    link.add_argument(
        "--max-members", type=int, default=1024, help="engines served at most (default 1024)"
    )
    link.add_argument("--ready-file", help="write {endpoint, link_id} here once listening")
    _key_args(link)

    publish = commands.add_parser(
        "publish",
        parents=[common],
        help="publish version(s) of a model",
        description="Publish version(s) of a model, then keep their bytes readable: until "
        "--wait-subscribers N have applied the last one, else until the broker retires them all "
        "(a newer version was published elsewhere), or until stopped with --serve. --exit "
        "leaves at once: subscribers can then no longer read the bytes.",
    )
    _client_args(publish)
    publish.add_argument(
        "--version",
        "--versions",
        dest="versions",
        type=_versions,
        required=True,
        metavar="SPEC",
        help="version(s) to publish: 3, 1-5, 1,2,7, or next:N for N versions after the "
        "broker's latest of this model (what a restarted trainer wants)",
    )
    source = publish.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        help="a safetensors file, or a directory (its model.safetensors.index.json decides "
        "which tensors; without one, every *.safetensors file)",
    )
    source.add_argument(
        "--synthetic",
        type=_size,
        default=_size("64MB"),
        metavar="SIZE",
        help="publish a synthetic Llama-like model of SIZE bytes: 600MB = 600e6, 1GiB = 2**30 "
        "(default 64MB)",
    )
    publish.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic model (default 0)"
    )
    publish.add_argument(
        "--rank",
        type=int,
        default=0,
        help="this trainer rank; it publishes every world-size-th tensor from rank (default 0)",
    )
    publish.add_argument(
        "--world-size", type=int, default=1, help="trainer ranks publishing together (default 1)"
    )
    publish.add_argument(
        "--job",
        default=os.environ.get("WEIGHTSTREAM_JOB") or os.environ.get("TORCHELASTIC_RUN_ID"),
        help="id of the trainer job, the same on every rank (env WEIGHTSTREAM_JOB, else "
        "torchrun's TORCHELASTIC_RUN_ID; needed with --world-size > 1)",
    )
    publish.add_argument(
        "--signing-key", metavar="KEYFILE", help="sign every shard with this Ed25519 key"
    )
    publish.add_argument(
        "--secure-digests",
        action="store_true",
        help="add a BLAKE3 digest to every bucket (untrusted networks; docs/security.md)",
    )
    publish.add_argument(
        "--bucket",
        type=_size,
        default=_size("64MiB"),
        metavar="SIZE",
        help="bucket size: the unit of checksums and reads (default 64MiB)",
    )
    publish.add_argument(
        "--wait-subscribers",
        type=int,
        default=0,
        metavar="N",
        help="after each version, wait until N subscribers applied it; exit after the last",
    )
    publish.add_argument(
        "--wait-timeout-s",
        type=float,
        default=600.0,
        help="give up waiting for subscribers after this long (default 600)",
    )
    publish.add_argument(
        "--interval-s", type=float, default=0.0, help="pause between versions (default 0)"
    )
    publish.add_argument(
        "--zmq-port",
        type=int,
        default=0,
        metavar="PORT",
        help="fixed port of the zmq transport's sender (default 0: a free one); mooncake picks "
        "its own ports (its P2P handshake has no setting for them)",
    )
    lifecycle = publish.add_mutually_exclusive_group()
    lifecycle.add_argument(
        "--serve",
        action="store_true",
        help="keep serving the bytes until stopped (SIGTERM, Ctrl-C), even once retired",
    )
    lifecycle.add_argument(
        "--exit",
        action="store_true",
        help="exit as soon as the broker has the versions: the bytes stop being readable!",
    )

    subscribe = commands.add_parser(
        "subscribe", parents=[common], help="keep a local model on the newest version"
    )
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
        "--max-rate",
        type=_size,
        metavar="BYTES_PER_S",
        help="cap the pull rate, e.g. 500MB (per second)",
    )
    subscribe.add_argument(
        "--pull-timeout-s",
        type=float,
        default=600.0,
        help="deadline of one version's pull (default 600)",
    )
    subscribe.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="pulls of one version before waiting for the next (default 3)",
    )
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
    subscribe.add_argument(
        "--relay-listen",
        type=_relay_address,
        metavar="HOST[:PORT]",
        help="serve the verified buckets this subscriber holds to other subscribers, on "
        "this address (what they reach it at; port 0 or none: a free one); keeps two "
        "stagings so the applied version stays readable while the next one is pulled",
    )
    subscribe.add_argument(
        "--relay-encrypt",
        action="store_true",
        help="serve relay reads over CURVE (the key travels to readers via the broker)",
    )
    subscribe.add_argument(
        "--relay-one-sided",
        action="store_true",
        help="let readers read the relayed buckets one-sided over this subscriber's mooncake "
        "engine (needs --transport with mooncake; a trusted fabric: mooncake has no auth)",
    )
    subscribe.add_argument(
        "--relay-timeout-s",
        type=float,
        default=5.0,
        help="how long one bucket may take from a relay before it is read elsewhere (default 5)",
    )

    status = commands.add_parser("status", parents=[common], help="show models and subscribers")
    status.add_argument(
        "--http",
        default=os.environ.get("WEIGHTSTREAM_HTTP", DEFAULT_HTTP),
        help=f"the broker's status URL (env WEIGHTSTREAM_HTTP; default {DEFAULT_HTTP})",
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument(
        "--min-lag",
        type=_lag,
        default=None,
        metavar="N",
        help="only subscribers N or more versions behind the newest (and those with none yet)",
    )

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="broker + trainer + subscribers on this machine, checked bit for bit",
    )
    demo.add_argument(
        "--size", type=_size, default=_size("128MB"), help="model size (default 128MB = 128e6)"
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
    _security_commands(commands, common)
    return parser


def _run(coroutine: Coroutine[Any, Any, None]) -> int:
    """Run until done or SIGTERM/SIGINT; a signal is a normal, clean exit."""
    from streamer.server import run_until_signal

    run_until_signal(coroutine)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        check_top_level_names()
    except ForeignPackage as exc:
        print(f"weightstream: {exc}", file=sys.stderr)
        return 1
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "publish" and args.world_size > 1 and not args.job:
        parser.error(
            f"--world-size {args.world_size} needs --job ID, the same on every rank "
            "(or set WEIGHTSTREAM_JOB; torchrun sets TORCHELASTIC_RUN_ID)"
        )
    if args.command == "subscribe" and args.require_digests and not args.trust:
        parser.error("--require-digests needs --trust KEYFILE: unsigned digests prove nothing")
    from streamer.transport.choice import receiver_names

    if args.command == "subscribe" and args.relay_one_sided and not args.relay_listen:
        parser.error("--relay-one-sided needs --relay-listen HOST[:PORT]")
    if (
        args.command == "subscribe"
        and args.relay_one_sided
        and "mooncake" not in receiver_names(args.transport)
    ):
        parser.error("--relay-one-sided needs a mooncake transport (--transport mooncake,...)")
    configure_logging(args.log_level, args.log_format)
    # mooncake's glog is loud at INFO; its levels are TRACE, INFO, WARNING, ERROR (another
    # value means INFO).
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        return _dispatch(args)
    except Exception as exc:
        message = _expected_failure(args, exc)
        if message is None:
            raise
        # An expected failure (no broker, a port in use, a bad path): one line, no traceback.
        logging.getLogger("weightstream").error("%s", message)  # noqa: TRY400
        return 1


def _expected_failure(args: argparse.Namespace, exc: BaseException) -> str | None:
    """The one line to print for a failure a user can fix, or None for a bug (a traceback)."""
    import zmq

    from streamer.errors import StreamerError

    if isinstance(exc, BaseExceptionGroup):  # a TaskGroup's (the broker's): all leaves expected
        leaves = [_expected_failure(args, inner) for inner in exc.exceptions]
        return None if None in leaves else "; ".join(dict.fromkeys(str(leaf) for leaf in leaves))
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "safetensors"):
        return (
            f"`weightstream {args.command}` needs {exc.name}, which this install lacks: "
            "pip install 'weightstream[torch]' torch==<the build you want>"
        )
    if isinstance(exc, StreamerError | TimeoutError | OSError | ValueError | zmq.ZMQError):
        return _bind_message(args, exc)
    return None


def _bind_message(args: argparse.Namespace, exc: BaseException) -> str:
    """The error's text, or for an address in use: which port, and what to do."""
    import errno

    import zmq

    if getattr(exc, "errno", None) != errno.EADDRINUSE:
        return str(exc) or f"{type(exc).__name__} (no detail: a bug; please report it)"
    if args.command != "broker":
        return f"an address is already in use ({exc}): stop the other process or pick another port"
    if isinstance(exc, zmq.ZMQError):  # the ROUTER socket's bind
        what = f"the broker endpoint {args.endpoint or 'tcp://127.0.0.1:5555'}"
    else:  # aiohttp's bind of the status endpoint
        what = f"the HTTP status port {args.http_port if args.http_port is not None else 8790}"
    return (
        f"{what} is already in use (another broker running?): stop it, or pick a free port "
        "with --endpoint tcp://HOST:PORT / --http-port PORT (0 picks one)"
    )


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "broker":
        from streamer.__main__ import broker_config, run_broker

        return run_broker(broker_config(args), ready_file=args.ready_file)
    if args.command == "status":
        import asyncio
        import json

        from weightstream.status import fetch_status, render_status

        status = asyncio.run(fetch_status(args.http.rstrip("/"), min_lag=args.min_lag))
        print(json.dumps(status, indent=2) if args.json else render_status(status))
        return 0
    if args.command == "link":
        return _run_link(args)
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
        from streamer.signing_keys import load_signing_key
        from weightstream.commands import PublishJob, run_publish

        job = PublishJob(
            client=client,
            model=args.model,
            versions=args.versions if isinstance(args.versions, list) else [],
            next_versions=args.versions if isinstance(args.versions, int) else 0,
            checkpoint=args.checkpoint,
            synthetic_bytes=args.synthetic,
            seed=args.seed,
            rank=args.rank,
            world_size=args.world_size,
            transport=args.transport,
            protocol=args.protocol,
            zmq_port=args.zmq_port,
            host=args.host,
            bucket_bytes=args.bucket,
            wait_subscribers=args.wait_subscribers,
            wait_timeout_s=args.wait_timeout_s,
            interval_s=args.interval_s,
            lifecycle="serve" if args.serve else "exit" if args.exit else "until-retired",
            job=args.job,
            signing_key=load_signing_key(args.signing_key) if args.signing_key else None,
            secure_digests=args.secure_digests,
        )
        return _run(run_publish(job))
    return _subscribe(args, client)


def _run_link(args: argparse.Namespace) -> int:
    import json

    import msgspec

    from streamer.node_link import NodeLink, NodeLinkConfig, serve_link
    from streamer.server import run_until_signal

    try:
        config = NodeLinkConfig(
            broker=args.broker,
            listen=args.listen,
            key_file=args.key_file,
            broker_key_file=args.broker_key_file,
            link_id=args.link_id,
            max_members=args.max_members,
        )
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad node link setting: {exc}") from exc

    def on_ready(link: NodeLink) -> None:
        if args.ready_file:
            tmp = Path(args.ready_file).with_suffix(".tmp")
            tmp.write_text(json.dumps({"endpoint": link.endpoint, "link_id": link.link_id}))
            os.replace(tmp, args.ready_file)

    run_until_signal(serve_link(config, on_ready=on_ready))
    return 0


def _subscribe(args: argparse.Namespace, client: Any) -> int:
    import msgspec

    from streamer.signing_keys import load_trusted_keys
    from subscribers.subscriber import PullConfig
    from weightstream.commands import SubscribeJob, run_subscribe

    try:
        pull = msgspec.convert(
            {
                "max_inflight": args.max_inflight,
                "max_bytes_per_s": args.max_rate,
                "pull_timeout_s": args.pull_timeout_s,
                "max_attempts": args.max_attempts,
                "require_digests": args.require_digests,
                "relay_timeout_s": args.relay_timeout_s,
            },
            PullConfig,
        )
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad pull setting: {exc}") from exc
    job = SubscribeJob(
        client=client,
        model=args.model,
        transport=args.transport,
        protocol=args.protocol,
        host=args.host,
        pull=pull,
        init_checkpoint=args.init,
        dump_dir=args.dump_dir,
        dump_all=args.dump_all,
        exit_after_version=args.exit_after_version,
        trusted_keys=load_trusted_keys(args.trust) if args.trust else None,
        relay_listen=args.relay_listen,
        relay_encrypt=args.relay_encrypt,
        relay_one_sided=args.relay_one_sided,
    )
    return _run(run_subscribe(job))


def _relay_address(value: str) -> tuple[str, int]:
    """`HOST[:PORT]` -> (host, port); port 0 (or none) picks a free one."""
    host, colon, port = value.rpartition(":")
    if not colon:
        host, port = value, "0"
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"bad relay address {value!r}: write HOST[:PORT], e.g. 10.0.0.5:7100"
        )
    if host in {"*", "0.0.0.0", "::"}:  # noqa: S104  (refused, not bound)
        raise argparse.ArgumentTypeError(
            f"bad relay address {value!r}: give the address other subscribers reach this one "
            "at (it is offered to them as is), not a wildcard"
        )
    return host, int(port)


if __name__ == "__main__":
    sys.exit(main())
