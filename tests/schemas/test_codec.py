"""The wire codec: every message round-trips, and no bytes make a decoder raise anything else
than `ProtocolError`. Manifest assembly. (The validator: test_validate.py; fuzzing of every
decoder with hostile frames: test_fuzz.py.)"""

from __future__ import annotations

import contextlib
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import given, strategies as st

from schemas import codec
from schemas.codec import MAX_MESSAGE_BYTES
from schemas.manifest import (
    BucketSpec,
    CudaIpcLocator,
    DType,
    FrameLocator,
    Locator,
    Manifest,
    MooncakeLocator,
    RegionSpec,
    Shard,
    ShmLocator,
    TensorSpec,
)
from schemas.messages import (
    AcquireLease,
    AdminDone,
    Alive,
    Announce,
    Announced,
    Applied,
    AppliedReached,
    DeleteModel,
    Error,
    ErrorCode,
    FetchManifest,
    Goodbye,
    Heartbeat,
    Hello,
    LeaseGranted,
    ManifestBody,
    Message,
    Progress,
    Published,
    PublishShard,
    PullFailed,
    RelayOffer,
    RelaySource,
    ReleaseLease,
    Retire,
    RetireVersion,
    Role,
    Route,
    Subscribe,
    Subscribed,
    WaitApplied,
    Welcome,
    Withdraw,
)
from streamer.errors import ProtocolError
from streamer.frames import decode_header

# Leaves, with the constraints the wire types declare (msgspec.Meta is invisible to hypothesis).
INT64 = st.integers(-(2**63), 2**63 - 1)
NON_NEGATIVE = st.integers(0, 2**63 - 1)
SMALL = st.integers(0, 2**31 - 1)
RANKS = st.integers(0, 4095)
WORLD_SIZES = st.integers(1, 4096)
SECONDS = st.floats(0, 1e9)
RATES = st.floats(0, 1e15)
MODEL_NAMES = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/-",
    min_size=1,
    max_size=200,
)
TENSOR_NAMES = st.text(min_size=1, max_size=40)
ADDRESSES = st.text(max_size=40)
DIGESTS = st.text(alphabet="0123456789abcdef", max_size=128)
DETAILS = st.text(max_size=100)

LOCATOR_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    MooncakeLocator: st.builds(
        MooncakeLocator, session=ADDRESSES, address=NON_NEGATIVE, protocol=st.text(max_size=16)
    ),
    FrameLocator: st.builds(FrameLocator, endpoint=ADDRESSES, key=st.text(max_size=40)),
    ShmLocator: st.builds(
        ShmLocator, host=ADDRESSES, name=st.text(max_size=40), nbytes=NON_NEGATIVE
    ),
    CudaIpcLocator: st.builds(
        CudaIpcLocator,
        host=ADDRESSES,
        device_uuid=st.text(max_size=40),
        device=st.integers(0, 1023),
        handle=st.binary(max_size=64),
        size_bytes=NON_NEGATIVE,
        region_offset=NON_NEGATIVE,
        nbytes=NON_NEGATIVE,
        event_sync_required=st.booleans(),
    ),
}
LOCATORS = st.one_of(*LOCATOR_STRATEGIES.values())
REGIONS = st.builds(
    RegionSpec,
    nbytes=NON_NEGATIVE,
    locators=st.lists(LOCATORS, max_size=4).map(tuple),
    rank=RANKS,
)
TENSORS = st.builds(
    TensorSpec,
    name=TENSOR_NAMES,
    dtype=st.sampled_from(get_args(DType)),
    shape=st.lists(NON_NEGATIVE, max_size=4).map(tuple),
    region=NON_NEGATIVE,
    offset=NON_NEGATIVE,
    nbytes=NON_NEGATIVE,
)
BUCKETS = st.builds(
    BucketSpec, region=NON_NEGATIVE, offset=NON_NEGATIVE, nbytes=NON_NEGATIVE, checksum=DIGESTS
)
SHARDS = st.builds(
    Shard,
    regions=st.lists(REGIONS, max_size=4).map(tuple),
    tensors=st.lists(TENSORS, max_size=4).map(tuple),
    buckets=st.lists(BUCKETS, max_size=4).map(tuple),
    checksum_algorithm=st.text(max_size=32),
)
MANIFESTS = st.builds(
    Manifest,
    model=MODEL_NAMES,
    version=NON_NEGATIVE,
    regions=st.lists(REGIONS, max_size=4).map(tuple),
    tensors=st.lists(TENSORS, max_size=4).map(tuple),
    buckets=st.lists(BUCKETS, max_size=4).map(tuple),
    checksum_algorithm=st.text(max_size=32),
    world_size=WORLD_SIZES,
    published_at=st.floats(0, 1e11),
)

