# syntax=docker/dockerfile:1
# keyroll: both binaries (`keyroll`, `keyroll-sidecar`) in one small runtime image.
#
#   docker build -t keyroll .
#   docker run --rm keyroll --help                      # the rotator (default entrypoint)
#   docker run --rm --entrypoint keyroll-sidecar keyroll --help
#
# Build stage: the Rust toolchain, with BuildKit cache mounts for the registry and target dir
# (a rebuild after a source change recompiles keyroll only). rustls uses the `ring` provider,
# so no cmake/aws-lc toolchain is needed.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && install -D -m 0755 target/release/keyroll target/release/keyroll-sidecar -t /out/

# Runtime stage: Debian slim with CA certificates (the TLS verifier reads the system roots) and
# an unprivileged user. uid/gid 10001 is fixed so volumes, Kubernetes securityContext and a
# mailer that must receive the sidecar's reload signal can all agree on it.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 keyroll \
    && useradd --system --uid 10001 --gid keyroll --home-dir /var/lib/keyroll \
       --shell /usr/sbin/nologin keyroll \
    && install -d -o keyroll -g keyroll -m 0750 /var/lib/keyroll /var/lib/keyroll/dkim
COPY --from=build /out/keyroll /out/keyroll-sidecar /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/keyroll
ENTRYPOINT ["keyroll"]
CMD ["--help"]
