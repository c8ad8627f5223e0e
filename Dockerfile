# syntax=docker/dockerfile:1
# SyncFlow: `syncflow` binary (crate `pipeline`).
#   docker build -t syncflow:local .
#   docker run --rm syncflow:local --help

FROM rust:1-bookworm AS builder
# rdkafka builds its bundled librdkafka from source: C toolchain, cmake, zlib.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release -p pipeline --bin syncflow \
 && install -D -m 0755 target/release/syncflow /out/syncflow

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/syncflow syncflow
COPY --from=builder /out/syncflow /usr/local/bin/syncflow
# `syncflow topics apply` reads the topic layout from `topics.yaml` in the working directory.
COPY topics.yaml /var/lib/syncflow/topics.yaml
USER syncflow
WORKDIR /var/lib/syncflow
# A container's loopback is its own: listen on its network interface.
ENV SYNCFLOW_API_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["syncflow"]
CMD ["run"]
