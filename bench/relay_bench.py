"""Relay benchmark: publish -> every node applied, relay against direct reads, links shaped to B.

    sudo PYTHONPATH=. python bench/relay_bench.py [--nodes 1,2,4,8] [--rounds 3] [--size 250MB]
        [--rate 25MB] [--bucket 1MiB] [--fanout 2] [--modes relay,direct] [--warmup-versions 3]

Topology (network namespaces; needs root, iproute2 and tc):

    root namespace: bridge, `weightstream broker` (control plane only, its link unshaped)
        ├── trainer node: `weightstream publish` of a synthetic model of S bytes
        ├── node 1 .. node N: `weightstream subscribe` (relay: with --relay-listen)
        ├── late node: a subscriber started once the others hold the version
        └── hog node: reads from the trainer flat out (the late joiner's trainer saturated)

Every node's link, the trainer's too, is shaped to the same rate B both ways (`tc tbf` on each
end of its veth: `weightstream.netns.NodeNet.shape`). B is measured too: a raw mooncake read over
one shaped link, and the floors use that.

A cell is one (mode, N): a fresh broker (relay: `--relay-fanout K`; direct: the trainer serves
every read) and N fresh subscribers; one publisher publishes W warm-up versions over unshaped
links (`--warmup-versions`, default 3: connection handshakes, and each subscriber's two
alternating stagings and the publisher's three buffer sets allocated and touched once, as in a
running RL loop), the links are then shaped during its `--interval-s` pause, and version W + 1 is the
measured one: publish() -> all N applied, from the
publisher's own log (its pack + checksum time plus its wait for N applied). A round is every N,
each as relay and as direct, in alternating order; the host's rates swing 2x between minutes, so
ratios are per round, then the median over rounds.

Once, after the rounds (N = the largest): a late joiner while the trainer's uplink is saturated by
the hog (or down: --late-trainer down) must apply from peers; and a relay SIGKILLed mid-transfer
must still leave every other node at the version, every dump equal to the published bytes.

Floors: relay S/B + (ceil(log2(N+1)) - 1) x c/B (c = bucket size: each tree level adds one
bucket's store-and-forward); direct N x S/B (every byte crosses the trainer's uplink).
Progress goes to stderr, the table to stdout, and the whole report into bench/RESULTS_RELAY.md
between the relay-bench markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.auth import make_local_keys
from weightstream.cli import _size
from weightstream.netns import NodeNet, netns_available

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "MC_LOG_LEVEL": "ERROR", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
MODEL = "bench"
MARK_START, MARK_END = "<!-- relay-bench:start -->", "<!-- relay-bench:end -->"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A cell could not be measured (a process died, a deadline passed): what and its logs."""


# --- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Procs:
    """Every process of one cell, stopped (SIGTERM, then SIGKILL) when the cell ends."""

    workdir: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], prefix: tuple[str, ...] = ()) -> Proc:
        path = self.workdir / f"{name}.log"
        with path.open("ab") as out:
            popen = subprocess.Popen(
                [*prefix, *argv], stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT
            )
        proc = Proc(name, popen, path)
        self.started.append(proc)
        return proc

    def weightstream(self, name: str, *args: str, prefix: tuple[str, ...] = ()) -> Proc:
        return self.start(name, [sys.executable, "-m", "weightstream", *args], prefix)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=15)
        self.started.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.started)