DIGESTS = st.text("0123456789abcdef", min_size=64, max_size=64)
RELAY_SOURCES = st.builds(
    RelaySource, name=st.text(max_size=40), endpoint=ADDRESSES, server_key=st.text(max_size=40)
)

MESSAGES: dict[type, st.SearchStrategy[Any]] = {
    Hello: st.builds(
        Hello,
        peer_id=st.text(max_size=60),
        role=st.sampled_from(get_args(Role)),
        protocol_version=SMALL,
        host=ADDRESSES,
        pid=SMALL,
    ),
    Welcome: st.builds(
        Welcome,
        broker_id=st.text(max_size=60),
        protocol_version=SMALL,
        heartbeat_interval_s=st.floats(0, 3600, exclude_min=True),
    ),
    Error: st.builds(
        Error, code=st.sampled_from(get_args(ErrorCode)), detail=DETAILS, request_id=NON_NEGATIVE
    ),
    Goodbye: st.builds(Goodbye, reason=DETAILS),
    PublishShard: st.builds(
        PublishShard,
        request_id=NON_NEGATIVE,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        rank=RANKS,
        world_size=WORLD_SIZES,
        shard=SHARDS,
        job=st.text(max_size=128),
    ),
    Published: st.builds(
        Published,
        request_id=NON_NEGATIVE,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        complete=st.booleans(),
    ),
    Subscribe: st.builds(
        Subscribe,
        request_id=NON_NEGATIVE,
        model=MODEL_NAMES,
        relay=st.none()
        | st.builds(RelayOffer, endpoint=ADDRESSES, server_key=st.text(max_size=40)),
    ),
    Subscribed: st.builds(
        Subscribed, request_id=NON_NEGATIVE, model=MODEL_NAMES, latest=st.none() | NON_NEGATIVE
    ),
    Announce: st.builds(Announce, manifest=MANIFESTS),
    Announced: st.builds(
        Announced, model=MODEL_NAMES, version=NON_NEGATIVE, digest=DIGESTS, nbytes=NON_NEGATIVE
    ),
    FetchManifest: st.builds(
        FetchManifest,
        request_id=NON_NEGATIVE,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        digest=DIGESTS,
    ),
    ManifestBody: st.builds(
        ManifestBody, request_id=NON_NEGATIVE, digest=DIGESTS, body=st.binary(max_size=64)
    ),
    Route: st.builds(
        Route,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        fanout=st.integers(1, 64),
        parents=st.lists(st.none() | RELAY_SOURCES, max_size=4),
        fallbacks=st.lists(RELAY_SOURCES, max_size=4),
    ),
    AcquireLease: st.builds(
        AcquireLease, request_id=NON_NEGATIVE, model=MODEL_NAMES, version=NON_NEGATIVE
    ),
    LeaseGranted: st.builds(
        LeaseGranted,
        request_id=NON_NEGATIVE,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        ttl_s=SECONDS,
    ),
    ReleaseLease: st.builds(ReleaseLease, model=MODEL_NAMES, version=NON_NEGATIVE),
    Heartbeat: st.builds(Heartbeat, applied=st.dictionaries(MODEL_NAMES, NON_NEGATIVE, max_size=4)),
    Progress: st.builds(
        Progress,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        bytes_done=NON_NEGATIVE,
        bytes_total=NON_NEGATIVE,
        bytes_per_s=RATES,
        sources=st.dictionaries(st.text(max_size=40), NON_NEGATIVE, max_size=4),
    ),
    Applied: st.builds(
        Applied,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        pull_s=SECONDS,
        pause_s=SECONDS,
        bytes_total=NON_NEGATIVE,
        manifest_source=st.one_of(
            st.just(""), st.just("broker"), st.text(max_size=128).map("peer:".__add__)
        ),
    ),
    PullFailed: st.builds(PullFailed, model=MODEL_NAMES, version=NON_NEGATIVE, reason=DETAILS),
    WaitApplied: st.builds(
        WaitApplied,
        request_id=NON_NEGATIVE,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        num_subscribers=st.integers(1, 2**31 - 1),
    ),
    AppliedReached: st.builds(
        AppliedReached,
        request_id=NON_NEGATIVE,
        model=MODEL_NAMES,
        version=NON_NEGATIVE,
        num_subscribers=SMALL,
    ),
    Retire: st.builds(Retire, model=MODEL_NAMES, version=NON_NEGATIVE),
    Withdraw: st.builds(
        Withdraw, model=MODEL_NAMES, version=NON_NEGATIVE, reason=st.text(max_size=100)
    ),
    RetireVersion: st.builds(
        RetireVersion, request_id=NON_NEGATIVE, model=MODEL_NAMES, version=NON_NEGATIVE
    ),
    DeleteModel: st.builds(DeleteModel, request_id=NON_NEGATIVE, model=MODEL_NAMES),
    AdminDone: st.builds(AdminDone, request_id=NON_NEGATIVE, detail=st.text(max_size=100)),
    Alive: st.builds(Alive),
}

