"""The control plane at fleet scale (issue 10): one broker process, thousands of subscribers.

    PYTHONPATH=. python bench/fleet_bench.py [--subscribers 10000] [--workers 4] [--rounds 5]
        [--sizes small,large] [--protocols 2,1] [--fetch subscriber|node|process] [--no-curve]
        [--per-node 8] [--status] [--json out.json]

`weightstream broker` runs as a real process (CURVE keys and an allowlist, like the tests;
`--no-curve` for a plain socket). The subscribers are raw ZeroMQ DEALER sockets spread over
`--workers` processes, speaking the real protocol with the project's wire types: Hello,
Subscribe, a Heartbeat from every socket at the broker's interval (Welcome says it), and:

    protocol 2   Announced(model, version, digest) -> FetchManifest -> ManifestBody, whose
                 SHA-256 the subscriber checks against the digest (each subscriber fetches
                 the digest it lacks: `--fetch subscriber`, the honest measure; or one fetch
                 per worker process, the others waiting on it: `--fetch process`, what a
                 node-local or relayed manifest cache would give)
    protocol 1   Announce(manifest): today's design, the manifest in every announcement

A subscriber is *notified* once it holds the announcement and the manifest. Each round
publishes one version (a shard built with `publishers.packing`, a new digest each version)
and times publish -> every subscriber notified (p50/p99/max, monotonic clock, one host).
Protocols alternate round by round in the same run: between rounds every socket says Hello
again with the other protocol version and re-subscribes. A protocol-1 round whose fan-out
(subscribers x manifest) exceeds `--max-fanout-gib` is not run (it would queue that much in
the broker: say 10,000 x 2 MB = 20 GB per version) and is reported as such.

Node mode (`--per-node M`, M > 1): each worker opens count/M DEALER connections ("nodes",
routing id node-<worker>-<k>, one CURVE handshake each), each speaking for M subscribers as a
`streamer.node_link.NodeLink` does on the wire: every member sends its own Hello, Subscribe,
Heartbeat and FetchManifest as [member id, message]; the broker names it "node-w-k/member" and
sends a message for several members of a node as one frame [member ids joined by " ",
message]. A worker decodes such a frame once and hands it to each member named (what a link
does for its engines; here they are in-process, so the link's local hop is not in the figure:
bench/link_handoff_bench.py measures it). `--fetch node`: the first member of a node to see a
digest fetches it, the node's others wait for it (the link's per-node manifest cache).

Also measured: broker CPU per version (utime+stime from /proc/<pid>/stat over the round,
less the heartbeat-only rate measured before the rounds), the subscriber workers' CPU over
the round (all of it, heartbeats included), broker RSS per subscriber (VmRSS
after everyone subscribed, less before anyone connected, / N), and peers the broker marked
gone (`/v1/subscribers?state=gone`) and `unknown_peer` errors the subscribers got, which must
stay 0. With `--status`: `/v1/subscribers` (pages, filters) and `weightstream status` timed
at that scale while heartbeats flow, and the announce latency measured while a client polls
status in a loop (the ZeroMQ loop shares the broker's event loop with HTTP).

Validation: every message is decoded through the project's typed decoder, except that a
worker process decodes a large frame (> 4 KiB) that is byte-identical to the one before it
only once (protocol 1 sends the same bytes to all); every ManifestBody's SHA-256 is checked
per subscriber and its manifest validated (`schemas.validate`) once per digest per process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import zmq
import zmq.asyncio

from schemas.codec import decode_manifest, decode_message, encode
from schemas.messages import (
    Alive,
    Announce,
    Announced,
    Error,
    FetchManifest,
    Goodbye,
    Heartbeat,
    Hello,
    ManifestBody,
    Published,
    PublishShard,
    Subscribe,
    Subscribed,
    Welcome,
)
from schemas.validate import ManifestLimits, validate_manifest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from schemas.manifest import Shard

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fleet"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
_JOINING = 16
"""Sockets of one worker connecting at once: 4 workers x 16 stay under the listen backlog
(100); past it the kernel sent SYN cookies here and ~5 % of connects never completed."""
_SAME_FRAME_BYTES = 4096
"""Frames larger than this that equal the previous one are decoded once per process."""

# ----------------------------------------------------------------------------------------
# manifests: the project's packing over tensors that have shapes and no storage


def llama_shard(layers: int, *, hidden: int = 4096, rank: int = 0, world_size: int = 1) -> Shard:
    """A llama-shaped shard of `layers` layers (9 tensors each, bf16), laid out by
    `publishers.packing.plan` into 1 GiB regions and 64 MiB buckets, locators on mooncake tcp,
    checksums of the right form (nothing is ever read: the fleet only needs the manifest)."""
    import torch  # the broker and the clients need no torch: only the manifest builder does

    from publishers.packing import plan

    inter = hidden * 11 // 4
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(rank, layers, world_size):
        p = f"model.layers.{layer}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    tensors = {
        name: torch.empty(shape, dtype=torch.bfloat16, device="meta")
        for name, shape in shapes.items()
    }
    return shard_of(plan(tensors), rank)


def shard_of(layout: Any, rank: int) -> Shard:
    """`Layout.shard` with a mooncake locator per region (as `Publisher` builds them) and a
    wmix128-sized checksum per bucket."""
    from schemas.manifest import MooncakeLocator

    session = f"10.0.{rank // 250}.{rank % 250 + 1}:17812"
    locators = [
        [MooncakeLocator(session=session, address=(1 << 40) + i * (1 << 32))]
        for i in range(len(layout.region_bytes))
    ]
    checksums = [f"{i:032x}" for i in range(len(layout.bucket_ranges()))]
    shard: Shard = layout.shard(locators, checksums, rank)
    return shard


SIZES: dict[str, Callable[[], list[Shard]]] = {
    # ~49 KB: the small manifest (a 32-layer 7B-shaped llama, 290 tensors)
    "small": lambda: [llama_shard(32)],
    # ~1.5 MB: the large one (a 1,500-layer llama-shaped stack, 13,500 tensors)
    "large": lambda: [llama_shard(1500, hidden=1024)],
}
"""Manifests by name: the shards of one version, in rank order (bench/manifest_bench.py adds
a Kimi-K2-shaped one of 64 ranks)."""


# ----------------------------------------------------------------------------------------
# the subscriber processes: raw DEALER sockets, one poll loop, no asyncio


@dataclass
class WorkerSpec:
    index: int
    count: int
    endpoint: str
    model: str
    fetch: str
    curve: tuple[bytes, bytes, bytes] | None
    """(client public, client secret, broker public), z85."""
    protocol: int = 2
    """The protocol of the first Hello."""
    per_node: int = 1
    """Members per connection: 1, a DEALER per subscriber; more, a DEALER per node speaking
    for that many members as a `NodeLink` does on the wire ([member, message] both ways)."""


@dataclass
class _Sock:
    """One subscriber: its own connection (`route` None) or a member of a node's (`route`
    its member id, the first frame of everything it sends and of what the broker sends it)."""

    conn: int
    """Its connection's index in `_Worker.sockets`."""
    route: bytes | None = None
    protocol: int = 2
    welcomed: bool = False
    subscribed: bool = False
    latest: int | None = None
    held: int | None = None
    """The newest version this subscriber is notified of (announcement and manifest)."""
    request_id: int = 0
    """Counted per subscriber from 1, as `BrokerClient` counts them."""
    joined: bool = False
    fetching: set[str] = field(default_factory=set)
    """Digests this subscriber asked for and has not received yet."""