def wait_until(check: Callable[[], Any], *, timeout_s: float, what: str, procs: Procs) -> Any:
    """Poll `check` every 50 ms until it returns something truthy; a deadline, and a process
    of the cell that died, both end the wait with the cell's logs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        dead = [p for p in procs.started if p.popen.poll() not in (None, 0) and p.name != "killed"]
        if dead:
            raise BenchError(
                f"{dead[0].name} exited ({dead[0].popen.returncode}) waiting for {what}\n{procs.logs()}"
            )
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{procs.logs()}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our broker's http)
        return json.loads(response.read())


# --- CPU ---------------------------------------------------------------------------------------


class CpuSampler:
    """/proc/stat, and the CPU time of the processes it tracks, every 0.2 s in a thread (bounded:
    the last 20 minutes), so that the busy share of the host's cores, and our processes' share,
    over any window of the run can be read afterwards."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=6000)
        self.tracked: set[int] = set()  # owned by the cells: their processes' pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    @staticmethod
    def _host() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    def _ours(self) -> int:
        ticks = 0
        for pid in list(self.tracked):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue  # gone: its time up to its last sample stays counted below
            fields = stat.rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
        return ticks

    def _run(self) -> None:
        while not self._stop.is_set():
            busy, total = self._host()
            self.samples.append((time.time(), busy, total, self._ours()))
            self._stop.wait(0.2)

    def track(self, pids: list[int]) -> None:
        """Count these processes from now on (a window must start after this call and end
        before any of them exits)."""
        self.tracked = set(pids)
        self.samples.clear()

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def busy(self, start: float, end: float) -> tuple[float, float]:
        """(host busy, our processes' busy), shares of all cores (0..1) between two times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return math.nan, math.nan
        (_, b0, t0, o0), (_, b1, t1, o1) = inside[0], inside[-1]
        return (b1 - b0) / max(t1 - t0, 1), (o1 - o0) / max(t1 - t0, 1)


# --- the cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    """The namespaces: node 0 the trainer, 1..max_nodes the subscribers, then late and hog."""

    max_nodes: int
    rate: float
    fair: bool = True
    net: NodeNet = field(init=False)
    workdir: Path = field(
        default_factory=lambda: Path(f"/tmp/weightstream-relay-bench-{os.getpid()}")
    )
    keys: dict[str, str] = field(default_factory=dict)

    TRAINER = 0

    @property
    def late(self) -> int:
        return self.max_nodes + 1

    @property
    def hog(self) -> int:
        return self.max_nodes + 2

    def open(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net = NodeNet(self.max_nodes + 3, prefix="wrb", net=181).open()
        self.keys = {
            k: str(v) for k, v in make_local_keys(self.workdir / "keys", model=MODEL).items()
        }
        return self

    def close(self) -> None:
        self.net.close()

    def shape(self, nodes: list[int]) -> None:
        for node in nodes:
            self.net.shape(node, rate_bytes_per_s=self.rate, fair=self.fair)

    def unshape(self) -> None:
        for node in range(self.net.count):
            self.net.unshape(node)

    def prefix(self, node: int) -> tuple[str, ...]:
        return self.net.exec_prefix(node)

    def address(self, node: int) -> str:
        return self.net.address(node)


def raw_rate(cluster: Cluster, nbytes: int) -> float:
    """Bytes/s of a raw mooncake read, trainer -> node 1, over shaped links (no broker, no
    checksums): the B that the floors use."""
    cluster.shape([Cluster.TRAINER, 1])
    server = subprocess.Popen(
        [
            *cluster.prefix(Cluster.TRAINER),
            sys.executable,
            "-m",
            "bench.mooncake_raw",
            "serve",
            "--host",
            cluster.address(Cluster.TRAINER),
            "--nbytes",
            str(nbytes),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        out = subprocess.run(
            [
                *cluster.prefix(1),
                sys.executable,
                "-m",
                "bench.mooncake_raw",
                "read",
                "--host",
                cluster.address(1),
                "--session",
                info["session"],
                "--address",
                str(info["address"]),
                "--nbytes",
                str(nbytes),
                "--chunk",
                str(4 << 20),
                "--repeat",
                "2",
            ],
            capture_output=True,
            env=ENV,
            cwd=ROOT,
            check=True,
            timeout=120,
        )
        return float(json.loads(out.stdout)["gbps"]) * 1e9
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
        cluster.unshape()


# --- one cell ----------------------------------------------------------------------------------


@dataclass
class Settings:
    size: int
    bucket: int
    fanout: int
    relay_supported: bool
    timeout_s: float
    max_inflight: int
    warmup: int = 2
    """Versions applied over unshaped links before the measured one."""
    one_sided: bool = False
    """Relay readers read located buckets one-sided over mooncake (`--relay-one-sided`)."""


@dataclass
class Cell:
    mode: str  # "relay" or "direct"
    nodes: int
    round: int
    e2e_s: float = math.nan
    publish_s: float = math.nan
    pulls_s: list[float] = field(default_factory=list)
    cpu_host: float = math.nan
    """Busy share of the host's cores during publish -> all applied (others' work too)."""
    cpu_ours: float = math.nan
    """The share of it that the cell's processes used (broker, trainer, subscribers)."""
    shaped_late: bool = False
    trainer_copies: float = math.nan
    """Bytes the trainer served (the relay status' per-source counts), in copies of the model."""
    holder_copies: float = math.nan
    """The most any one holder served, in copies of the model."""
    status: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Fleet:
    """One cell's broker, subscribers and trainer in the cluster."""

    def __init__(self, cluster: Cluster, settings: Settings, mode: str, name: str) -> None:
        self.cluster, self.settings, self.mode = cluster, settings, mode
        workdir = cluster.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(workdir)
        self.http = ""
        self.endpoint = ""
        self.subscribers: dict[int, Proc] = {}

    def start_broker(self) -> None:
        ready = self.procs.workdir / "broker.json"
        relay = []
        if self.settings.relay_supported:
            fanout = self.settings.fanout if self.mode == "relay" else 0
            relay = ["--relay-fanout", str(fanout)]
        self.procs.weightstream(
            "broker",
            "--log-level",
            "INFO",
            "broker",
            "--endpoint",
            f"tcp://{self.cluster.net.host_address}:0",
            "--http-port",
            "0",
            "--ready-file",
            str(ready),
            "--key-file",
            self.cluster.keys["broker"],
            "--allowlist-file",
            self.cluster.keys["allowlist"],
            *relay,
        )
        wait_until(ready.exists, timeout_s=60, what="the broker's ready file", procs=self.procs)
        info = json.loads(ready.read_text())
        self.endpoint = info["endpoint"]
        self.http = f"http://127.0.0.1:{info['http_port']}"

    def _peer_args(self, key: str, host: str, name: str) -> list[str]:
        """What a subscriber and the trainer both say: the broker, the model, mooncake from
        `host`, the stable name, and the test key `key` (CURVE)."""
        return [
            "--broker",
            self.endpoint,
            "--model",
            MODEL,
            "--transport",
            "mooncake",
            "--host",
            host,
            "--name",
            name,
            "--key-file",
            self.cluster.keys[key],
            "--broker-key-file",
            self.cluster.keys["broker.public"],
        ]

    def start_subscriber(self, node: int, *, dump_dir: Path | None = None) -> Proc:
        address = self.cluster.address(node)
        relay = ["--relay-listen", address] if self.mode == "relay" else []
        if relay and self.settings.one_sided:
            relay.append("--relay-one-sided")
        dump = ["--dump-dir", str(dump_dir), "--dump-all"] if dump_dir is not None else []
        proc = self.procs.weightstream(
            f"node{node}",
            "--log-level",
            "INFO",
            "subscribe",
            *self._peer_args("subscriber", address, f"node-{node}"),
            "--pull-timeout-s",
            str(self.settings.timeout_s),
            "--max-inflight",
            str(self.settings.max_inflight),
            *relay,
            *dump,
            prefix=self.cluster.prefix(node),
        )
        self.subscribers[node] = proc
        return proc

    def start_trainer(self, versions: str, *, wait: int, interval_s: float) -> Proc:
        return self.procs.weightstream(
            f"trainer-v{versions}",
            "--log-level",
            "INFO",
            "publish",
            *self._peer_args("trainer", self.cluster.address(Cluster.TRAINER), "trainer"),
            "--synthetic",
            str(self.settings.size),
            "--bucket",
            str(self.settings.bucket),
            "--versions",
            versions,
            "--wait-subscribers",
            str(wait),
            "--wait-timeout-s",
            str(self.settings.timeout_s),
            "--interval-s",
            str(interval_s),
            "--serve",
            prefix=self.cluster.prefix(Cluster.TRAINER),
        )

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = get_json(f"{self.http}/v1/subscribers")["subscribers"]
        return rows

    def row(self, proc: Proc) -> dict[str, Any] | None:
        return next((r for r in self.rows() if r["pid"] == proc.pid), None)

    def version_status(self, version: int) -> dict[str, Any]:
        status: dict[str, Any] = get_json(f"{self.http}/v1/models/{MODEL}/versions/{version}")
        return status

    def wait_registered(self, count: int) -> None:
        def registered() -> bool:
            return len([r for r in self.rows() if r["state"] != "gone"]) >= count

        wait_until(registered, timeout_s=120, what=f"{count} subscribers", procs=self.procs)

    def applied(self, procs: list[Proc], version: int) -> bool:
        pids = {p.pid for p in procs}
        at = {r["pid"] for r in self.rows() if (r["applied_version"] or 0) >= version}
        return pids <= at

    def stop(self) -> None:
        self.procs.stop_all()


