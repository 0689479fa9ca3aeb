# syntax=docker/dockerfile:1.7
#
# One image with every optout-sync binary: optout-fetcher, optout-rule-evaluator,
# optout-salesforce-writer, optoutctl and optout-sandbox. docker-compose.yml and deploy/ pick the
# binary with `command:`.
#
#   docker build -t optout-sync:dev .
#
# Stages: chef (toolchain + cargo-chef) -> planner (recipe.json: the dependency graph only)
# -> builder (dependencies compiled in their own layer, re-used while Cargo.toml/Cargo.lock stay
# the same; then the workspace) -> runtime (debian slim, CA roots, non-root user).

# Keep the Rust minor in step with rust-toolchain.toml (scripts/validate-deploy checks it).
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
RUN cargo install --locked cargo-chef --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ENV CARGO_TERM_COLOR=never
COPY --from=planner /src/recipe.json recipe.json
# The dependency layer: only recipe.json goes in, so this layer is cached until a manifest or
# the lock file changes. The registry cache mount spares re-downloading crates either way.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked \
      --bin optout-fetcher \
      --bin optout-rule-evaluator \
      --bin optout-salesforce-writer \
      --bin optoutctl \
      --bin optout-sandbox \
 && mkdir -p /out \
 && cp target/release/optout-fetcher target/release/optout-rule-evaluator \
       target/release/optout-salesforce-writer target/release/optoutctl \
       target/release/optout-sandbox /out/

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: rustls verifies Mailchimp's and Salesforce's certificates against the system
# roots. Nothing else is installed: no shell tools are needed at run time.
# /var/lib/optout holds the sandbox's state (its CA) in docker-compose: a named volume mounted
# there takes the directory's owner, so the non-root user can write to it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 optout \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin optout \
 && install -d -o 10001 -g 10001 -m 0755 /var/lib/optout
COPY --from=builder /out/ /usr/local/bin/
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Every service listens for gRPC (health, reflection, Admin) on this address inside a container;
# each container has its own network namespace, so one port fits all.
ENV OPTOUT_GRPC_LISTEN=0.0.0.0:50051
EXPOSE 50051
# grpc.health.v1 Check against the service in this container: exits 0 only when SERVING.
# Containers that run no gRPC server (optout-sandbox, optoutctl jobs) override or disable it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["optoutctl", "health", "--addr", "http://127.0.0.1:50051"]
CMD ["optoutctl", "--help"]
