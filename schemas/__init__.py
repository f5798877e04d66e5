"""Wire types of weightstream: control messages and manifests (msgspec and stdlib only)."""

from schemas.codec import decode_manifest, decode_message, encode
from schemas.manifest import (
    ALIGNMENT,
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
from schemas.messages import PROTOCOL_VERSION, Message
from schemas.validate import InvalidManifest, ManifestLimits, validate_manifest, validate_shard

__all__ = [
    "ALIGNMENT",
    "PROTOCOL_VERSION",
    "BucketSpec",
    "CudaIpcLocator",
    "DType",
    "FrameLocator",
    "InvalidManifest",
    "Locator",
    "Manifest",
    "ManifestLimits",
    "Message",
    "MooncakeLocator",
    "RegionSpec",
    "Shard",
    "ShmLocator",
    "TensorSpec",
    "decode_manifest",
    "decode_message",
    "encode",
    "validate_manifest",
    "validate_shard",
]
