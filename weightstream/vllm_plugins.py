"""vLLM's entry points into weightstream (`pyproject.toml`: `vllm.general_plugins` and
`vllm.endpoint_plugins`, both named `weightstream`).

Each first checks that our top-level package names are ours (`weightstream.names`): an
unrelated PyPI package named `schemas` or `streamer` would otherwise break the import deep
inside vLLM's plugin loader, far from the cause. Then it hands over to the vLLM adapter in
`subscribers` (the only code that imports vllm), imported only when vLLM asks.
"""

from __future__ import annotations

from weightstream.names import check_top_level_names

__all__ = ["register_backend"]  # and WeightstreamEndpoint, through __getattr__


def register_backend() -> None:
    """The general plugin: vLLM calls it in every process it starts."""
    check_top_level_names()
    from subscribers.vllm_swap import register_backend as register

    register()


def __getattr__(name: str) -> object:
    """`WeightstreamEndpoint`, the endpoint plugin, resolved when vLLM loads the entry point."""
    if name == "WeightstreamEndpoint":
        check_top_level_names()
        from subscribers.vllm_server import WeightstreamEndpoint

        return WeightstreamEndpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
