"""The vLLM adapter: the only modules of ours that import vllm. `swap` applies a version
inside a running engine (its weight-transfer API or a worker extension), `follow` keeps an
offline `LLM` current, `server` does it for the OpenAI server (`VLLM_PLUGINS=weightstream`).

Importing this package imports no vllm; import its modules where vLLM is installed.
"""

__all__: list[str] = []