_PUBLISHED = r"version={v} size=\S+ tensors=\d+ published in ([\d.]+) s"
_APPLIED = r"version={v} applied by (\d+) subscribers in ([\d.]+) s"


def _logged(proc: Proc, pattern: str) -> re.Match[str] | None:
    return re.search(pattern, proc.text())


def _log_time(proc: Proc, pattern: str) -> float:
    """The wall-clock time of the log line matching `pattern` (its leading timestamp)."""
    for line in proc.text().splitlines():
        if re.search(pattern, line):
            stamp = re.match(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)[,.](\d+)", line)
            if stamp:
                base = time.mktime(time.strptime(stamp[1].replace("T", " "), "%Y-%m-%d %H:%M:%S"))
                return base + float(f"0.{stamp[2]}")
    return math.nan


def run_cell(
    cluster: Cluster, settings: Settings, cpu: CpuSampler, mode: str, nodes: int, round_: int
) -> Cell:
    """Warm-up versions 1..W unshaped, shape every link, measure version W + 1."""
    cell = Cell(mode, nodes, round_)
    fleet = Fleet(cluster, settings, mode, f"r{round_}-{mode}-{nodes}")
    measured = settings.warmup + 1
    try:
        fleet.start_broker()
        subscribers = [fleet.start_subscriber(node) for node in range(1, nodes + 1)]
        fleet.wait_registered(nodes)
        trainer = fleet.start_trainer(f"1-{measured}", wait=nodes, interval_s=2.0)
        cpu.track([p.pid for p in fleet.procs.started])
        wait_until(
            lambda: _logged(trainer, _APPLIED.format(v=settings.warmup)),
            timeout_s=settings.timeout_s,
            what="the warm-up versions applied",
            procs=fleet.procs,
        )
        cluster.shape([Cluster.TRAINER, *range(1, nodes + 1)])
        shaped_at = time.time()
        published = wait_until(
            lambda: _logged(trainer, _PUBLISHED.format(v=measured)),
            timeout_s=60,
            what=f"version {measured} published",
            procs=fleet.procs,
        )
        done = wait_until(
            lambda: _logged(trainer, _APPLIED.format(v=measured)),
            timeout_s=settings.timeout_s,
            what=f"version {measured} applied by {nodes}",
            procs=fleet.procs,
        )
        ended = time.time()
        cell.publish_s = float(published[1])
        cell.e2e_s = cell.publish_s + float(done[2])
        # The pause between versions must have covered the shaping (else the round is void).
        cell.shaped_late = _log_time(trainer, _PUBLISHED.format(v=measured)) < shaped_at
        cell.cpu_host, cell.cpu_ours = cpu.busy(ended - cell.e2e_s, ended)
        rows = {r["pid"]: r for r in fleet.rows()}
        cell.pulls_s = [rows[p.pid]["last_pull_s"] or math.nan for p in subscribers]
        version = fleet.version_status(measured)
        cell.status = {"version": version, "subscribers": [rows[p.pid] for p in subscribers]}
        served = (version.get("relay") or {}).get("served_bytes") or {}
        holders = served.get("holders") or {}
        size = version["total_bytes"]
        cell.trainer_copies = served.get("trainer", math.nan) / size
        cell.holder_copies = max(holders.values(), default=0) / size
        return cell
    finally:
        fleet.stop()
        cluster.unshape()