class _Worker:
    """`count` subscribers in one process, on `count / per_node` connections; answers the
    orchestrator over a Pipe."""

    def __init__(self, spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        self.context.set(zmq.MAX_SOCKETS, spec.count + 64)
        self.socks: list[_Sock] = []
        self.sockets: list[zmq.Socket[bytes]] = []
        """The connections: one per subscriber, or one per node."""
        self.members: list[dict[bytes, int]] = []
        """Per connection in node mode: member id -> index in `socks`."""
        self.epoll = select.epoll()
        """One wake-up costs O(ready sockets), not O(sockets) as zmq.Poller's would."""
        self.by_fd: dict[int, int] = {}
        """A connection's ZMQ_FD -> its index in `sockets`."""
        self.recheck: set[int] = set()
        """Connections to look at again: a send can take the edge of their ZMQ_FD."""
        self.interval_s = 1.0
        self.base_interval_s = 1.0
        """The broker's interval (Welcome); `interval_s` is it, or its pacing if longer."""
        self.hb_epoch: float | None = None
        self.hb_sent = 0
        self.hb_late_max_s = 0.0
        self.heartbeat_bytes: dict[int | None, bytes] = {}
        self.counts: dict[str, int] = {}
        self.expect: int | None = None
        self.t_announce: list[float] = []
        self.t_notified: list[float] = []
        self.reported = True
        self.cached: set[tuple[int, str]] = set()
        """(scope, digest) of manifests held: per subscriber, node or process (`_scope`)."""
        self.waiting: dict[tuple[int, str], list[int]] = {}
        """(scope, digest) -> subscribers waiting on the one fetch in flight for it."""
        self.validated: set[str] = set()
        self.connected = 0
        """Connections connected so far (`ramp`)."""
        self.joined = 0
        self.versions_of: dict[str, int] = {}
        self.notified_count = 0
        self.last_frame: bytes = b""
        self.last_message: Any = None
        self.ready_pending = False

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _peer_id(self, i: int) -> str:
        return f"fleet-{self.spec.index}-{i}"

    def _new_socket(self, routing_id: str) -> zmq.Socket[bytes]:
        s: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, routing_id.encode())
        s.setsockopt(zmq.LINGER, 0)
        # a node's connection carries its members' messages: its queues grow with them
        s.setsockopt(zmq.SNDHWM, 1000 * self.spec.per_node)
        s.setsockopt(zmq.RCVHWM, 1000 * self.spec.per_node)
        if self.spec.curve is not None:
            public, secret, server = self.spec.curve
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server
        fd = int(s.getsockopt(zmq.FD))
        self.by_fd[fd] = len(self.sockets)
        self.epoll.register(fd, select.EPOLLIN)
        self.sockets.append(s)
        return s

    def open(self) -> None:
        m = self.spec.per_node
        for i in range(self.spec.count):
            if m == 1:
                self._new_socket(self._peer_id(i))
                self.socks.append(_Sock(conn=i))
                continue
            if i % m == 0:
                self._new_socket(f"node-{self.spec.index}-{i // m}")
                self.members.append({})
            route = self._peer_id(i).encode()
            self.members[-1][route] = i
            self.socks.append(_Sock(conn=len(self.sockets) - 1, route=route))

    def _members_of(self, c: int) -> range:
        m = self.spec.per_node
        return range(c * m, min((c + 1) * m, len(self.socks)))

    def ramp(self) -> None:
        """Connect the next connections, at most `_JOINING` subscribers' worth waiting for
        their Welcome at once (a storm of 10,000 connects left ~10 % never joined here)."""
        m = self.spec.per_node
        while (
            self.connected < len(self.sockets)
            and min(self.connected * m, len(self.socks)) - self.joined < _JOINING * m
        ):
            self.sockets[self.connected].connect(self.spec.endpoint)
            self.connected += 1
            self.hello(self.spec.protocol, conn=self.connected - 1)

    def hello(self, protocol: int, conn: int | None = None) -> None:
        """Every subscriber (or those of connection `conn`) says Hello with `protocol`."""
        self.ready_pending = True
        members = range(len(self.socks)) if conn is None else self._members_of(conn)
        for i in members:
            sock = self.socks[i]
            sock.protocol, sock.welcomed, sock.subscribed = protocol, False, False
            hello = Hello(
                peer_id=self._peer_id(i),
                role="subscriber",
                protocol_version=protocol,
                host="fleet-bench",
                pid=os.getpid(),
                name=self._peer_id(i),
            )
            self._send(sock, hello)

    def _send_bytes(self, sock: _Sock, data: bytes) -> bool:
        socket = self.sockets[sock.conn]
        try:
            if sock.route is None:
                socket.send(data, flags=zmq.NOBLOCK)
            else:
                socket.send_multipart([sock.route, data], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        finally:
            self.recheck.add(sock.conn)
        return True

    def _send(self, sock: _Sock, message: Any) -> None:
        if not self._send_bytes(sock, encode(message)):
            self.count("send_full")

    def _ready(self) -> bool:
        return self.connected == len(self.sockets) and all(
            s.welcomed and s.subscribed and (s.latest is None or s.held == s.latest)
            for s in self.socks
        )

    def _decode(self, data: bytes) -> Any:
        if len(data) > _SAME_FRAME_BYTES and data == self.last_frame:
            return self.last_message
        message = decode_message(data)
        if len(data) > _SAME_FRAME_BYTES:
            self.last_frame, self.last_message = data, message
        return message

    def _notified(self, i: int, version: int, now: float) -> None:
        sock = self.socks[i]
        sock.held = max(sock.held or 0, version)
        if version == self.expect and not self.t_notified[i]:
            self.t_notified[i] = now
            self.notified_count += 1

    def _scope(self, i: int) -> int:
        """Who shares a fetched manifest: the subscriber, its node (connection) or the
        whole process (`--fetch subscriber | node | process`)."""
        match self.spec.fetch:
            case "subscriber":
                return i
            case "node":
                return self.socks[i].conn
        return 0

    def _fetch(self, i: int, version: int, digest: str) -> None:
        sock = self.socks[i]
        sock.request_id += 1
        sock.fetching.add(digest)
        self._send(
            sock,
            FetchManifest(
                request_id=sock.request_id, model=self.spec.model, version=version, digest=digest
            ),
        )

    def handle(self, i: int, message: Any, now: float) -> None:
        sock = self.socks[i]
        match message:
            case Alive(heartbeat_at_least_s=pace):
                self.count("alive")
                self._pace(max(self.base_interval_s, pace), now)
            case Announce(manifest=manifest):
                self.count("announce")
                if manifest.version == self.expect and not self.t_announce[i]:
                    self.t_announce[i] = now
                self._notified(i, manifest.version, now)
            case Announced(version=version, digest=digest):
                self.count("announced")
                if version == self.expect and not self.t_announce[i]:
                    self.t_announce[i] = now
                key = (self._scope(i), digest)
                if key in self.cached:
                    self._notified(i, version, now)
                elif key in self.waiting:
                    self.waiting[key].append(i)
                else:
                    self.waiting[key] = [i]
                    self._fetch(i, version, digest)
                sock.latest = max(sock.latest or 0, version)
            case ManifestBody(digest=digest, body=body):
                self.count("manifest_body")
                if digest not in sock.fetching or hashlib.sha256(body).hexdigest() != digest:
                    self.count("bad_manifest_body")
                    return
                sock.fetching.discard(digest)
                self._hold(self._scope(i), digest, body, now, fetcher=i)
            case Welcome(heartbeat_interval_s=interval, heartbeat_at_least_s=pace):
                if not sock.joined:
                    sock.joined = True
                    self.joined += 1
                sock.welcomed = True
                self.base_interval_s = interval
                if self.hb_epoch is None:
                    self.interval_s = max(interval, pace)
                    self.hb_epoch = time.monotonic()
                else:
                    self._pace(max(interval, pace), now)
                sock.request_id += 1
                self._send(sock, Subscribe(request_id=sock.request_id, model=self.spec.model))
            case Subscribed(latest=latest):
                sock.subscribed = True
                sock.latest = latest
            case Error(code=code):
                self.count(f"error_{code}")
                if code == "unknown_peer":
                    self.hello_one(i)
            case _:
                self.count(type(message).__name__)

    def hello_one(self, i: int) -> None:
        sock = self.socks[i]
        sock.welcomed = sock.subscribed = False
        self._send(
            sock,
            Hello(
                peer_id=self._peer_id(i),
                role="subscriber",
                protocol_version=sock.protocol,
                host="fleet-bench",
                pid=os.getpid(),
            ),
        )

    def _pace(self, interval: float, now: float) -> None:
        """The broker paces the fleet (as `BrokerClient._paced`): one interval for every
        subscriber of this process, the schedule re-anchored so that none skips a beat."""
        if interval == self.interval_s or self.hb_epoch is None:
            return
        self.count("pace_changes")
        self.hb_epoch = now - self.hb_sent * interval / len(self.socks)
        self.interval_s = interval

    def heartbeats(self, now: float) -> None:
        if self.hb_epoch is None:
            return
        n = len(self.socks)
        due = int((now - self.hb_epoch) / self.interval_s * n)
        while self.hb_sent < due:
            index = self.hb_sent % n
            sock = self.socks[index]
            scheduled = self.hb_epoch + self.hb_sent * self.interval_s / n
            self.hb_late_max_s = max(self.hb_late_max_s, now - scheduled)
            self.hb_sent += 1
            if not sock.welcomed:
                continue
            # what the engine runs: the version it was notified of; every tenth subscriber
            # one behind it, so that status has laggards to filter
            applied = sock.held
            if applied is not None and index % 10 == 0:
                applied = max(0, applied - 1)
            data = self.heartbeat_bytes.get(applied)
            if data is None:
                report = {} if applied is None else {self.spec.model: applied}
                data = self.heartbeat_bytes[applied] = encode(Heartbeat(applied=report))
            self.count("heartbeat" if self._send_bytes(sock, data) else "heartbeat_full")

    def command(self, cmd: tuple[Any, ...]) -> bool:
        match cmd:
            case ("hello", protocol):
                self.hello(protocol)
            case ("expect", version):
                self.expect = version
                self.t_announce = [0.0] * len(self.socks)
                self.t_notified = [0.0] * len(self.socks)
                self.notified_count = 0
                self.reported = False
                self.conn.send(("expecting", version))
            case ("report",):
                self.report()
            case ("stats",):
                self.conn.send(("stats", dict(self.counts), self.hb_late_max_s))
                self.hb_late_max_s = 0.0
            case ("stop",):
                for sock in self.socks:
                    self._send(sock, Goodbye(reason="bench done"))
                return False
        return True

    def report(self) -> None:
        self.reported = True
        self.conn.send(("report", self.expect, self.t_announce, self.t_notified))

    def _take_push(self, c: int, message: Any, now: float) -> None:
        """A manifest the broker pushed to node c (as a `NodeLink` keeps it): checked against
        its digest, validated once per process, then held for the node's scope, so that its
        members' announcement finds it (`--fetch subscriber` ignores pushes: no link cache)."""
        if not isinstance(message, ManifestBody):
            self.count(f"pushed_{type(message).__name__}")
            return
        self.count("manifest_pushed")
        if self.spec.fetch == "subscriber":
            return
        if hashlib.sha256(message.body).hexdigest() != message.digest:
            self.count("bad_manifest_push")
            return
        scope = 0 if self.spec.fetch == "process" else c
        self._hold(scope, message.digest, message.body, now)

    def _hold(
        self, scope: int, digest: str, body: bytes, now: float, *, fetcher: int | None = None
    ) -> None:
        """A manifest checked against its digest: validated once per process, held for
        `scope`, and every subscriber waiting on it there (the `fetcher` too) notified."""
        if digest not in self.validated:
            manifest = decode_manifest(body)
            validate_manifest(manifest, ManifestLimits())
            self.validated.add(digest)
            self.versions_of[digest] = manifest.version
        key = (scope, digest)
        self.cached.add(key)
        default = [] if fetcher is None else [fetcher]
        for j in self.waiting.pop(key, default):
            self._notified(j, self.versions_of[digest], now)

    def drain(self, c: int) -> None:
        """Read what connection c holds (64 frames at most, then it is looked at again). A
        node's frame [members, message] is decoded once and handled for each member named,
        as a `NodeLink` hands one frame to its engines (here in this process)."""
        socket = self.sockets[c]
        for _ in range(64):
            if not int(socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            if self.spec.per_node == 1:
                self.handle(c, self._decode(socket.recv(flags=zmq.NOBLOCK)), time.monotonic())
                continue
            frames = socket.recv_multipart(flags=zmq.NOBLOCK)
            if len(frames) != 2:
                self.count("to_node_itself")  # the broker refused what the node sent
                continue
            message, now = self._decode(frames[1]), time.monotonic()
            if not frames[0]:  # pushed to the node itself, ahead of an announcement
                self._take_push(c, message, now)
                continue
            members = self.members[c]
            named = frames[0].split(b" ")
            if len(named) > 1:
                self.count("fan_out_frames")
            for member in named:
                i = members.get(member)
                if i is None:
                    self.count("unknown_member")
                else:
                    self.handle(i, message, now)
        self.recheck.add(c)

    def run(self) -> None:
        self.open()
        self.ready_pending = True
        control = self.conn.fileno()
        self.epoll.register(control, select.EPOLLIN)
        running = True
        next_check = 0.0
        while running:
            now = time.monotonic()
            if now >= next_check + 0.02:
                next_check = now
            self.ramp()
            self.heartbeats(now)
            ready, self.recheck = self.recheck, set()
            for fd, _ in self.epoll.poll(0 if ready else 0.02):
                if fd == control:
                    while running and self.conn.poll():
                        running = self.command(self.conn.recv())
                else:
                    ready.add(self.by_fd[fd])
            for c in ready:
                self.drain(c)
            if not self.reported and self.notified_count == len(self.socks):
                self.report()
            if self.ready_pending and now >= next_check and self._ready():
                self.ready_pending = False
                self.conn.send(("ready", self.spec.index))
        time.sleep(0.2)  # let the Goodbyes leave before the sockets close
        self.context.destroy(linger=0)


def _worker_main(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        _Worker(spec, conn).run()


# ----------------------------------------------------------------------------------------
# the orchestrator: broker process, workers, publisher, rounds


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def registry_bytes_per_subscriber(n: int) -> float:
    """The Python side of a subscriber in the broker: `Registry` state after Hello, Subscribe
    and one heartbeat of n peers (tracemalloc, in this process), per peer."""
    import tracemalloc

    from streamer.registry import Registry

    registry = Registry()
    now = time.time()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        peer = f"fleet-{i // 2500}-{i % 2500}"
        registry.hello(peer, "subscriber", "fleet-bench", 4242, now, name=peer)
        registry.subscribe(peer, MODEL)
        registry.heartbeat(peer, {MODEL: 1}, now)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


_BARE_ROUTER = """
import sys, time, zmq
n, secret, public = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].encode()
socket = zmq.Context().socket(zmq.ROUTER)
if secret:
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
print(socket.bind_to_random_port("tcp://127.0.0.1"), flush=True)
for _ in range(n):
    if not socket.poll(60_000):
        sys.exit("the DEALERs stopped sending")
    socket.recv_multipart()
print("done", flush=True)
time.sleep(120)
"""


def bare_router_bytes_per_connection(n: int, curve: bool) -> float:
    """libzmq's share of a subscriber: the RSS a ROUTER process with no Python state gains per
    connected DEALER (each has said one frame)."""
    server_public, server_secret = zmq.curve_keypair() if curve else (b"", b"")
    client_public, client_secret = zmq.curve_keypair()
    router = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _BARE_ROUTER,
            str(n),
            server_secret.decode(),
            server_public.decode(),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert router.stdout is not None
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.set(zmq.MAX_SOCKETS, n + 16)
    try:
        port = int(router.stdout.readline())
        time.sleep(0.3)
        before = proc_rss(router.pid)
        dealers = []
        for _ in range(n):
            dealer = context.socket(zmq.DEALER)
            dealers.append(dealer)  # a collected socket closes, its frame unsent
            dealer.setsockopt(zmq.LINGER, 0)
            if curve:
                dealer.curve_serverkey = server_public
                dealer.curve_publickey, dealer.curve_secretkey = client_public, client_secret
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"hello")
        deadline = time.monotonic() + 60
        while router.stdout.readline() != "done\n":
            if time.monotonic() > deadline or router.poll() is not None:
                raise TimeoutError("the bare ROUTER did not hear every DEALER")
        time.sleep(0.3)
        return (proc_rss(router.pid) - before) / n
    finally:
        router.kill()
        router.wait()
        context.destroy(linger=0)


def connections(args: argparse.Namespace) -> int:
    """The fleet's connections to the broker: one per subscriber, or per node."""
    n, w, m = args.subscribers, args.workers, args.per_node
    return sum(-(-(n // w + (1 if i < n % w else 0)) // m) for i in range(w))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Fleet:
    """A running broker, its subscriber workers and a publisher."""

    args: argparse.Namespace
    workdir: Path
    broker: subprocess.Popen[bytes] | None = None
    endpoint: str = ""
    http: str = ""
    keys: dict[str, Path] = field(default_factory=dict)
    conns: list[multiprocessing.connection.Connection] = field(default_factory=list)
    workers: list[multiprocessing.process.BaseProcess] = field(default_factory=list)
    protocol: int = 2
    version: int = 0

    @property
    def pid(self) -> int:
        assert self.broker is not None
        return self.broker.pid

    def other_cpus(self) -> set[int]:
        """The cores left to the subscriber workers when the broker has its own."""
        rest = os.sched_getaffinity(0) - set(self.args.broker_cpus)
        if not rest:
            raise SystemExit("--broker-cpus leaves no core for the subscriber workers")
        return rest

    def start_broker(self) -> None:
        args = self.args
        config = self.workdir / "broker.toml"
        config.write_text(
            f"heartbeat_interval_s = {args.heartbeat_s}\npeer_timeout_s = {args.peer_timeout_s}\n"
            f"retention = 2\n"
            + (
                f"max_heartbeats_per_s = {args.max_heartbeats_per_s}\n"
                if args.max_heartbeats_per_s is not None
                else ""
            )
            + ("" if args.push else "link_manifest_push = false\n")
        )
        profile = ["-m", "cProfile", "-o", args.broker_profile] if args.broker_profile else []
        cmd = [
            sys.executable,
            *profile,
            "-m",
            "weightstream",
            # an older checkout's CLI takes --log-level before the command
            *(["--log-level", args.broker_log_level] if args.broker_pythonpath else []),
            "broker",
            *([] if args.broker_pythonpath else ["--log-level", args.broker_log_level]),
            "--config",
            str(config),
            "--endpoint",
            "tcp://127.0.0.1:0",
            "--http-port",
            "0",
            "--ready-file",
            str(self.workdir / "ready.json"),
        ]
        if args.curve:
            from streamer.auth import make_local_keys

            self.keys = make_local_keys(self.workdir / "keys", model=MODEL)
            cmd += ["--key-file", str(self.keys["broker"])]
            cmd += ["--allowlist-file", str(self.keys["allowlist"])]
        env = {**os.environ, "PYTHONPATH": args.broker_pythonpath or str(ROOT)}
        log = (self.workdir / "broker.log").open("wb")
        if args.broker_cpus:  # set before exec: every thread the broker starts inherits it
            cpus = ",".join(str(cpu) for cpu in sorted(args.broker_cpus))
            cmd = ["taskset", "-c", cpus, *cmd]
        self.broker = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.broker_pythonpath or ROOT
        )
        ready = self.workdir / "ready.json"
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.broker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"broker did not start:\n{(self.workdir / 'broker.log').read_text()}"
                )
            time.sleep(0.05)
        time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.endpoint, self.http = info["endpoint"], f"http://127.0.0.1:{info['http_port']}"

    def curve(self) -> tuple[bytes, bytes, bytes] | None:
        if not self.args.curve:
            return None
        from streamer.auth import load_keys, load_public_key

        client = load_keys(self.keys["subscriber"])
        return client.public, client.secret, load_public_key(self.keys["broker.public"])

    def start_workers(self) -> None:
        n, w = self.args.subscribers, self.args.workers
        spawn = multiprocessing.get_context("spawn")
        for index in range(w):
            count = n // w + (1 if index < n % w else 0)
            ours, theirs = spawn.Pipe()
            spec = WorkerSpec(
                index,
                count,
                self.endpoint,
                MODEL,
                self.args.fetch,
                self.curve(),
                self.protocol,
                per_node=self.args.per_node,
            )
            process = spawn.Process(target=_worker_main, args=(spec, theirs), daemon=True)
            process.start()
            if self.args.broker_cpus:
                assert process.pid is not None
                os.sched_setaffinity(process.pid, self.other_cpus())
            self.conns.append(ours)
            self.workers.append(process)

    async def gather(self, kind: str, timeout_s: float) -> list[tuple[Any, ...]]:
        """One `kind` message from every worker (other kinds are dropped), within the deadline."""
        replies: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(self.conns):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.conns) - len(replies)} workers sent no {kind!r}")
            for index, conn in enumerate(self.conns):
                while index not in replies and conn.poll():
                    reply = conn.recv()
                    if reply[0] == kind:
                        replies[index] = reply
            await asyncio.sleep(0.002)
        return [replies[i] for i in range(len(self.conns))]

    def tell(self, *cmd: Any) -> None:
        for conn in self.conns:
            conn.send(cmd)

    async def switch(self, protocol: int) -> float:
        """Every socket says Hello with `protocol` and re-subscribes; returns the seconds."""
        started = time.monotonic()
        self.tell("hello", protocol)
        await self.gather("ready", self.args.timeout_s)
        self.protocol = protocol
        return time.monotonic() - started

    async def stats(self) -> tuple[dict[str, int], float]:
        self.tell("stats")
        totals: dict[str, int] = {}
        late = 0.0
        for _, counts, late_s in await self.gather("stats", 30):
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            late = max(late, late_s)
        return totals, late

    def workers_cpu_s(self) -> float:
        return sum(proc_cpu_s(p.pid) for p in self.workers if p.pid is not None)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.tell("stop")
        for process in self.workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.broker.kill()


class PublishRefusedError(Exception):
    """The broker answered a publish with an Error."""


class RawPublisher:
    """A protocol-1 publisher for an older broker (`--broker-pythonpath`): Hello, PublishShard
    -> Published, a Heartbeat every second. The project's client speaks protocol 2 only."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, b"fleet-publisher")
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.ids = 0
        self.task: asyncio.Task[None] | None = None

    async def _reply(self, kind: type, timeout_s: float = 60.0) -> Any:
        async with asyncio.timeout(timeout_s):
            while True:
                message = decode_message(await self.socket.recv())
                if isinstance(message, Error):
                    raise PublishRefusedError(f"broker refused: {message}")
                if isinstance(message, kind):
                    return message

    async def start(self) -> None:
        hello = Hello(peer_id="fleet-publisher", role="publisher", protocol_version=1)
        await self.socket.send(encode(hello))
        await self._reply(Welcome)
        self.task = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.socket.send(encode(Heartbeat()))

    async def publish(self, model: str, version: int, rank: int, world: int, shard: Shard) -> Any:
        self.ids += 1
        message = PublishShard(
            request_id=self.ids,
            model=model,
            version=version,
            rank=rank,
            world_size=world,
            shard=shard,
        )
        await self.socket.send(encode(message))
        return await self._reply(Published)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.socket.close(linger=0)


@contextlib.asynccontextmanager
async def publisher(fleet: Fleet, context: zmq.asyncio.Context) -> AsyncIterator[Any]:
    """The project's client as a publisher, or a protocol-1 one for an older broker."""
    args = fleet.args
    if args.broker_pythonpath:
        raw = RawPublisher(context, fleet.endpoint)
        try:
            await raw.start()
            yield raw
        finally:
            raw.close()
        return
    from streamer.client import connect
    from streamer.config import ClientConfig

    config = ClientConfig(
        broker=fleet.endpoint,
        key_file=str(fleet.keys["trainer"]) if args.curve else None,
        broker_key_file=str(fleet.keys["broker.public"]) if args.curve else None,
        request_timeout_s=args.timeout_s,
    )
    async with connect(config, role="publisher", context=context) as client:
        yield client


@dataclass
class Round:
    size: str
    protocol: int
    version: int
    manifest_bytes: int
    subscribers: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    announce_p99_ms: float
    missing: int
    cpu_s: float
    cpu_net_s: float
    window_s: float
    workers_cpu_s: float = 0.0
    """CPU of all subscriber worker processes over the round (heartbeats included)."""
    label: str = ""

    def line(self) -> str:
        return (
            f"{self.label or self.size:>8} p{self.protocol} v{self.version:<4} "
            f"manifest={self.manifest_bytes / 1e3:8.1f} KB  notified p50/p99/max="
            f"{self.p50_ms:7.1f}/{self.p99_ms:7.1f}/{self.max_ms:7.1f} ms  announce p99="
            f"{self.announce_p99_ms:7.1f} ms  broker cpu={self.cpu_s * 1e3:6.0f} ms "
            f"(net {self.cpu_net_s * 1e3:6.0f})  workers cpu={self.workers_cpu_s * 1e3:6.0f} ms"
            f"  window={self.window_s * 1e3:6.0f} ms  missing={self.missing}"
        )


class Bench:
    def __init__(self, args: argparse.Namespace, fleet: Fleet) -> None:
        self.args = args
        self.fleet = fleet
        self.shards: dict[str, list[Shard]] = {}
        self.manifest_bytes: dict[str, int] = {}
        self.idle_cpu_rate = 0.0
        self.rounds: list[Round] = []
        self.skipped: list[str] = []

    async def publish_round(
        self, client: Any, size: str, protocol: int, label: str = ""
    ) -> Round | None:
        fleet, args = self.fleet, self.args
        nbytes = self.manifest_bytes[size]
        # protocol 1 sends the manifest to everyone (a round's Announce is one frame per node
        # in node mode, but switching to protocol 1 re-subscribes every member, and each gets
        # the latest Announce of its own); protocol 2 with one fetch per subscriber too, per
        # node `connections` copies, per process `workers` copies
        copies = {
            "subscriber": args.subscribers,
            "node": connections(args),
            "process": args.workers,
        }[args.fetch]
        if protocol == 1:
            copies = args.subscribers
        if copies * nbytes > args.max_fanout_gib * (1 << 30):
            note = (
                f"protocol {protocol} (fetch={args.fetch}), {size} manifest ({nbytes / 1e6:.2f} MB)"
                f" x {copies} copies = {copies * nbytes / 1e9:.1f} GB per version: not run "
                f"(over --max-fanout-gib {args.max_fanout_gib})"
            )
            if note not in self.skipped:
                self.skipped.append(note)
            return None
        if fleet.protocol != protocol:
            await fleet.switch(protocol)
        fleet.version += 1
        version = fleet.version
        fleet.tell("expect", version)
        await fleet.gather("expecting", 30)
        shards = self.shards[size]
        for rank, shard in enumerate(shards[:-1]):
            await client.publish(MODEL, version, rank, len(shards), shard)
        # t0: the last rank's shard leaves; the broker assembles, validates and announces
        cpu0 = proc_cpu_s(fleet.pid)
        workers_cpu0 = fleet.workers_cpu_s()
        t0 = time.monotonic()
        published = await client.publish(MODEL, version, len(shards) - 1, len(shards), shards[-1])
        assert published.complete, published
        try:
            reports = await fleet.gather("report", args.timeout_s)
        except TimeoutError:
            fleet.tell("report")
            reports = await fleet.gather("report", 30)
        window = time.monotonic() - t0
        cpu = proc_cpu_s(fleet.pid) - cpu0
        workers_cpu = fleet.workers_cpu_s() - workers_cpu0
        notified = [t - t0 for _, _, _, ts in reports for t in ts if t]
        announced = [t - t0 for _, _, ts, _ in reports for t in ts if t]
        missing = args.subscribers - len(notified)
        if not notified:
            notified = announced = [float("nan")]
        result = Round(
            size=size,
            protocol=protocol,
            version=version,
            manifest_bytes=nbytes,
            subscribers=args.subscribers,
            p50_ms=pct(notified, 0.5) * 1e3,
            p99_ms=pct(notified, 0.99) * 1e3,
            max_ms=max(notified) * 1e3,
            announce_p99_ms=pct(announced, 0.99) * 1e3,
            missing=missing,
            cpu_s=cpu,
            cpu_net_s=max(0.0, cpu - self.idle_cpu_rate * window),
            window_s=window,
            workers_cpu_s=workers_cpu,
            label=label,
        )
        print(result.line(), flush=True)
        self.rounds.append(result)
        if args.json:  # kept as it goes: a run stopped at its limit still leaves its rounds
            partial = {"partial": True, "rounds": [r.__dict__ for r in self.rounds]}
            Path(args.json).write_text(json.dumps(partial, indent=1))  # noqa: ASYNC240
        return result

    async def idle_cpu(self, seconds: float) -> float:
        pid = self.fleet.pid
        cpu0, t0 = proc_cpu_s(pid), time.monotonic()
        await asyncio.sleep(seconds)
        return (proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)


async def http_times(
    session: aiohttp.ClientSession, url: str, repeats: int
) -> tuple[list[float], dict[str, Any]]:
    times: list[float] = []
    body: dict[str, Any] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        async with session.get(url) as response:
            body = await response.json()
            status = response.status
        times.append(time.perf_counter() - t0)
        if status != 200:
            return [float("nan")], body
    return times, body


async def status_phase(bench: Bench, client: Any, session: aiohttp.ClientSession) -> dict[str, Any]:
    """`/v1/subscribers` and `weightstream status` at full scale, and announce latency while
    a client polls status back to back."""
    fleet, args = bench.fleet, bench.args
    n = args.subscribers
    queries = {
        "first page (1000)": "/v1/subscribers",
        "page 5 of 1000": "/v1/subscribers?limit=1000&offset=4000",
        "limit=100": "/v1/subscribers?limit=100",
        f"model={MODEL}": f"/v1/subscribers?model={MODEL}&limit=100",
        "state=idle": "/v1/subscribers?state=idle&limit=100",
        "state=gone": "/v1/subscribers?state=gone&limit=100",
        "lag>=1": "/v1/subscribers?min_lag=1&limit=100",
        f"all {n} rows": f"/v1/subscribers?limit={min(n, 10_000)}",
        "/v1/models": "/v1/models",
    }
    out: dict[str, Any] = {"queries": {}}
    # every subscriber heartbeats the version it holds first (applied, hence lag, in status)
    await asyncio.sleep(2 * args.heartbeat_s)
    for label, path in queries.items():
        times, body = await http_times(session, fleet.http + path, args.status_repeats)
        entry = {
            "path": path,
            "p50_ms": statistics.median(times) * 1e3,
            "max_ms": max(times) * 1e3,
            "total": body.get("total"),
            "rows": len(body.get("subscribers", [])),
        }
        if times == [float("nan")]:
            entry["error"] = str(body)[:200]
        rows = body.get("subscribers") or [{}]
        entry["sample"] = {k: rows[0].get(k) for k in ("applied_version", "latest_version", "lag")}
        out["queries"][label] = entry
        print(
            f"  status {label:>20}: p50 {entry['p50_ms']:7.1f} ms  max {entry['max_ms']:7.1f} ms"
            f"  rows={entry['rows']} total={entry['total']} first={entry['sample']}"
            + (f"  ERROR {entry['error']}" if "error" in entry else ""),
            flush=True,
        )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for label, extra in (("cli_wall_ms", []), ("cli_min_lag_wall_ms", ["--min-lag", "1"])):
        cli: list[float] = []
        for _ in range(3):
            t0 = time.perf_counter()
            done = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "weightstream",
                "status",
                "--http",
                fleet.http,
                *extra,
                stdout=asyncio.subprocess.DEVNULL,
                env=env,
            )
            await done.wait()
            cli.append(time.perf_counter() - t0)
        out[label] = statistics.median(cli) * 1e3
    t0 = time.perf_counter()
    startup = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import weightstream.status", env=env
    )
    await startup.wait()
    startup_s = time.perf_counter() - t0
    out["cli_import_ms"] = startup_s * 1e3
    print(
        f"  weightstream status: {out['cli_wall_ms']:.0f} ms wall, with --min-lag 1 "
        f"{out['cli_min_lag_wall_ms']:.0f} ms (interpreter start and imports alone: "
        f"{startup_s * 1e3:.0f} ms)",
        flush=True,
    )

    # announce latency with and without status polling, alternating
    stop = asyncio.Event()
    polls: list[float] = []

    async def poll() -> None:
        while not stop.is_set():
            t = await http_times(session, fleet.http + "/v1/subscribers", 1)
            polls.extend(t[0])

    size = next(iter(bench.shards))  # the first of --sizes
    for _ in range(args.rounds):
        await bench.publish_round(client, size, fleet.protocol, label="quiet")
        task = asyncio.create_task(poll())
        await asyncio.sleep(0.2)
        await bench.publish_round(client, size, fleet.protocol, label="polling")
        stop.set()
        await task
        stop.clear()
    out["polls"] = len(polls)
    out["poll_p50_ms"] = statistics.median(polls) * 1e3 if polls else None
    return out


