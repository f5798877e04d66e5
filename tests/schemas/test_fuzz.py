"""Every decoder of peer bytes is total: hostile frames raise its one typed error, nothing else.

10^4 generated frames per decoder (1000 examples of 10 frames): arbitrary bytes, valid frames with bytes flipped or cut,
frames nested up to thousands deep (a ~1 KB frame nested 1000 deep used to raise
`RecursionError`, which killed the broker, a trainer's bulk thread and the client), and valid
frames with one field made huge (strings, byte strings, arrays, integers past 64 bits).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from schemas.codec import decode_manifest, encode
from schemas.frames import FrameRead, FrameReply, decode_frame_read, decode_frame_reply
from schemas.ipc import CudaIpcBuffer, StagingShare, decode_staging_share
from schemas.manifest import BucketSpec, FrameLocator, Manifest, RegionSpec, Shard, TensorSpec
from schemas.messages import Announce, Heartbeat, Hello, PublishShard, Subscribe
from streamer.errors import ProtocolError
from streamer.frames import decode_header

FRAMES_PER_DECODER = 10_000
FRAMES_PER_EXAMPLE = 10
"""Hypothesis draws the kind of frame and a seed; each example decodes ten frames of it."""

_REGION = RegionSpec(nbytes=512, locators=(FrameLocator(endpoint="tcp://h:1", key="k"),))
_TENSOR = TensorSpec(name="w", dtype="float32", shape=(4,), region=0, offset=0, nbytes=16)
_BUCKET = BucketSpec(region=0, offset=0, nbytes=512, checksum="0" * 32)
_MANIFEST = Manifest(
    model="m", version=1, regions=(_REGION,), tensors=(_TENSOR,), buckets=(_BUCKET,)
)
_SHARD = Shard(regions=(_REGION,), tensors=(_TENSOR,), buckets=(_BUCKET,))

# decoder, the one error it may raise, valid values of its type
DECODERS: dict[str, tuple[Callable[[bytes], Any], type[Exception], list[Any]]] = {
    "decode_header": (
        decode_header,
        ProtocolError,
        [
            Hello(peer_id="p", role="subscriber"),
            Subscribe(request_id=1, model="m"),
            Heartbeat(applied={"m": 3}),
            PublishShard(request_id=1, model="m", version=1, rank=0, world_size=1, shard=_SHARD),
            Announce(manifest=_MANIFEST),
        ],
    ),
    "decode_manifest": (decode_manifest, msgspec.DecodeError, [_MANIFEST]),
    "decode_frame_read": (
        decode_frame_read,
        msgspec.DecodeError,
        [FrameRead(request_id=1, key="k", offset=0, nbytes=16)],
    ),
    "decode_frame_reply": (
        decode_frame_reply,
        msgspec.DecodeError,
        [FrameReply(request_id=1, ok=False, detail="no")],
    ),
    "decode_staging_share": (
        decode_staging_share,
        msgspec.DecodeError,
        [
            StagingShare(
                rank=0,
                world_size=2,
                buffer=CudaIpcBuffer(device=0, handle=b"h" * 64, size_bytes=512),
                events=(b"e" * 64,),
            )
        ],
    ),
}

NESTING = [b"\x91", b"\xdc\x00\x01", b"\x81\xa1k", b"\x81\x00", b"\xde\x00\x01\xa1k"]
"""One-element arrays and one-entry maps (fix and 16-bit forms): one level each."""
HUGE: list[Callable[[int], Any]] = [
    lambda n: "x" * n,
    lambda n: b"x" * n,
    lambda n: [0] * n,
    lambda n: dict.fromkeys(map(str, range(min(n, 50_000))), 0),
    lambda n: 2**64 - 1,
    lambda n: -(2**63),
]


def _fields(value: Any) -> dict[str, Any]:
    fields = msgspec.to_builtins(value, builtin_types=(bytes,))
    assert isinstance(fields, dict)
    return fields


def hostile_frame(rng: random.Random, kind: int, valid: list[Any]) -> bytes:
    value = rng.choice(valid)
    good = encode(value)
    if kind == 0:
        return rng.randbytes(rng.randrange(512))
    if kind == 1:  # a valid frame with bytes flipped, cut or appended
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data[: rng.randint(0, len(data))]) + rng.randbytes(rng.randrange(8))
    if kind in (2, 3):  # nested deep: at the top, or as an unknown field of a valid frame
        depth = rng.choice([10, 200, 999, 1000, 1001, 3000, 20_000])
        nest = rng.choice(NESTING) * depth + b"\xc0"
        if kind == 2:
            return nest
        head = encode({**_fields(value), "zz": None})
        return head[:-1] + nest  # `zz` is the last key, None its last byte
    # a valid frame with one field replaced by something huge
    fields = _fields(value)
    fields[rng.choice(sorted(fields))] = rng.choice(HUGE)(rng.choice([300, 5_000, 20_000]))
    return encode(fields)


@st.composite
def hostile_batches(draw: st.DrawFn, valid: list[Any]) -> list[bytes]:
    """`FRAMES_PER_EXAMPLE` frames of one kind (hypothesis picks the kind and the seed)."""
    kind = draw(st.integers(0, 4))
    rng = draw(st.randoms(use_true_random=False))
    return [hostile_frame(rng, kind, valid) for _ in range(FRAMES_PER_EXAMPLE)]


@pytest.mark.parametrize("name", list(DECODERS))
def test_a_decoder_raises_only_its_typed_error_on_hostile_frames(name: str) -> None:
    decode, error, valid = DECODERS[name]
    for value in valid:  # the strategy starts from frames that do decode
        assert decode(encode(value)) == value

    @settings(
        max_examples=FRAMES_PER_DECODER // FRAMES_PER_EXAMPLE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile_batches(valid))
    def fuzz(frames: list[bytes]) -> None:
        for data in frames:
            with contextlib.suppress(error):
                decode(data)

    fuzz()


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("depth", [1000, 3000])
def test_a_deeply_nested_frame_is_the_typed_error(name: str, depth: int) -> None:
    decode, error, valid = DECODERS[name]
    fields = _fields(valid[0])
    head = encode({**fields, "zz": None})[:-1]
    with pytest.raises(error, match="Expected `object`, got `array`"):
        decode(b"\x91" * depth + b"\xc0")
    with pytest.raises(error, match="nested too deeply") as raised:
        decode(head + b"\x91" * depth + b"\xc0")
    assert isinstance(raised.value.__cause__, (RecursionError, msgspec.DecodeError))