# --- the late joiner and the killed relay -----------------------------------------------------


class Hog:
    """Saturate the trainer's uplink: a TCP stream from the trainer node to the hog node,
    as fast as the shaping lets it (this script's `hog-sink` / `hog-send` commands)."""

    PORT = 47001

    def __init__(self, cluster: Cluster, procs: Procs) -> None:
        sink_host = cluster.address(cluster.hog)
        me = [sys.executable, "-m", "bench.relay_bench"]
        procs.start("hog-sink", [*me, "hog-sink", "--host", sink_host], cluster.prefix(cluster.hog))
        time.sleep(1.0)  # the sink's listen(); the sender retries its connect anyway
        procs.start(
            "hog-send",
            [*me, "hog-send", "--to", f"{sink_host}:{self.PORT}"],
            cluster.prefix(Cluster.TRAINER),
        )


def hog_sink(host: str) -> None:
    with socket.create_server((host, Hog.PORT)) as server:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass


def hog_send(to: str) -> None:
    host, port = to.rsplit(":", 1)
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    block = bytes(1 << 20)
    with conn:
        while True:
            conn.sendall(block)


def read_from(version: dict[str, Any], name: str) -> dict[str, int]:
    """Bytes node `name` verified per source of this version ("trainer" or a holder's name),
    from the version's status (`relay.nodes[].read_bytes`; empty on a broker without relay)."""
    nodes: list[dict[str, Any]] = (version.get("relay") or {}).get("nodes") or []
    found: dict[str, Any] = next((n for n in nodes if n.get("name") == name), {})
    return {str(k): int(v) for k, v in (found.get("read_bytes") or {}).items()}


def routes_of(version: dict[str, Any]) -> dict[str, list[str]]:
    """Who reads each stripe from whom: node name -> parent per stripe."""
    nodes = (version.get("relay") or {}).get("nodes") or []
    return {n["name"]: n["reads_from"] for n in nodes if n.get("reads_from") is not None}