def summarize(rounds: list[Round]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[Round]] = {}
    for r in rounds:
        groups.setdefault((r.label or r.size, r.protocol), []).append(r)
    table = []
    for (label, protocol), rs in groups.items():
        table.append(
            {
                "case": label,
                "protocol": protocol,
                "rounds": len(rs),
                "manifest_kb": rs[0].manifest_bytes / 1e3,
                "p50_ms": statistics.median(r.p50_ms for r in rs),
                "p99_ms": statistics.median(r.p99_ms for r in rs),
                "max_ms": statistics.median(r.max_ms for r in rs),
                "announce_p99_ms": statistics.median(r.announce_p99_ms for r in rs),
                "cpu_ms": statistics.median(r.cpu_s for r in rs) * 1e3,
                "cpu_net_ms": statistics.median(r.cpu_net_s for r in rs) * 1e3,
                "workers_cpu_ms": statistics.median(r.workers_cpu_s for r in rs) * 1e3,
                "missing": sum(r.missing for r in rs),
            }
        )
    return table


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    fleet = Fleet(args, workdir)
    bench = Bench(args, fleet)
    sizes = args.sizes.split(",")
    for size in sizes:
        bench.shards[size] = SIZES[size]()
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.python_version()}",
        "load_before": os.getloadavg(),
        "subscribers": args.subscribers,
        "workers": args.workers,
        "per_node": args.per_node,
        "connections": connections(args),
        "curve": args.curve,
        "fetch": args.fetch,
        "heartbeat_s": args.heartbeat_s,
    }
    protocols = [int(p) for p in args.protocols.split(",")]
    fleet.protocol = protocols[0]
    fleet.start_broker()
    context = zmq.asyncio.Context()
    try:
        await asyncio.sleep(0.5)
        rss0 = proc_rss(fleet.pid)
        t0 = time.monotonic()
        fleet.start_workers()
        await fleet.gather("ready", args.connect_timeout_s)
        results["connect_s"] = time.monotonic() - t0
        print(f"{args.subscribers} subscribers ready in {results['connect_s']:.1f} s", flush=True)
        await asyncio.sleep(1.0)
        rss1 = proc_rss(fleet.pid)
        results["rss_before_mb"] = rss0 / 1e6
        results["rss_per_subscriber_kb"] = (rss1 - rss0) / args.subscribers / 1e3
        results["bare_router_per_connection_kb"] = (
            bare_router_bytes_per_connection(min(connections(args), 2000), args.curve) / 1e3
        )
        # this checkout's Registry (not an older broker's)
        results["registry_per_subscriber_kb"] = (
            0.0 if args.broker_pythonpath else registry_bytes_per_subscriber(args.subscribers) / 1e3
        )
        async with (
            publisher(fleet, context) as client,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        ):
            # one version of each size first: everyone holds one, and encoding sizes are known
            for size in sizes:
                fleet.version += 1
                shards = bench.shards[size]
                for rank, shard in enumerate(shards):
                    await client.publish(MODEL, fleet.version, rank, len(shards), shard)
                bench.manifest_bytes[size] = len(encode(_assembled(shards, fleet.version)))
            await fleet.switch(protocols[0])
            bench.idle_cpu_rate = await bench.idle_cpu(3.0)
            results["idle_cpu_rate"] = bench.idle_cpu_rate
            results["rss_after_versions_per_subscriber_kb"] = (
                (proc_rss(fleet.pid) - rss0) / args.subscribers / 1e3
            )
            print(
                f"broker RSS {rss0 / 1e6:.0f} MB -> +{results['rss_per_subscriber_kb']:.1f} KB per "
                f"subscriber; heartbeat-only CPU {bench.idle_cpu_rate * 100:.0f} % of a core",
                flush=True,
            )
            for size in sizes:
                for r in range(args.rounds):
                    order = protocols if r % 2 == 0 else protocols[::-1]
                    for protocol in order:
                        await bench.publish_round(client, size, protocol)
            if args.status:
                if fleet.protocol != max(protocols):
                    await fleet.switch(max(protocols))
                results["status"] = await status_phase(bench, client, session)
            counts, late = await fleet.stats()
            gone = (
                await http_times(session, f"{fleet.http}/v1/subscribers?state=gone&limit=1", 1)
            )[1]
            results["gone"] = gone.get("total")
            results["client_counts"] = counts
            results["heartbeat_send_late_max_s"] = late
            results["rss_end_per_subscriber_kb"] = (
                (proc_rss(fleet.pid) - rss0) / args.subscribers / 1e3
            )
    finally:
        fleet.stop()
        context.destroy(linger=0)
    results["rounds"] = [r.__dict__ for r in bench.rounds]
    results["summary"] = summarize(bench.rounds)
    results["skipped"] = bench.skipped
    results["load_after"] = os.getloadavg()
    log = (workdir / "broker.log").read_text(errors="replace")
    results["gone_logged"] = log.count("peer gone")
    results["broker_log_tail"] = log[-2000:]
    return results


