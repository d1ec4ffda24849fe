#!/usr/bin/env bash
# Run every fuzz target for a while (default 9 s each: about a minute in all), from the seeds in
# fuzz/seeds/<target> plus a scratch corpus. A crash stops the script non-zero and leaves its
# input in fuzz/artifacts/<target>/ (make it a test, then fix it).
#
# cargo-fuzz wants a nightly toolchain for its sanitizer flags; this project has one stable
# toolchain, so RUSTC_BOOTSTRAP=1 lets stable accept them (AddressSanitizer included).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-9}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for seeds in seeds/*/; do
  t=$(basename "$seeds")
  mkdir -p "$scratch/$t"
  echo "fuzz $t (${secs}s)"
  cargo fuzz run "$t" "$scratch/$t" "$seeds" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
    | grep -E 'Done [0-9]+ runs|stat::number_of_executed_units|SUMMARY|panicked' || true
  # grep swallows the exit status; a crash leaves an artifact.
  if compgen -G "artifacts/$t/*" >/dev/null; then
    echo "fuzz $t found a crash: $(ls artifacts/$t)" >&2
    exit 1
  fi
done
