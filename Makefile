# The two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
export MC_LOG_LEVEL ?= ERROR

.PHONY: setup setup-vllm demo test test-vllm test-faults test-wheel check fmt test-fast bench bench-netns clean

setup:
	@scripts/setup.sh

setup-vllm:
	@scripts/setup.sh vllm

demo: setup
	$(VENV)/weightstream demo

check: setup
	$(VENV)/ruff format --check .
	$(VENV)/ruff check .
	$(VENV)/mypy .
	$(VENV)/lint-imports

fmt: setup
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

# The whole gate, then every test (the vLLM tests run in their own venv).
test: setup-vllm check
	$(VENV)/pytest -q -m "not gpu and not rdma"
	$(MAKE) --no-print-directory test-vllm
	$(MAKE) --no-print-directory test-wheel

# What `pip install` gives a new user: a wheel of this tree in a fresh venv; the base install
# is a torch-free broker; with the torch and mooncake extras `weightstream demo` runs (~1 min).
test-wheel: setup
	scripts/test_wheel.sh

# vLLM on CPU, in .venv-vllm: offline (TP=2, multiprocess) and server mode, a refused version.
test-vllm: setup-vllm
	.venv-vllm/bin/python -m pytest -q tests/vllm

# The standing fault suite alone (also part of `make test`): real processes under injected
# faults and hostile input; it ends with its summary line ("fault suite: N faults injected, ...").
test-faults: setup
	$(VENV)/pytest -q -m "not gpu and not rdma" tests/faults

test-fast: setup
	$(VENV)/pytest -q -m "not gpu and not rdma and not slow and not vllm and not netns"

bench: setup
	$(VENV)/python bench/cpu_bench.py

clean:
	rm -rf .venv .venv-vllm .mypy_cache .ruff_cache .pytest_cache
