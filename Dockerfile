# syntax=docker/dockerfile:1
#
# amqp-sidecar container image.
#   docker build -t amqp-sidecar .
#   docker run --rm -e AMQP_SIDECAR_AMQP__URL=... -e AMQP_SIDECAR_AMQP__QUEUE=orders \
#     -e AMQP_SIDECAR_BACKENDS=http://worker:8080/ -p 9090:9090 amqp-sidecar
#
# Stage 1 builds the release binary with the locked dependency set; the cache
# mounts (BuildKit) keep the cargo registry and target/ between builds.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=amqp-sidecar-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=amqp-sidecar-target,target=/src/target \
    cargo build --release --locked --bin amqp-sidecar \
 && install -D -m 0755 target/release/amqp-sidecar /out/amqp-sidecar

# Stage 2: distroless runtime (glibc, libgcc, CA certificates; no shell, no
# package manager). TLS is rustls, so no OpenSSL is needed at run time.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="amqp-sidecar" \
      org.opencontainers.image.description="RabbitMQ consumer-side sidecar: consumes one queue with manual acks and forwards each delivery over HTTP to local workers" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/amqp-sidecar /usr/local/bin/amqp-sidecar
# Numeric UID/GID (distroless "nonroot" = 65532) so Kubernetes can verify
# runAsNonRoot without looking the name up.
USER 65532:65532
# Admin server: /metrics, /healthz, /readyz.
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/amqp-sidecar"]
CMD ["run"]