WIRE_TAGS: dict[type, str] = {
    Hello: "hello",
    Welcome: "welcome",
    Error: "error",
    Goodbye: "goodbye",
    PublishShard: "publish",
    Published: "published",
    Subscribe: "subscribe",
    Subscribed: "subscribed",
    Announce: "announce",
    Announced: "announced",
    FetchManifest: "fetch_manifest",
    ManifestBody: "manifest_body",
    Route: "route",
    AcquireLease: "lease",
    LeaseGranted: "lease_granted",
    ReleaseLease: "release",
    Heartbeat: "heartbeat",
    Progress: "progress",
    Applied: "applied",
    PullFailed: "pull_failed",
    WaitApplied: "wait_applied",
    AppliedReached: "applied_reached",
    Retire: "retire",
    Withdraw: "withdraw",
    RetireVersion: "admin_retire",
    DeleteModel: "admin_delete",
    AdminDone: "admin_done",
    Alive: "alive",
}


def test_every_message_and_locator_type_has_a_strategy_and_a_pinned_tag() -> None:
    members = set(get_args(Message))
    assert set(MESSAGES) == members
    assert set(WIRE_TAGS) == members
    assert set(LOCATOR_STRATEGIES) == set(get_args(Locator))


@pytest.mark.parametrize("message_type", list(WIRE_TAGS), ids=lambda t: t.__name__)
def test_wire_tag_is_the_stable_string(message_type: type) -> None:
    info = msgspec.inspect.type_info(message_type)
    assert isinstance(info, msgspec.inspect.StructType)
    assert (info.tag_field, info.tag) == ("kind", WIRE_TAGS[message_type])


@pytest.mark.parametrize("message_type", list(MESSAGES), ids=lambda t: t.__name__)
@given(data=st.data())
def test_every_message_round_trips_through_the_codec(
    message_type: type, data: st.DataObject
) -> None:
    message = data.draw(MESSAGES[message_type])
    encoded = codec.encode(message)
    assert codec.decode_message(encoded) == message
    assert decode_header(encoded) == message
    assert decode_header(memoryview(encoded)) == message


def test_an_older_peers_applied_without_a_manifest_source_decodes_as_unknown() -> None:
    """Schema evolution: a field added last, with a default, reads "" from older writers."""
    old = msgspec.msgpack.encode({"kind": "applied", "model": "m", "version": 3, "pull_s": 0.5})
    assert decode_header(old) == Applied(model="m", version=3, pull_s=0.5, manifest_source="")


def test_a_manifest_source_longer_than_its_bound_is_a_protocol_error() -> None:
    long = msgspec.msgpack.encode(
        {"kind": "applied", "model": "m", "version": 3, "manifest_source": "peer:" + "x" * 200}
    )
    with pytest.raises(ProtocolError, match="length"):
        decode_header(long)


@given(MANIFESTS)
def test_manifest_round_trips_through_its_own_decoder(manifest: Manifest) -> None:
    assert codec.decode_manifest(codec.encode(manifest)) == manifest


@given(st.binary())
def test_decode_header_raises_only_protocol_error_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_header(data)


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    sorted(
        {
            field.name
            for struct in [*MESSAGES, Manifest, Shard, RegionSpec, TensorSpec]
            for field in msgspec.structs.fields(struct)
        }
    )
)


