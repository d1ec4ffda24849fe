# syntax=docker/dockerfile:1
# guestd's container image. README.md ("In a container") has the `docker run` that works from
# outside the container; docs/operations.md ("Packaging") says what each setting is for.
#
# Base images are pinned by index digest, so a rebuild of one commit uses the same compiler and the
# same runtime libraries. To refresh one, resolve its tag again
# (`docker buildx imagetools inspect IMAGE:TAG`) and update the digest and the date here:
#   rust:1-bookworm       resolved 2026-09-20 (Rust 1.98.1)
#   debian:bookworm-slim  resolved 2026-09-20
# No registry is reachable from guestd's development machines: CI lints this file (hadolint) and
# runs guestd with its settings (tests/packaging.rs), but does not build the image.

# Build: the same release build CI runs.
FROM rust:1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e AS build
WORKDIR /src
# Dependencies first, in a layer of their own: rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/guestd-bench.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin guestd \
    && rm -rf src
COPY src ./src
COPY config ./config
# The git revision guestd reports (start-up log line, guestd_build_info): the build context has
# no .git, so pass it: --build-arg GUESTD_GIT_REVISION=$(git rev-parse --short HEAD)
ARG GUESTD_GIT_REVISION=unknown
ENV GUESTD_GIT_REVISION=${GUESTD_GIT_REVISION}
# touch: the sources copied in may be older than the placeholder build above.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin guestd

# Run: small image, non-root, the journal on a volume, the HTTP API on every interface with a
# bearer token required, health check on /healthz (open without the token).
FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/guestd --shell /usr/sbin/nologin guestd \
    && mkdir -p /etc/guestd /var/lib/guestd \
    && chown guestd:guestd /var/lib/guestd && chmod 0700 /var/lib/guestd
COPY --from=build /src/target/release/guestd /usr/local/bin/guestd
COPY config/guestd.toml /etc/guestd/guestd.toml
# The token file must exist: guestd refuses to start without it. Mount it read-only, readable by
# uid 10001 (docker run -v ./guestd-token:/run/secrets/guestd_token:ro, or a compose secret).
ENV GUESTD_CONFIG=/etc/guestd/guestd.toml \
    GUESTD_JOURNAL__PATH=/var/lib/guestd/journal.jsonl \
    GUESTD_CONTROL__HTTP_LISTEN=0.0.0.0:8787 \
    GUESTD_CONTROL__ALLOW_NON_LOOPBACK=true \
    GUESTD_CONTROL__TOKEN_FILE=/run/secrets/guestd_token \
    GUESTD_CONTROL__STDIN=false
USER guestd
VOLUME ["/var/lib/guestd"]
EXPOSE 8787
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8787/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/guestd"]
CMD ["run", "--log-format", "json"]
