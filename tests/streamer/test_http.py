"""The HTTP status endpoint of a running broker: every route, errors, and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq

from schemas.codec import decode_message, encode
from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from schemas.messages import Applied, Hello, Welcome
from streamer.client import connect
from streamer.metrics import (
    ANNOUNCE_TO_APPLIED_SECONDS,
    ANNOUNCED_TOTAL,
    APPLIED_MANIFEST_SOURCES_TOTAL,
    APPLIED_TOTAL,
    CONTENT_TYPE,
    FORBIDDEN_TOTAL,
    INSECURE,
    LATEST_VERSION,
    MANIFEST_FETCH_BYTES_TOTAL,
    MANIFEST_FETCH_REFUSED_TOTAL,
    MANIFEST_FETCHES_TOTAL,
    MANIFEST_PUSHES_TOTAL,
    MANIFEST_SOURCES,
    MESSAGES_TOTAL,
    NODE_LINKS,
    PAUSE_SECONDS,
    PEER_CONNECTIONS,
    PEERS,
    PENDING_MISSING_RANKS,
    PENDING_VERSIONS,
    PROTOCOL_ERRORS_TOTAL,
    PULL_FAILURES_TOTAL,
    PULL_SECONDS,
    RELAY_SERVED_BYTES_TOTAL,
    RELAY_SUBSCRIBERS,
    STATE_WRITE_ERRORS_TOTAL,
    SUBSCRIBER_LAG,
    SUBSCRIBER_VERSION,
    UNREADABLE_VERSIONS,
)
from tests.support import RunningBroker, eventually, test_keys

MODEL = "org/model"


def shard() -> Shard:
    return Shard(
        regions=(RegionSpec(nbytes=512, locators=(FrameLocator(endpoint="tcp://x:1", key="k"),)),),
        tensors=(
            TensorSpec(name="w", dtype="bfloat16", shape=(2, 3), region=0, offset=0, nbytes=12),
            TensorSpec(name="b", dtype="float32", shape=(3,), region=0, offset=256, nbytes=12),
        ),
        buckets=(
            BucketSpec(region=0, offset=0, nbytes=256, checksum="a" * 32),
            BucketSpec(region=0, offset=256, nbytes=256, checksum="b" * 32),
        ),
    )


async def get(broker: RunningBroker, path: str, *, method: str = "GET") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, broker.url + path) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


_PUBLISHERS: list[contextlib.AsyncExitStack] = []


@pytest.fixture(autouse=True)
async def publishers(zmq_ctx) -> AsyncIterator[None]:
    """Publishers stay connected for the whole test: a version whose publisher left is
    unreadable (withdrawn), and these tests look at readable ones."""
    async with contextlib.AsyncExitStack() as stack:
        _PUBLISHERS.append(stack)
        try:
            yield
        finally:
            _PUBLISHERS.remove(stack)


async def publish_versions(
    broker: RunningBroker, zmq_ctx, *versions: int, model: str = MODEL
) -> None:
    publisher = await _PUBLISHERS[-1].enter_async_context(
        connect(broker.client_config(), role="publisher", context=zmq_ctx)
    )
    for version in versions:
        await publisher.publish(model, version, 0, 1, shard())


async def test_healthz_reports_ok_and_uptime(broker: RunningBroker) -> None:
    status, body = await get(broker, "/healthz")
    assert status == 200
    assert body["status"] == "ok"
    assert 0 <= body["uptime_s"] < 60


async def test_models_lists_every_model_with_its_readable_versions(
    broker: RunningBroker, zmq_ctx
) -> None:
    assert await get(broker, "/v1/models") == (200, {"models": []})
    await publish_versions(broker, zmq_ctx, 1, 2, 3)
    await publish_versions(broker, zmq_ctx, 5, model="other")

    status, body = await get(broker, "/v1/models")
    assert status == 200
    by_name = {m["model"]: m for m in body["models"]}
    assert list(by_name) == ["org/model", "other"]
    assert by_name[MODEL]["latest"] == 3
    assert by_name[MODEL]["readable_versions"] == [2, 3]  # retention 2
    assert by_name[MODEL]["latest_bytes"] == 512
    assert by_name[MODEL]["subscribers_at_latest"] == 0
    assert by_name["other"]["latest"] == 5


async def test_a_model_name_with_slashes_has_its_own_page_with_history(
    broker: RunningBroker, zmq_ctx
) -> None:
    await publish_versions(broker, zmq_ctx, 1, 2, 3)
    status, body = await get(broker, "/v1/models/org/model")
    assert status == 200
    assert body["model"] == MODEL
    assert [h["version"] for h in body["history"]] == [1, 2, 3]
    assert all(h["announced_at"] > 0 for h in body["history"])


async def test_a_version_page_summarises_its_manifest(broker: RunningBroker, zmq_ctx) -> None:
    await publish_versions(broker, zmq_ctx, 4)
    status, body = await get(broker, "/v1/models/org/model/versions/4")
    assert status == 200
    assert body["model"] == MODEL
    assert body["version"] == 4
    assert body["retiring"] is False
    assert body["leases"] == 0
    assert (body["world_size"], body["total_bytes"], body["payload_bytes"]) == (1, 512, 24)
    assert (body["num_tensors"], body["num_buckets"], body["num_regions"]) == (2, 2, 1)
    assert body["checksum_algorithm"] == "wmix128"
    assert body["tensors"] == [
        {"name": "w", "dtype": "bfloat16", "shape": [2, 3], "nbytes": 12},
        {"name": "b", "dtype": "float32", "shape": [3], "nbytes": 12},
    ]


async def test_an_unknown_model_is_404_with_a_pointer_to_the_list(broker: RunningBroker) -> None:
    status, body = await get(broker, "/v1/models/nope")
    assert status == 404
    assert body["error"] == "not_found"
    assert "'nope'" in body["detail"]
    assert "/v1/models" in body["detail"]

    status, body = await get(broker, "/v1/models/nope/versions/1")
    assert status == 404
    assert "nope" in body["detail"]


async def test_an_unreadable_version_is_404_naming_the_readable_ones(
    broker: RunningBroker, zmq_ctx
) -> None:
    await publish_versions(broker, zmq_ctx, 1, 2, 3)
    status, body = await get(broker, "/v1/models/org/model/versions/1")
    assert status == 404
    assert body["detail"] == "org/model version 1 is not readable (readable: [2, 3])"


@pytest.mark.parametrize("version", ["latest", "1.5", "0x10", ""])
async def test_a_version_that_is_not_an_integer_is_400(
    broker: RunningBroker, zmq_ctx, version: str
) -> None:
    await publish_versions(broker, zmq_ctx, 1)
    status, body = await get(broker, f"/v1/models/org/model/versions/{version}")
    assert status == 400
    assert body == {"error": "bad_request", "detail": f"version {version!r} is not an integer"}


@pytest.mark.parametrize("path", ["/healthz", "/v1/models", "/v1/subscribers", "/metrics"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_the_endpoint_is_read_only(broker: RunningBroker, path: str, method: str) -> None:
    status, body = await get(broker, path, method=method)
    assert status == 405
    assert body["error"] == "method_not_allowed"
    assert "read-only" in body["detail"]


async def test_an_unknown_route_is_a_json_404(broker: RunningBroker) -> None:
    status, body = await get(broker, "/v2/everything")
    assert status == 404
    assert "/v2/everything" in body["detail"]


async def test_subscribers_shows_progress_errors_and_applied_versions(
    broker: RunningBroker, zmq_ctx
) -> None:
    await publish_versions(broker, zmq_ctx, 1, 2)

    async def row(**expected: Any) -> dict[str, Any] | None:
        """The only subscriber row, once it has the expected values."""
        _, body = await get(broker, "/v1/subscribers")
        [only] = body["subscribers"]
        only_row: dict[str, Any] = only
        return only_row if all(only_row[k] == v for k, v in expected.items()) else None

    started = time.time()
    async with connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client:
        await client.subscribe(MODEL)
        first = await eventually(row)
        assert first["peer_id"] == client.peer_id
        assert (first["state"], first["model"], first["applied_version"]) == ("idle", MODEL, None)
        assert first["latest_version"] == 2

        await client.report_progress(MODEL, 2, 256, 1024, 1e6)
        pulling = await eventually(lambda: row(state="pulling"))
        assert (pulling["pulling_version"], pulling["progress"]) == (2, 0.25)
        assert pulling["bytes_per_s"] == 1e6

        await client.report_failure(MODEL, 2, "TransportError: the publisher is gone")
        failed = await eventually(lambda: row(state="idle"))
        assert failed["last_error"] == "version 2: TransportError: the publisher is gone"

        await client.report_applied(MODEL, 2, pull_s=0.5, pause_s=0.01, nbytes=512)
        applied = await eventually(lambda: row(applied_version=2))
        assert (applied["lag"], applied["last_error"]) == (0, None)
        assert (applied["last_pull_s"], applied["last_pause_s"]) == (0.5, 0.01)
        # An age (not a timestamp) of something this test's client sent (rounded to 1 ms).
        assert 0 <= applied["last_heartbeat_age_s"] <= time.time() - started + 0.001

        _, models = await get(broker, "/v1/models")
        assert models["models"][0]["subscribers_at_latest"] == 1

    gone = await eventually(lambda: row(state="gone"))
    assert gone["applied_version"] == 2


async def test_subscribers_and_metrics_say_where_each_applied_manifest_came_from(
    broker: RunningBroker, zmq_ctx
) -> None:
    """A client that fetched the manifest from the broker reports "broker"; one that says a
    peer gave it is shown with the peer; an older peer's Applied (no source) is unknown."""
    config = msgspec.structs.replace(broker.client_config(), name="engine-0")
    async with (
        contextlib.AsyncExitStack() as stack,
        connect(config, role="subscriber", context=zmq_ctx) as client,
    ):
        relayed = stack.enter_context(contextlib.closing(zmq_ctx.socket(zmq.DEALER)))
        older = stack.enter_context(contextlib.closing(zmq_ctx.socket(zmq.DEALER)))
        await client.subscribe(MODEL)
        await publish_versions(broker, zmq_ctx, 1)
        manifest = await asyncio.wait_for(client.next_manifest(MODEL, after=0), 10)
        assert (manifest.version, client.manifest_fetches) == (1, 1)  # by digest, from the broker
        assert client.manifest_source(MODEL, 1) == "broker"
        await client.report_applied(MODEL, 1, pull_s=0.1, pause_s=0.01, nbytes=256)
        # Raw peers: one whose manifest came from a relay peer, one too old to say.
        for socket, peer_id, source in (
            (relayed, "relayed", "peer:node-3"),
            (older, "older", None),
        ):
            socket.setsockopt(zmq.LINGER, 0)
            test_keys().apply(socket)
            socket.connect(broker.endpoint)
            await socket.send(encode(Hello(peer_id=peer_id, role="subscriber", name=peer_id)))
            assert isinstance(decode_message(await socket.recv()), Welcome)
            applied = (
                Applied(model=MODEL, version=1, manifest_source=source)
                if source is not None
                else Applied(model=MODEL, version=1)
            )
            await socket.send(encode(applied))

        async def sources() -> dict[str, Any] | None:
            _, body = await get(broker, "/v1/subscribers")
            rows = {r["name"]: r["manifest_source"] for r in body["subscribers"]}
            return rows if len(rows) == 3 and rows["older"] is None else None

        shown = await eventually(sources)
        assert shown == {"engine-0": "broker", "relayed": "peer:node-3", "older": None}
        _, text = await get(broker, "/metrics")
    _, samples = parse_prometheus(text)
    counted = {
        source: samples[(APPLIED_MANIFEST_SOURCES_TOTAL, frozenset({("source", source)}))]
        for source in MANIFEST_SOURCES
    }
    assert counted == {"broker": 1, "peer": 1, "unknown": 1}