def _assembled(shards: list[Shard], version: int) -> Any:
    from schemas.manifest import Manifest

    return Manifest.assemble(MODEL, version, shards, published_at=time.time())


def print_summary(results: dict[str, Any]) -> None:
    print()
    print(
        f"{results['subscribers']} subscribers on {results['connections']} connections "
        f"({results['per_node']} per node), {results['workers']} worker processes, "
        f"curve={results['curve']}, fetch={results['fetch']}, heartbeat {results['heartbeat_s']} s"
    )
    print(
        "| case | protocol | rounds | manifest | notified p50 | p99 | max | announce p99 "
        "| broker CPU / version (net of heartbeats) | workers CPU | missing |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results["summary"]:
        print(
            f"| {row['case']} | {row['protocol']} | {row['rounds']} | {row['manifest_kb']:.1f} KB "
            f"| {row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms | {row['max_ms']:.1f} ms "
            f"| {row['announce_p99_ms']:.1f} ms | {row['cpu_ms']:.0f} ms ({row['cpu_net_ms']:.0f}) "
            f"| {row['workers_cpu_ms']:.0f} ms | {row['missing']} |"
        )
    for note in results["skipped"]:
        print(f"- {note}")
    print(
        f"- broker RSS per subscriber: {results['rss_per_subscriber_kb']:.1f} KB after Hello + "
        f"Subscribe, {results['rss_end_per_subscriber_kb']:.1f} KB at the end; of it the "
        f"Registry's Python state {results['registry_per_subscriber_kb']:.1f} KB (tracemalloc); "
        f"a bare libzmq ROUTER gains {results['bare_router_per_connection_kb']:.1f} KB per "
        "connection"
    )
    print(
        f"- heartbeats: {results['client_counts'].get('heartbeat', 0)} sent, "
        f"{results['client_counts'].get('alive', 0)} Alive back; gone now={results['gone']}, "
        f"'peer gone' in the broker's log={results['gone_logged']}, "
        f"unknown_peer={results['client_counts'].get('error_unknown_peer', 0)}, "
        f"latest heartbeat sent {results['heartbeat_send_late_max_s'] * 1e3:.0f} ms late at most"
    )
    print(f"- load average before {results['load_before']}, after {results['load_after']}")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4, help="subscriber processes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size and protocol")
    parser.add_argument("--sizes", default="small,large", help=f"of {list(SIZES)}")
    parser.add_argument("--protocols", default="2,1", help="alternated round by round")
    parser.add_argument(
        "--per-node",
        type=int,
        default=1,
        help="subscribers per connection (a node link's members; 1: a connection each)",
    )
    parser.add_argument("--fetch", choices=("subscriber", "node", "process"), default="subscriber")
    parser.add_argument("--no-curve", dest="curve", action="store_false")
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="the broker's interval")
    parser.add_argument("--peer-timeout-s", type=float, default=10.0)
    parser.add_argument(
        "--max-heartbeats-per-s",
        type=float,
        default=None,
        help="the broker's heartbeat pacing (default: the broker's own, 2000; 0: off)",
    )
    parser.add_argument("--max-fanout-gib", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--connect-timeout-s",
        type=float,
        default=300.0,
        help="for every subscriber's first Hello and Subscribe (CURVE joins ~75/s here)",
    )
    parser.add_argument("--status", action="store_true", help="also the status phase")
    parser.add_argument("--status-repeats", type=int, default=10)
    parser.add_argument(
        "--no-push",
        dest="push",
        action="store_false",
        help="node mode: the broker pushes no manifest to the nodes (`link_manifest_push = "
        "false`), as for links whose engines take manifests from relay peers",
    )
    parser.add_argument(
        "--broker-cpus",
        type=lambda text: {int(c) for c in text.split(",")},
        default=set(),
        metavar="LIST",
        help="pin the broker to these cores (e.g. 0) and the subscriber workers to the others, "
        "as on a fleet where the broker does not share its CPU with 10,000 subscribers",
    )
    parser.add_argument("--broker-log-level", default="WARNING")
    parser.add_argument(
        "--broker-pythonpath", help="run the broker of another checkout (a same-run baseline)"
    )
    parser.add_argument(
        "--broker-profile", help="run the broker under cProfile, the profile written here"
    )
    parser.add_argument("--json", help="write every figure here")
    return parser


def main() -> None:
    args = parser().parse_args()
    results = asyncio.run(run(args))
    print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