def late_joiner(
    cluster: Cluster, settings: Settings, mode: str, nodes: int, trainer_link: str
) -> dict[str, Any]:
    """N nodes at version 2 (shaped), then the trainer's uplink saturated (or down) and one more
    subscriber started: how long from its registration to applied, and where its bytes came from."""
    fleet = Fleet(cluster, settings, mode, f"late-{mode}-{nodes}")
    try:
        fleet.start_broker()
        subscribers = [fleet.start_subscriber(node) for node in range(1, nodes + 1)]
        fleet.wait_registered(nodes)
        cluster.shape([Cluster.TRAINER, *range(1, nodes + 1), cluster.late, cluster.hog])
        trainer = fleet.start_trainer("2", wait=nodes, interval_s=0)
        wait_until(
            lambda: _logged(trainer, _APPLIED.format(v=2)),
            timeout_s=settings.timeout_s,
            what=f"version 2 applied by {nodes}",
            procs=fleet.procs,
        )
        if trainer_link == "down":
            cluster.net.link(Cluster.TRAINER, up=False)
        else:
            Hog(cluster, fleet.procs)
            time.sleep(2.0)  # the hog's stream at full rate before the joiner asks for anything
        late = fleet.start_subscriber(cluster.late)
        joined = wait_until(
            lambda: fleet.row(late),
            timeout_s=120,
            what="the late joiner registered",
            procs=fleet.procs,
        )
        registered_at = time.monotonic()
        del joined
        wait_until(
            lambda: fleet.applied([late], 2),
            timeout_s=settings.timeout_s,
            what="the late joiner at version 2",
            procs=fleet.procs,
        )
        seconds = time.monotonic() - registered_at
        row = fleet.row(late)
        return {
            "mode": mode,
            "nodes": nodes,
            "trainer_link": trainer_link,
            "registered_to_applied_s": seconds,
            "pull_s": (row or {}).get("last_pull_s"),
            "sources": read_from(fleet.version_status(2), f"node-{cluster.late}"),
            "row": row,
            "version": fleet.version_status(2),
            "others": [fleet.row(p) for p in subscribers],
        }
    finally:
        cluster.net.link(Cluster.TRAINER, up=True)
        fleet.stop()
        cluster.unshape()


