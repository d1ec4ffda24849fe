#!/usr/bin/env bash
# Benchmark smoke run (~1k sessions, under a minute): guestd and the Python peer side by side.
# The full run is documented in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import websockets' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'websockets==17.4' 2>/dev/null \
    || echo "could not install websockets: the peer will be skipped"
fi
cargo build --release --quiet --bins
./target/release/guestd-bench --smoke
# Burst throughput of the two websocket readers (a second).
./target/release/guestd-bench --frames 2000
