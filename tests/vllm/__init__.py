"""vLLM on CPU test helpers: a tiny offline Llama checkpoint."""
