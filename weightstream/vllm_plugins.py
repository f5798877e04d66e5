"""vLLM's entry points into weightstream (`pyproject.toml`: `vllm.general_plugins` and
`vllm.endpoint_plugins`, both named `weightstream`).

Each first checks that our top-level package names are ours (`weightstream.names`): an
unrelated PyPI package named `schemas` or `streamer` would otherwise break the import deep
inside vLLM's plugin loader, far from the cause. Then it hands over to the vLLM adapter in
`subscribers` (the only code that imports vllm), imported only when vLLM asks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import TYPE_CHECKING

from weightstream.names import check_top_level_names

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["register_backend"]  # and WeightstreamEndpoint, through __getattr__

logger = logging.getLogger(__name__)

PLUGIN = "weightstream"
"""The name of both entry points, as VLLM_PLUGINS names them."""


def register_backend() -> None:
    """The general plugin: vLLM calls it in every process it starts."""
    check_top_level_names()
    if multiprocessing.parent_process() is None:  # once, in the process the user started
        _check_endpoint_named(os.environ)
    from subscribers.vllm.swap import register_backend as register

    register()


def __getattr__(name: str) -> object:
    """`WeightstreamEndpoint`, the endpoint plugin, resolved when vLLM loads the entry point."""
    if name == "WeightstreamEndpoint":
        check_top_level_names()
        from subscribers.vllm.server import WeightstreamEndpoint

        return WeightstreamEndpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_endpoint_named(environ: Mapping[str, str]) -> None:
    """Say so when WEIGHTSTREAM_* asks a server to follow but its endpoint plugin will not load.

    vLLM loads general plugins unless VLLM_PLUGINS leaves them out, but endpoint plugins only
    when VLLM_PLUGINS names them: without it the backend is there and nothing follows, silently.
    """
    if not environ.get("WEIGHTSTREAM_MODEL"):
        return
    if PLUGIN not in environ.get("VLLM_PLUGINS", "").split(","):  # as vLLM splits it
        logger.warning(
            "WEIGHTSTREAM_MODEL is set but VLLM_PLUGINS does not name %r: a vLLM server will "
            "not follow the model; start it with VLLM_PLUGINS=%s (an offline "
            "WeightStream.follow needs nothing)",
            PLUGIN,
            PLUGIN,
        )
