"""The inference side: follow a model, pull and verify versions, swap them in place.

Only `subscribers.vllm` imports vllm; import its modules explicitly where vLLM is installed.
"""

from subscribers.cuda.swap import CudaSwapper
from subscribers.staging import Staging
from subscribers.subscriber import PullConfig, Subscriber
from subscribers.swap import SwapError, Swapper, SwapReport, TorchSwapper, VersionGate

__all__ = [
    "CudaSwapper",
    "PullConfig",
    "Staging",
    "Subscriber",
    "SwapError",
    "SwapReport",
    "Swapper",
    "TorchSwapper",
    "VersionGate",
]
