# syntax=docker/dockerfile:1
# The cachevol image: one binary (CLI, CSI node plugin and controller) on a runtime base of
# glibc, libgcc and CA certificates. Two ways to build it:
#
# - With a registry and BuildKit, the conventional multi-stage build, compiling in BUILD_IMAGE
#   for each platform:
#     docker buildx build --platform linux/amd64,linux/arm64 \
#       --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) -t IMAGE .
#   The cargo registry and the target dir are BuildKit cache mounts (one per platform), so a
#   change to src/ rebuilds cachevol alone. For a release, pin both bases by digest:
#     --build-arg BUILD_IMAGE=rust:1-bookworm@sha256:… \
#     --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12@sha256:…
#
# - Without a daemon or a registry (`make image`, hack/image.sh): BINARY=prebuilt copies the
#   stripped binary that the script built on this machine, and RUNTIME_IMAGE names a base it
#   assembled from Debian's packages (hack/image-base.sh). buildah builds this file with a
#   fixed timestamp, so two builds of one commit give the same layer digests.
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12
# build: compile in BUILD_IMAGE. prebuilt: take PREBUILT from the build context.
ARG BINARY=build

FROM ${BUILD_IMAGE} AS build
ARG TARGETPLATFORM
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
RUN --mount=type=cache,id=cargo-registry-${TARGETPLATFORM},target=/usr/local/cargo/registry \
    --mount=type=cache,id=cargo-target-${TARGETPLATFORM},target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 -s target/release/cachevol /out/cachevol

# The binary built outside (make image): stripped already, its debug info kept beside it there.
FROM scratch AS prebuilt
ARG PREBUILT=target/image/cachevol
COPY ${PREBUILT} /out/cachevol

FROM ${BINARY} AS binary

# distroless/cc: glibc, libgcc and CA certificates, nothing else. The binary mounts through
# system calls (no mount(8)), speaks TLS with rustls, and needs no shell.
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
# RFC 3339; make image gives the commit's time, so the image's config does not change from one
# build to the next.
ARG CREATED=1970-01-01T00:00:00Z
ARG SOURCE=https://github.com/cachevol/cachevol
LABEL org.opencontainers.image.title="cachevol" \
      org.opencontainers.image.description="Persistent, incremental, deduplicated cache volumes for ephemeral CI pods on Kubernetes (CSI driver and CLI)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}"
COPY --from=binary /out/cachevol /usr/local/bin/cachevol
# glibc's malloc raises its mmap threshold after the first large buffer is freed, and then
# keeps every later one: a node plugin that wrote two caches' bases held 130 MiB after 145 MiB
# at peak. A fixed threshold gives the restore buffers (pack windows, write batches) back to
# the system: 103 MiB at peak, 39 MiB after, at the same speed.
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=262144:glibc.malloc.trim_threshold=262144
# The default user is root: the node plugin mounts (its DaemonSet runs it privileged). The
# controller needs no root, and the chart runs it as 65532 (distroless' nonroot).
ENTRYPOINT ["/usr/local/bin/cachevol"]