def dumps_equal(paths: list[Path], size: int, version: int) -> list[bool]:
    """Whether each subscriber's dump holds exactly the published bytes of `version` (the
    synthetic model is made once, then every dump compared bit for bit)."""
    import torch
    from safetensors.torch import load_file

    from publishers.sources import synthetic_llama

    def bits(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous().view(-1).view(torch.uint8)

    want = {n: bits(t) for n, t in synthetic_llama(size, version=version).items()}
    equal = []
    for path in paths:
        live = load_file(str(path))
        same = set(live) == set(want) and all(
            torch.equal(bits(live[n]), t) for n, t in want.items()
        )
        equal.append(same)
    return equal


def killed_relay(cluster: Cluster, settings: Settings, mode: str, nodes: int) -> dict[str, Any]:
    """Version 2 over shaped links; the relay the most readers read from SIGKILLed at 30-60 %
    of its own pull; every other node must apply version 2 with the published bytes."""
    fleet = Fleet(cluster, settings, mode, f"kill-{mode}-{nodes}")
    dumps = cluster.workdir / f"kill-{mode}-{nodes}" / "dumps"
    try:
        fleet.start_broker()
        subscribers = {
            node: fleet.start_subscriber(node, dump_dir=dumps / f"node{node}")
            for node in range(1, nodes + 1)
        }
        fleet.wait_registered(nodes)
        cluster.shape([Cluster.TRAINER, *range(1, nodes + 1)])
        fleet.start_trainer("2", wait=nodes - 1, interval_s=0)

        def busiest_parent() -> int | None:
            with contextlib.suppress(urllib.error.HTTPError):  # 404 until announced
                parents = [p for ps in routes_of(fleet.version_status(2)).values() for p in ps if p]
                named = [int(p.split("-")[1]) for p in parents if p.startswith("node-")]
                if named:
                    return statistics.mode(named)
            return None

        victim_node = wait_until(
            busiest_parent, timeout_s=settings.timeout_s, what="the plan", procs=fleet.procs
        )
        victim = subscribers[victim_node]

        def mid_pull() -> bool:
            row = fleet.row(victim)
            return bool(row and row["pulling_version"] == 2 and 0.3 <= (row["progress"] or 0) < 0.6)

        wait_until(
            mid_pull,
            timeout_s=settings.timeout_s,
            what=f"node {victim_node} mid-pull",
            procs=fleet.procs,
        )
        routes = routes_of(fleet.version_status(2))
        victim_row = fleet.row(victim) or {}
        progress = victim_row.get("progress") or math.nan
        readers = sorted(n for n, ps in routes.items() if f"node-{victim_node}" in ps)
        started = time.monotonic()
        victim.name = "killed"
        victim.popen.send_signal(signal.SIGKILL)
        survivors = [p for n, p in subscribers.items() if n != victim_node]
        wait_until(
            lambda: fleet.applied(survivors, 2),
            timeout_s=settings.timeout_s,
            what="every survivor at version 2",
            procs=fleet.procs,
        )
        after_kill_s = time.monotonic() - started
        files = [dumps / f"node{n}" / "v2.safetensors" for n in subscribers if n != victim_node]
        wait_until(
            lambda: all(f.exists() for f in files),
            timeout_s=60,
            what="the dumps",
            procs=fleet.procs,
        )
        equal = dumps_equal(files, settings.size, 2)
        shutil.rmtree(dumps, ignore_errors=True)  # 8 x S on disk
        rows = {r["pid"]: r for r in fleet.rows()}
        version = fleet.version_status(2)
        return {
            "mode": mode,
            "nodes": nodes,
            "killed": f"node-{victim_node}",
            "readers": readers,
            "progress": progress,
            "after_kill_s": after_kill_s,
            "survivors": len(survivors),
            "dumps_equal": sum(equal),
            "pulls_s": [rows[p.pid]["last_pull_s"] for p in survivors],
            "sources": {f"node-{n}": read_from(version, f"node-{n}") for n in subscribers},
            "routes_at_kill": routes,
            "routes_after": routes_of(version),
            "version": version,
        }
    finally:
        fleet.stop()
        cluster.unshape()


# --- report ------------------------------------------------------------------------------------


def floors(size: int, bucket: int, rate: float, nodes: int) -> tuple[float, float]:
    """(relay floor, direct floor) in seconds."""
    relay = size / rate + (math.ceil(math.log2(nodes + 1)) - 1) * bucket / rate
    return relay, nodes * size / rate


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def table(cells: list[Cell], nbytes: int, bucket: int, rate: float, nodes: list[int]) -> list[str]:
    by = {(c.mode, c.nodes, c.round): c for c in cells}
    rounds = sorted({c.round for c in cells})
    lines = [
        "| N | direct (median) | N x S/B | direct / N x S/B | relay (median) | relay floor | relay / floor | relay / (S/B) | direct / relay (median of rounds) | relay N / relay 1 | our CPU relay / direct |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in nodes:
        relay_floor, direct_floor = floors(nbytes, bucket, rate, n)
        direct = [by[("direct", n, r)].e2e_s for r in rounds if ("direct", n, r) in by]
        relay = [by[("relay", n, r)].e2e_s for r in rounds if ("relay", n, r) in by]
        speedup = [
            by[("direct", n, r)].e2e_s / by[("relay", n, r)].e2e_s
            for r in rounds
            if ("direct", n, r) in by and ("relay", n, r) in by
        ]
        to_one = [
            by[("relay", n, r)].e2e_s / by[("relay", 1, r)].e2e_s
            for r in rounds
            if ("relay", n, r) in by and ("relay", 1, r) in by
        ]
        cpu_r = median([by[("relay", n, r)].cpu_ours for r in rounds if ("relay", n, r) in by])
        cpu_d = median([by[("direct", n, r)].cpu_ours for r in rounds if ("direct", n, r) in by])
        lines.append(
            f"| {n} | {median(direct):.2f} s | {direct_floor:.2f} s | {median(direct) / direct_floor:.2f} "
            f"| {median(relay):.2f} s | {relay_floor:.2f} s | {median(relay) / relay_floor:.2f} "
            f"| {median(relay) / (nbytes / rate):.2f} | {median(speedup):.2f} | {median(to_one):.2f} "
            f"| {cpu_r * 100:.0f} % / {cpu_d * 100:.0f} % |"
        )
    return lines


def per_round(cells: list[Cell]) -> list[str]:
    lines = [
        "| round | mode | N | publish -> all applied | publish (pack) | node pulls (min-max) | uplink copies: trainer / busiest holder | CPU: ours of host busy | shaped in time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        pulls = [p for p in c.pulls_s if not math.isnan(p)]
        span = f"{min(pulls):.2f}-{max(pulls):.2f} s" if pulls else "n/a"
        lines.append(
            f"| {c.round} | {c.mode} | {c.nodes} | {c.e2e_s:.2f} s | {c.publish_s:.2f} s | {span} "
            f"| {c.trainer_copies:.2f} / {c.holder_copies:.2f} "
            f"| {c.cpu_ours * 100:.0f} % of {c.cpu_host * 100:.0f} % | {'no (void)' if c.shaped_late else 'yes'} |"
        )
    return lines


def write_results(text: str) -> None:
    path = ROOT / "bench" / "RESULTS_RELAY.md"
    current = path.read_text() if path.exists() else "# Relay benchmark (bench/relay_bench.py)\n\n"
    if MARK_START in current:
        head, _, rest = current.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        current = head + text + tail
    else:
        current = current.rstrip() + "\n\n" + text + "\n"
    path.write_text(current)


def scenario_lines(extras: dict[str, Any], s_over_b: float) -> list[str]:
    """The late joiners and the killed relay, one bullet each."""
    lines = []
    for mode in ("relay", "direct"):
        late = extras.get(f"late-{mode}")
        if late is None:
            continue
        seconds = late["registered_to_applied_s"]
        sources = late["sources"]
        trainer = sources.get("trainer", 0)
        where = (
            f"bytes by source {sources}, {trainer / 1e6:.0f} MB from the trainer"
            if sources
            else "every byte from the trainer (fanout 0 routes nobody, so no per-source counts)"
        )
        lines.append(
            f"- Late joiner, {mode}, N = {late['nodes']} holding the version, the trainer's uplink "
            f"{late['trainer_link']}: registered -> applied {seconds:.2f} s "
            f"({seconds / s_over_b:.2f} x S/B), its pull {late['pull_s'] or math.nan:.2f} s; "
            f"{where}."
        )
    kill = extras.get("kill")
    if kill is not None:
        lines.append(
            f"- Relay killed: {kill['killed']} (read by {', '.join(kill['readers']) or 'nobody'}) "
            f"SIGKILLed at {kill['progress']:.0%} of its own pull, N = {kill['nodes']}; "
            f"{kill['survivors']} of {kill['survivors']} others applied version 2, "
            f"{kill['dumps_equal']} dumps equal to the published bytes; the last "
            f"{kill['after_kill_s']:.2f} s after the kill; survivors' pulls "
            f"{min(kill['pulls_s']):.2f}-{max(kill['pulls_s']):.2f} s. Bytes by source: "
            + "; ".join(
                f"{name} {', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in got.items())}"
                for name, got in kill["sources"].items()
                if name != kill["killed"]
            )
            + "."
        )
    return lines


# --- main --------------------------------------------------------------------------------------


def relay_supported() -> bool:
    """Whether this checkout's broker plans relays (`--relay-fanout`) and its subscriber serves
    (`--relay-listen`); without both, only direct reads can be measured."""

    def has(command: str, flag: str) -> bool:
        out = subprocess.run(
            [sys.executable, "-m", "weightstream", command, "--help"],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
            check=False,
        )
        return flag in out.stdout

    return has("broker", "--relay-fanout") and has("subscribe", "--relay-listen")


@contextlib.contextmanager
def cluster_of(max_nodes: int, rate: float, fair: bool) -> Iterator[Cluster]:
    cluster = Cluster(max_nodes, rate, fair).open()
    try:
        yield cluster
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", default="1,2,4,8", help="subscriber counts (default 1,2,4,8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every cell (default 3)")
    parser.add_argument("--size", type=_size, default=_size("250MB"), help="model size S")
    parser.add_argument(
        "--rate",
        type=_size,
        default=_size("25MB"),
        help="every link's rate B per second, each way (default 25MB: 8 relaying nodes stay "
        "below the cores of a 2-core host)",
    )
    parser.add_argument(
        "--fifo",
        action="store_true",
        help="shape each link with one FIFO token bucket (tbf) instead of a fair share per peer",
    )
    parser.add_argument(
        "--bucket",
        type=_size,
        default=_size("1MiB"),
        help="bucket size c (default 1MiB: c/S = 1/240, as 64 MiB buckets of a 16 GB model)",
    )
    parser.add_argument("--fanout", type=int, default=2, help="the broker's --relay-fanout")
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=1,
        help="each subscriber's --max-inflight (default 1, the subscriber's own default)",
    )
    parser.add_argument("--modes", default="relay,direct", help="relay,direct (default both)")
    parser.add_argument(
        "--warmup-versions",
        type=int,
        default=3,
        help="versions applied unshaped before the measured one (default 3: every staging and "
        "publish buffer set in use is allocated and touched once, as in a running loop)",
    )
    parser.add_argument(
        "--relay-one-sided",
        action="store_true",
        help="relay readers read located buckets one-sided over mooncake (subscribe's flag)",
    )
    parser.add_argument(
        "--late-trainer",
        choices=("saturated", "down", "skip"),
        default="saturated",
        help="the trainer's uplink while the late joiner pulls (default saturated)",
    )
    parser.add_argument("--no-kill", action="store_true", help="skip the killed-relay scenario")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each wait")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS_RELAY.md")
    args = parser.parse_args()
    if args.warmup_versions < 1:
        parser.error("--warmup-versions must be at least 1 (the connections are made in it)")
    if not netns_available():
        sys.exit("relay_bench needs root and iproute2 (ip netns) and tc")
    nodes = sorted(int(n) for n in args.nodes.split(","))
    modes = [m for m in args.modes.split(",") if m]
    supported = relay_supported()
    if "relay" in modes and not supported:
        log("this checkout has no relay (--relay-fanout / --relay-listen): direct reads only")
        modes = [m for m in modes if m != "relay"]
    settings = Settings(
        args.size,
        args.bucket,
        args.fanout,
        supported,
        args.timeout_s,
        args.max_inflight,
        warmup=args.warmup_versions,
        one_sided=args.relay_one_sided,
    )
    from publishers.sources import synthetic_llama

    nbytes = sum(t.nbytes for t in synthetic_llama(args.size, version=0).values())
    load_before = os.getloadavg()
    started = time.time()
    cells: list[Cell] = []
    extras: dict[str, Any] = {}
    with cluster_of(max(nodes), args.rate, not args.fifo) as cluster, CpuSampler() as cpu:
        time.sleep(3.0)
        idle_busy, _ = cpu.busy(time.time() - 3.0, time.time())
        log(
            f"host: {os.cpu_count()} cores, load {load_before[0]:.2f}, busy {idle_busy * 100:.0f} % before the run"
        )
        rate = raw_rate(cluster, min(nbytes, 200_000_000))
        log(
            f"B: tc rate {args.rate / 1e6:.0f} MB/s, raw mooncake read over one shaped link {rate / 1e6:.1f} MB/s"
        )
        for round_ in range(1, args.rounds + 1):
            order = modes if round_ % 2 else modes[::-1]
            for n in nodes:
                for mode in order:
                    log(f"round {round_}: {mode}, N={n} ...")
                    cell = run_cell(cluster, settings, cpu, mode, n, round_)
                    relay_floor, direct_floor = floors(nbytes, args.bucket, rate, n)
                    floor = relay_floor if mode == "relay" else direct_floor
                    log(
                        f"  {cell.e2e_s:.2f} s ({cell.e2e_s / floor:.2f} x its floor {floor:.2f} s), "
                        f"publish {cell.publish_s:.2f} s, CPU ours {cell.cpu_ours * 100:.0f} % of "
                        f"host {cell.cpu_host * 100:.0f} %"
                        + (" VOID: shaped after v2 began" if cell.shaped_late else "")
                    )
                    cells.append(cell)
        big = max(nodes)
        if args.late_trainer != "skip":
            for mode in modes:
                log(f"late joiner, {mode}, N={big}, trainer {args.late_trainer} ...")
                late = late_joiner(cluster, settings, mode, big, args.late_trainer)
                extras[f"late-{mode}"] = late
                log(
                    f"  {late['registered_to_applied_s']:.2f} s registered -> applied, pull {late['pull_s']}, sources {late['sources']}"
                )
        if "relay" in modes and not args.no_kill:
            log(f"relay killed mid-transfer, N={big} ...")
            kill = killed_relay(cluster, settings, "relay", big)
            extras["kill"] = kill
            log(
                f"  survivors {kill['survivors']}, dumps equal {kill['dumps_equal']}, {kill['after_kill_s']:.2f} s after the kill"
            )
        load_after = os.getloadavg()
        workdir = cluster.workdir
    elapsed = time.time() - started
    valid = [c for c in cells if not c.shaped_late]
    lines = [
        MARK_START,
        f"Run: `sudo PYTHONPATH=. python bench/relay_bench.py {' '.join(sys.argv[1:])}`".replace(
            " `", "`"
        ),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} on {platform.node()} "
        f"({os.cpu_count()} cores), {elapsed / 60:.1f} min; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; host CPU busy {idle_busy * 100:.0f} % before the run.",
        f"S = {nbytes / 1e6:.0f} MB, c = {args.bucket / 2**20:g} MiB, B = {rate / 1e6:.1f} MB/s "
        f"(tc {args.rate * 8 / 1e6:.0f} Mbit/s each way, "
        f"{'one FIFO (tbf)' if args.fifo else 'shared fairly between peers (htb)'}; B is the "
        "raw mooncake read over one shaped link), "
        f"S/B = {nbytes / rate:.2f} s, relay fanout {args.fanout}, {args.rounds} rounds"
        + ("" if supported else "; this checkout has no relay: direct reads only"),
        "",
        *table(valid, nbytes, args.bucket, rate, nodes),
        "",
        "Per round:",
        "",
        *per_round(cells),
        "",
        *scenario_lines(extras, nbytes / rate),
        MARK_END,
    ]
    text = "\n".join(lines)
    (workdir / "cells.json").write_text(
        json.dumps({"cells": [c.__dict__ for c in cells], "extras": extras}, indent=1, default=str)
    )
    log(f"raw figures and status: {workdir}/cells.json")
    print(text)
    if not args.no_write:
        write_results(text)


def _commands() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("hog-sink", "hog-send"):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command", required=True)
        sub.add_parser("hog-sink").add_argument("--host", required=True)
        sub.add_parser("hog-send").add_argument("--to", required=True)
        args = parser.parse_args()
        hog_sink(args.host) if args.command == "hog-sink" else hog_send(args.to)
        return
    main()


if __name__ == "__main__":
    _commands()
