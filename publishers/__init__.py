"""The trainer side: pack tensors, publish versions, serve their bytes until retired."""

from publishers.publisher import Publisher, PublishResult, SyncPublisher, open_publisher
from publishers.sources import load_checkpoint, synthetic_llama

__all__ = [
    "PublishResult",
    "Publisher",
    "SyncPublisher",
    "load_checkpoint",
    "open_publisher",
    "synthetic_llama",
]
