# syntax=docker/dockerfile:1
# Build: the same release build CI runs.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin guestd

# Run: small image, non-root, config and journal volumes, health check on the ops endpoint.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/guestd --shell /usr/sbin/nologin guestd \
    && mkdir -p /etc/guestd /var/lib/guestd \
    && chown guestd:guestd /var/lib/guestd && chmod 0700 /var/lib/guestd
COPY --from=build /src/target/release/guestd /usr/local/bin/guestd
COPY config/guestd.toml /etc/guestd/guestd.toml
ENV GUESTD_CONFIG=/etc/guestd/guestd.toml \
    GUESTD_JOURNAL__PATH=/var/lib/guestd/journal.jsonl \
    GUESTD_CONTROL__HTTP_LISTEN=127.0.0.1:8787 \
    GUESTD_CONTROL__STDIN=false
USER guestd
VOLUME ["/etc/guestd", "/var/lib/guestd"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8787/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/guestd"]
CMD ["run", "--log-format", "json"]