@given(
    kind=st.sampled_from([*WIRE_TAGS.values(), "nonsense"]),
    fields=st.dictionaries(FIELD_NAMES, MSGPACK_VALUES, max_size=6),
)
def test_decode_header_raises_only_protocol_error_on_wrongly_typed_fields(
    kind: str, fields: dict[str, Any]
) -> None:
    """Well-formed msgpack with a real tag but fields of any type: decoded, or ProtocolError."""
    data = msgspec.msgpack.encode({"kind": kind, **fields})
    try:
        message = decode_header(data)
    except ProtocolError:
        return
    assert isinstance(message, get_args(Message))


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (msgspec.msgpack.encode({"kind": "telepathy"}), "undecodable"),
        (msgspec.msgpack.encode({"kind": "subscribe", "request_id": -1, "model": "m"}), ">= 0"),
        (msgspec.msgpack.encode({"kind": "subscribe", "request_id": 1, "model": "a b"}), "regex"),
        (
            msgspec.msgpack.encode({"kind": "subscribe", "request_id": 1}),
            "missing required field `model`",
        ),
        (b"", "undecodable"),
    ],
    ids=["unknown-tag", "negative-request-id", "bad-model-name", "missing-field", "empty"],
)
def test_decode_header_names_the_problem(data: bytes, detail: str) -> None:
    with pytest.raises(ProtocolError, match=detail) as raised:
        decode_header(data)
    assert isinstance(raised.value.__cause__, msgspec.DecodeError)


def test_decode_header_refuses_an_oversized_frame_unread() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(bytes(MAX_MESSAGE_BYTES + 1))


# Manifest.assemble


def _locator(key: str) -> tuple[FrameLocator, ...]:
    return (FrameLocator(endpoint="tcp://127.0.0.1:1", key=key),)


def _shard(rank: int, names: list[str], *, regions: int = 1, algorithm: str = "wmix128") -> Shard:
    """`regions` regions of 1024 bytes; tensor i in region i % regions; one bucket per region."""
    return Shard(
        regions=tuple(
            RegionSpec(nbytes=1024, locators=_locator(f"{rank}-{r}"), rank=rank)
            for r in range(regions)
        ),
        tensors=tuple(
            TensorSpec(
                name=name, dtype="float32", shape=(4,), region=i % regions, offset=256, nbytes=16
            )
            for i, name in enumerate(names)
        ),
        buckets=tuple(
            BucketSpec(region=r, offset=0, nbytes=1024, checksum=f"{rank:016x}{r:016x}")
            for r in range(regions)
        ),
        checksum_algorithm=algorithm,
    )


def test_assemble_shifts_region_indices_past_earlier_ranks() -> None:
    rank0 = _shard(0, ["a", "b"], regions=2)
    rank1 = _shard(1, ["c", "d"], regions=2)

    manifest = Manifest.assemble("org/model", 7, [rank0, rank1], published_at=12.5)

    assert (manifest.model, manifest.version, manifest.world_size) == ("org/model", 7, 2)
    assert manifest.published_at == 12.5
    assert manifest.regions == rank0.regions + rank1.regions
    assert [(t.name, t.region) for t in manifest.tensors] == [
        ("a", 0),
        ("b", 1),
        ("c", 2),
        ("d", 3),
    ]
    assert [(b.region, b.checksum[15] + b.checksum[-1]) for b in manifest.buckets] == [
        (0, "00"),
        (1, "01"),
        (2, "10"),
        (3, "11"),
    ]
    # Every tensor still points at the region of the rank that published it.
    for tensor in manifest.tensors:
        owner = manifest.regions[tensor.region]
        assert owner.rank == (0 if tensor.name in "ab" else 1)
    assert manifest.total_bytes == 4 * 1024
    assert manifest.payload_bytes == 4 * 16


def test_assemble_refuses_a_tensor_published_by_two_ranks() -> None:
    with pytest.raises(ValueError, match="'shared'"):
        Manifest.assemble("m", 1, [_shard(0, ["a", "shared"]), _shard(1, ["shared"])])


def test_assemble_refuses_shards_with_different_checksum_algorithms() -> None:
    with pytest.raises(ValueError, match="checksum algorithm"):
        Manifest.assemble("m", 1, [_shard(0, ["a"]), _shard(1, ["b"], algorithm="crc32")])


def test_assemble_keeps_the_shards_checksum_algorithm() -> None:
    manifest = Manifest.assemble("m", 1, [_shard(0, ["a"], algorithm="crc32")])
    assert manifest.checksum_algorithm == "crc32"
