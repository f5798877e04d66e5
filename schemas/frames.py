"""Headers of the ZeroMQ fallback bulk transport; the payload rides as a raw frame after them."""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["FrameRead", "FrameReply"]

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class FrameRead(msgspec.Struct, frozen=True, tag="read"):
    request_id: NonNegative
    key: str
    offset: NonNegative
    nbytes: NonNegative


class FrameReply(msgspec.Struct, frozen=True, tag="reply"):
    request_id: NonNegative
    ok: bool
    detail: str = ""
