# Two images from one file, both non-root:
#   --target broker   the broker and `weightstream status`: no torch, a small image
#   --target node     trainers and subscribers: torch (CPU build, pinned) and mooncake
# The base image is pinned to a patch release; pin it by digest (python:3.11.7-slim-bookworm@sha256:...)
# where builds must be reproducible.
FROM python:3.11.7-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY schemas schemas
COPY streamer streamer
COPY gpu gpu
COPY publishers publishers
COPY subscribers subscribers
COPY weightstream weightstream
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11.7-slim-bookworm AS broker
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir /dist/weightstream-*.whl && rm -rf /dist \
    && useradd --create-home --uid 10001 weightstream && mkdir /state && chown weightstream /state
USER weightstream
ENTRYPOINT ["weightstream"]
CMD ["broker", "--endpoint", "tcp://0.0.0.0:5555", "--http-host", "0.0.0.0", "--state-dir", "/state"]

FROM python:3.11.7-slim-bookworm AS node
# mooncake needs libibverbs1 even for TCP.
RUN apt-get update && apt-get install -y --no-install-recommends libibverbs1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /dist /dist
# torch pinned to the CPU build in the same command, so nothing pulls a CUDA build.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==2.13.0" "$(ls /dist/weightstream-*.whl)[torch,mooncake]" && rm -rf /dist \
    && useradd --create-home --uid 10001 weightstream
USER weightstream
ENV MC_LOG_LEVEL=ERROR
ENTRYPOINT ["weightstream"]