# /metrics

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>[^ ]+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_prometheus(text: str) -> tuple[dict[str, str], Samples]:
    """A strict reader of the text format (0.0.4): returns ({name: type}, {(name, labels): value})."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert help_text, line
            helps.add(name)
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}, line
            assert name not in types, f"TYPE given twice for {name}"
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = family = match["name"]
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and types.get(name.removesuffix(suffix)) == "histogram":
                    family = name.removesuffix(suffix)
            assert family in types, f"{name} sampled before its TYPE"
            assert family in helps, f"{name} sampled before its HELP"
            labels: list[tuple[str, str]] = []
            if match["labels"]:
                pairs = LABEL.findall(match["labels"])
                rebuilt = ",".join(f'{k}="{v}"' for k, v in pairs)
                assert rebuilt == match["labels"], f"malformed labels: {line!r}"
                labels = [(k, _unescape(v)) for k, v in pairs]
            key = (name, frozenset(labels))
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(match["value"])
    return types, samples


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), value)


async def test_metrics_is_prometheus_text_with_the_expected_names(
    broker: RunningBroker, zmq_ctx
) -> None:
    await publish_versions(broker, zmq_ctx, 1, 2)
    config = msgspec.structs.replace(broker.client_config(), name="node-7/engine-0")
    async with connect(config, role="subscriber", context=zmq_ctx) as client:
        await client.subscribe(MODEL)
        await client.report_applied(MODEL, 1, pull_s=0.1, pause_s=0.01, nbytes=512)
        await client.report_failure(MODEL, 2, "ChecksumMismatch: bucket 0")

        async def scrape() -> tuple[dict[str, str], Samples] | None:
            """A scrape taken once the broker has counted the reported failure."""
            async with (
                aiohttp.ClientSession() as session,
                session.get(broker.url + "/metrics") as response,
            ):
                assert response.status == 200
                assert response.headers["Content-Type"] == CONTENT_TYPE
                assert response.content_type == "text/plain"
                types, samples = parse_prometheus(await response.text())
            return (types, samples) if samples[(PULL_FAILURES_TOTAL, frozenset())] == 1 else None

        types, samples = await eventually(scrape)
        name = "node-7/engine-0"  # stable: no per-connection id in labels

    assert types == {
        MESSAGES_TOTAL: "counter",
        PROTOCOL_ERRORS_TOTAL: "counter",
        ANNOUNCED_TOTAL: "counter",
        APPLIED_TOTAL: "counter",
        APPLIED_MANIFEST_SOURCES_TOTAL: "counter",
        PULL_FAILURES_TOTAL: "counter",
        STATE_WRITE_ERRORS_TOTAL: "counter",
        LATEST_VERSION: "gauge",
        PENDING_VERSIONS: "gauge",
        PENDING_MISSING_RANKS: "gauge",
        UNREADABLE_VERSIONS: "gauge",
        SUBSCRIBER_VERSION: "gauge",
        SUBSCRIBER_LAG: "gauge",
        PEERS: "gauge",
        PULL_SECONDS: "histogram",
        PAUSE_SECONDS: "histogram",
        ANNOUNCE_TO_APPLIED_SECONDS: "histogram",
        FORBIDDEN_TOTAL: "counter",
        INSECURE: "gauge",
        RELAY_SUBSCRIBERS: "gauge",
        RELAY_SERVED_BYTES_TOTAL: "counter",
        MANIFEST_FETCHES_TOTAL: "counter",
        MANIFEST_FETCH_BYTES_TOTAL: "counter",
        MANIFEST_FETCH_REFUSED_TOTAL: "counter",
        MANIFEST_PUSHES_TOTAL: "counter",
        PEER_CONNECTIONS: "gauge",
        NODE_LINKS: "gauge",
    }
    assert all(name.startswith("weightstream_") for name in types)
    assert samples[(ANNOUNCED_TOTAL, frozenset())] == 2
    assert samples[(APPLIED_TOTAL, frozenset())] == 1
    # It applied version 1 without having taken its manifest (it joined at version 2).
    assert samples[(APPLIED_MANIFEST_SOURCES_TOTAL, frozenset({("source", "unknown")}))] == 1
    assert samples[(APPLIED_MANIFEST_SOURCES_TOTAL, frozenset({("source", "broker")}))] == 0
    assert samples[(PROTOCOL_ERRORS_TOTAL, frozenset())] == 0
    assert samples[(MESSAGES_TOTAL, frozenset())] >= 6
    assert samples[(LATEST_VERSION, frozenset({("model", MODEL)}))] == 2
    labels = frozenset({("model", MODEL), ("subscriber", name)})
    assert samples[(SUBSCRIBER_VERSION, labels)] == 1
    assert samples[(SUBSCRIBER_LAG, labels)] == 1
    assert samples[(PEERS, frozenset({("role", "subscriber")}))] == 1
    model = frozenset({("model", MODEL)})
    assert samples[(PENDING_VERSIONS, model)] == 0
    assert samples[(PENDING_MISSING_RANKS, model)] == 0
    assert samples[(UNREADABLE_VERSIONS, model)] == 0
    # One Applied observed: pull 0.1 s, pause 0.01 s, both in their histograms per model.
    assert samples[(PULL_SECONDS + "_count", model)] == 1
    assert samples[(PULL_SECONDS + "_sum", model)] == pytest.approx(0.1)
    assert samples[(PULL_SECONDS + "_bucket", model | {("le", "0.1")})] == 1
    assert samples[(PULL_SECONDS + "_bucket", model | {("le", "0.05")})] == 0
    assert samples[(PAUSE_SECONDS + "_sum", model)] == pytest.approx(0.01)
    assert samples[(ANNOUNCE_TO_APPLIED_SECONDS + "_count", model)] == 1


async def test_metrics_render_large_versions_exactly(broker: RunningBroker, zmq_ctx) -> None:
    # Trainers often use the global step as the version: seven digits and more.
    await publish_versions(broker, zmq_ctx, 12_345_678)
    status, text = await get(broker, "/metrics")
    assert status == 200
    _, samples = parse_prometheus(text)
    assert samples[(LATEST_VERSION, frozenset({("model", MODEL)}))] == 12_345_678


async def test_metrics_escape_label_values(broker: RunningBroker, zmq_ctx) -> None:
    await publish_versions(broker, zmq_ctx, 1)
    odd = 'sub "quoted" back\\slash\nnewline'
    socket = zmq_ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    test_keys().apply(socket)
    socket.connect(broker.endpoint)
    try:
        await socket.send(encode(Hello(peer_id="odd", role="subscriber", name=odd)))
        assert isinstance(decode_message(await socket.recv()), Welcome)
        await socket.send(encode(Applied(model=MODEL, version=1, pull_s=0.1, pause_s=0.01)))

        async def applied() -> bool:
            _, body = await get(broker, "/v1/subscribers")
            return [(r["name"], r["applied_version"]) for r in body["subscribers"]] == [(odd, 1)]

        await eventually(applied)
        status, text = await get(broker, "/metrics")
    finally:
        socket.close()
    assert status == 200
    _, samples = parse_prometheus(text)
    assert samples[(SUBSCRIBER_VERSION, frozenset({("model", MODEL), ("subscriber", odd)}))] == 1


@pytest.mark.parametrize(
    "junk",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/models HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    ],
    ids=["binary", "bad-version", "huge-path", "truncated-body", "negative-length"],
)
async def test_garbage_http_requests_leave_the_endpoint_serving(
    broker: RunningBroker, junk: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.http_port)
    try:
        writer.write(junk)
        await writer.drain()
        if junk.startswith(b"POST"):
            writer.close()  # hang up mid-body
        else:
            async with asyncio.timeout(5):
                answer = await reader.read(200)
            assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n"), answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    status, body = await get(broker, "/healthz")
    assert (status, body["status"]) == (200, "ok")


async def test_a_pending_version_shows_its_missing_ranks_in_the_model_page_and_metrics(
    broker: RunningBroker, zmq_ctx
) -> None:
    publisher = await _PUBLISHERS[-1].enter_async_context(
        connect(broker.client_config(), role="publisher", context=zmq_ctx)
    )
    await publisher.publish(MODEL, 1, 1, 3, shard())  # rank 1 of 3: ranks 0 and 2 missing

    status, body = await get(broker, "/v1/models/org/model")
    assert status == 200
    [pending] = body["pending"]
    assert (pending["version"], pending["ranks_in"], pending["missing_ranks"]) == (1, [1], [0, 2])
    assert (body["unreadable"], body["expired"], body["withdrawn"]) == ([], [], [])
    _, text = await get(broker, "/metrics")
    _, samples = parse_prometheus(text)
    model = frozenset({("model", MODEL)})
    assert samples[(PENDING_VERSIONS, model)] == 1
    assert samples[(PENDING_MISSING_RANKS, model)] == 2


async def test_subscribers_come_in_pages_filtered_by_model_and_state(
    broker: RunningBroker, zmq_ctx
) -> None:
    await publish_versions(broker, zmq_ctx, 1)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(5):
            client = await stack.enter_async_context(
                connect(broker.client_config(), role="subscriber", context=zmq_ctx)
            )
            await client.subscribe(MODEL)
        status, body = await get(broker, "/v1/subscribers?limit=2&offset=1")
        assert status == 200
        assert (body["total"], body["limit"], body["offset"]) == (5, 2, 1)
        _, everyone = await get(broker, "/v1/subscribers")
        ids = [r["peer_id"] for r in everyone["subscribers"]]
        assert [r["peer_id"] for r in body["subscribers"]] == ids[1:3]
        _, other = await get(broker, "/v1/subscribers?model=other")
        assert other["total"] == 0
        _, idle = await get(broker, "/v1/subscribers?state=idle")
        assert idle["total"] == 5
        for bad in ("limit=0", "limit=100000", "offset=-1", "state=asleep", "limit=x"):
            status, body = await get(broker, f"/v1/subscribers?{bad}")
            assert status == 400, bad
            assert body["error"] == "bad_request"


async def test_subscribers_filtered_by_lag_are_those_that_many_versions_behind(
    broker: RunningBroker, zmq_ctx
) -> None:
    await publish_versions(broker, zmq_ctx, 1, 2, 3)
    async with contextlib.AsyncExitStack() as stack:
        for applied in (3, 2, 1, None):
            config = msgspec.structs.replace(broker.client_config(), name=f"at-{applied}")
            client = await stack.enter_async_context(
                connect(config, role="subscriber", context=zmq_ctx)
            )
            await client.subscribe(MODEL)
            if applied is not None:
                await client.report_applied(MODEL, applied, pull_s=0.1, pause_s=0.0, nbytes=1)

        async def reported() -> bool:
            _, body = await get(broker, "/v1/subscribers?min_lag=0")
            return sum(r["applied_version"] is not None for r in body["subscribers"]) == 3

        await eventually(reported)
        # Never applied counts as behind any lag.
        expected: dict[int, set[int | None]] = {
            0: {3, 2, 1, None},
            1: {2, 1, None},
            2: {1, None},
            3: {None},
            99: {None},
        }
        for min_lag, versions in expected.items():
            status, body = await get(broker, f"/v1/subscribers?min_lag={min_lag}")
            assert status == 200
            rows = body["subscribers"]
            assert body["total"] == len(versions), (min_lag, rows)
            assert {r["applied_version"] for r in rows} == versions
            assert {r["name"] for r in rows} == {f"at-{v}" for v in versions}
            assert all(r["lag"] is None or r["lag"] >= min_lag for r in rows)
        _, other = await get(broker, "/v1/subscribers?min_lag=0&model=other")
        assert other["total"] == 0
        for bad in ("min_lag=-1", "min_lag=x", "min_lag="):
            status, body = await get(broker, f"/v1/subscribers?{bad}")
            assert status == 400, bad
            assert "min_lag" in body["detail"]
