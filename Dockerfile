# Multi-stage build of the cachevol binary (CLI, CSI node plugin and controller in one).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY build.rs ./
COPY proto ./proto
RUN cargo build --release --locked && strip target/release/cachevol

FROM debian:bookworm-slim
# util-linux: mount/umount for the node plugin; ca-certificates: TLS to object stores.
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cachevol /usr/local/bin/cachevol
ENTRYPOINT ["/usr/local/bin/cachevol"]
