# One image for every role: broker, trainer (publish) and subscriber.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libibverbs1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY streamer streamer
COPY gpu gpu
COPY publishers publishers
COPY subscribers subscribers
COPY weightstream weightstream
# torch pinned to the CPU build in the same command, so nothing pulls a CUDA build.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" ".[mooncake]"
ENV MC_LOG_LEVEL=ERROR
ENTRYPOINT ["weightstream"]
