"""Wire types of weightstream: control messages and manifests (msgspec and stdlib only)."""

from schemas.codec import decode_manifest, decode_message, encode
from schemas.manifest import (
    ALIGNMENT,
    BucketSpec,
    DType,
    FrameLocator,
    Locator,
    Manifest,
    MooncakeLocator,
    RegionSpec,
    Shard,
    ShmLocator,
    TensorSpec,
    validate_shard,
)
from schemas.messages import PROTOCOL_VERSION, Message

__all__ = [
    "ALIGNMENT",
    "PROTOCOL_VERSION",
    "BucketSpec",
    "DType",
    "FrameLocator",
    "Locator",
    "Manifest",
    "Message",
    "MooncakeLocator",
    "RegionSpec",
    "Shard",
    "ShmLocator",
    "TensorSpec",
    "decode_manifest",
    "decode_message",
    "encode",
    "validate_shard",
]
