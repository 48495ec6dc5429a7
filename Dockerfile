# aom-terminator container image.
#
#   docker build -t aom-terminator .
#   docker run --rm aom-terminator --help
#
# One image serves every subcommand: `run` (the default), `migrate`,
# `sandbox`, and the operator tools `enqueue`, `report` and `dead-letters`.
# See docker-compose.yml for a complete local setup; tests/compose.rs checks
# this file's ENTRYPOINT and CMD and the compose file's commands against the
# binary's command tree.

# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------
# Cargo.toml asks for rust-version 1.88 (edition 2024); pin a newer stable.
FROM rust:1.95-bookworm AS builder
WORKDIR /app

# Dependencies first, in their own layer: build the whole dependency graph
# against empty stand-ins for the crate's own sources, so that editing src/
# does not recompile (or re-download) the dependencies.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. `migrations/` must be here at compile time:
# `sqlx::migrate!("./migrations")` embeds the SQL files into the binary.
COPY src ./src
COPY migrations ./migrations
# COPY keeps the files' own mtimes, which can be older than the stand-ins
# built above; touch the crate roots so Cargo rebuilds the lib and the binary.
RUN touch src/lib.rs src/main.rs \
    && cargo build --release --locked \
    && cp target/release/aom-terminator /usr/local/bin/aom-terminator

# ---------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------
# Same Debian release as the builder, so the glibc the binary links matches.
FROM debian:bookworm-slim

# TLS is rustls trusting the system's root certificates (reqwest through
# rustls-platform-verifier, lapin through rustls-native-certs), so
# ca-certificates is the only extra package needed (https AOM endpoints,
# amqps brokers). No OpenSSL: aws-lc is linked statically.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The service account; no home, no shell.
RUN groupadd --gid 10001 aom \
    && useradd --uid 10001 --gid aom --no-create-home --no-log-init \
       --home-dir /nonexistent --shell /usr/sbin/nologin aom

COPY --from=builder /usr/local/bin/aom-terminator /usr/local/bin/aom-terminator

# Numeric, so that runtimes enforcing "run as non-root" can check it.
USER 10001:10001

# The binary is PID 1 and handles SIGTERM itself: it finishes in-flight
# requests for up to SHUTDOWN_GRACE (30 s by default), so stop it with a
# longer timeout than Docker's default 10 s (`docker stop -t 40`, or
# `stop_grace_period: 40s` in compose).
ENTRYPOINT ["aom-terminator"]
CMD ["run"]
