"""The GPU side of a subscriber: stage a version on the device and verify it there
(`stage`), swap it in with device-to-device copies (`swap`), share one node's fetch between
its GPUs' processes over CUDA IPC (`node_share`), and pin host staging (`host_pins`).

Code that publishers need too (the digest's torch twin, host registration, IPC handles)
lives in the top-level `gpu` package, which both sides import.
"""

__all__: list[str] = []
