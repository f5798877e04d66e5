"""GPU code that publishers and subscribers both need: the digest's torch/Triton twin, host
memory registration (cudaHostRegister) and CUDA IPC handles.

Imports flow publishers|subscribers -> gpu -> streamer -> schemas; gpu may import torch (and
triton, lazily) but never vllm, and it imports neither publishers nor subscribers.
"""

__all__: list[str] = []
