#!/usr/bin/env bash
# Run every fuzz target (`cargo fuzz list`, not only those with seeds) for a while (default 9 s
# each), from the seeds in fuzz/seeds/<target> when there are any, plus a scratch corpus. A
# target that crashes, or exits non-zero for any other reason, fails the run, and its input is
# left in fuzz/artifacts/<target>/ (make it a test, then fix it).
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
targets=$(cargo fuzz list)
[ -n "$targets" ] || { echo "no fuzz targets" >&2; exit 1; }
failed=""
for t in $targets; do
  mkdir -p "$scratch/$t"
  corpora=("$scratch/$t")
  if [ -d "seeds/$t" ]; then corpora+=("seeds/$t"); else echo "fuzz $t: no seeds, starts from nothing"; fi
  echo "fuzz $t (${secs}s)"
  log="$scratch/$t.log"
  set +e
  cargo fuzz run "$t" "${corpora[@]}" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1
  status=$?
  set -e
  grep -E 'Done [0-9]+ runs|stat::number_of_executed_units|SUMMARY|panicked' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz $t failed (exit $status): $(ls "artifacts/$t" 2>/dev/null | tr '\n' ' ')" >&2
    failed="$failed $t"
  fi
done
if [ -n "$failed" ]; then
  echo "fuzz targets failed:$failed" >&2
  exit 1
fi
echo "fuzz: every target ran ($(echo $targets | wc -w)), none failed"
