#!/usr/bin/env bash
# Bounded fuzzing run: builds the cargo-fuzz targets in fuzz/ and runs each
# for SECONDS (default 20, so three targets take about a minute), starting
# from the committed seeds in fuzz/corpus/<target>/. New corpus entries go to
# fuzz/corpus-work/<target>/ (git-ignored), crashes to fuzz/artifacts/.
#
#   bash tests/fuzz.sh [SECONDS] [TARGET...]
#
# Prints one line per target and exits non-zero if any target crashed or
# failed to build.
#
# Toolchain: cargo-fuzz needs nightly-only rustc flags (-Zsanitizer,
# sancov). On the project's stable toolchain RUSTC_BOOTSTRAP=1 unlocks them
# and the build works (checked with rustc 1.95.0 and cargo-fuzz 0.13.2).
# Set FUZZ_TOOLCHAIN=nightly to use `cargo +nightly` instead.
set -euo pipefail

secs=${1:-20}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

cargo_cmd=(cargo)
if [[ -n "${FUZZ_TOOLCHAIN:-}" ]]; then
    cargo_cmd=(cargo "+$FUZZ_TOOLCHAIN")
else
    export RUSTC_BOOTSTRAP=1
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <("${cargo_cmd[@]}" fuzz list)
fi

echo "fuzz: building ${targets[*]}" >&2
for t in "${targets[@]}"; do
    if ! "${cargo_cmd[@]}" fuzz build -O "$t" >&2; then
        printf 'fuzz %-14s BUILD FAILED\n' "$t"
        exit 1
    fi
done

fail=0
logdir=$(mktemp -d)
for t in "${targets[@]}"; do
    work="corpus-work/$t"
    mkdir -p "$work" "corpus/$t" "artifacts/$t"
    log="$logdir/$t.log"
    start=$(date +%s)
    set +e
    # -rss_limit_mb: ASan plus libvirt's library init sit near 450 MB.
    "${cargo_cmd[@]}" fuzz run -O "$t" "$work" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    took=$(($(date +%s) - start))
    # Stats are best effort: a missing line must not abort the report.
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1 || true)
    cov=$( (grep -Eo 'cov: [0-9]+' "$log" || true) | tail -1 | awk '{print $2}')
    corp=$(find "$work" -type f | wc -l)
    if [[ $rc -eq 0 ]]; then
        printf 'fuzz %-14s ok     %4ss runs=%s exec/s=%s cov=%s corpus=%s\n' \
            "$t" "$took" "${runs:-?}" "${speed:-?}" "${cov:-?}" "$corp"
    else
        fail=1
        crash=$( (grep -Eo 'Test unit written to [^ ]+' "$log" || true) | tail -1 | sed 's/Test unit written to //')
        printf 'fuzz %-14s CRASH  %4ss rc=%s artifact=%s log=%s\n' \
            "$t" "$took" "$rc" "${crash:--}" "$log"
        (grep -E 'panicked|ERROR: |SUMMARY' "$log" || true) | head -5 | sed 's/^/    /'
    fi
done
exit $fail
