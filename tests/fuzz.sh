#!/usr/bin/env bash
# Bounded fuzzing run: builds the cargo-fuzz targets in fuzz/ and runs each
# for SECONDS (default 20, so three targets take about a minute), starting
# from the committed seeds in fuzz/corpus/<target>/. New corpus entries go to
# fuzz/corpus-work/<target>/ (git-ignored), crashes to fuzz/artifacts/.
#
#   bash tests/fuzz.sh [SECONDS] [TARGET...]
#
# Prints one line per target with the number of inputs libFuzzer executed,
# and the total. Exits non-zero if the target list is empty or cannot be
# read, if any target failed to build or crashed, or if a target executed
# fewer than FUZZ_MIN_RUNS inputs (default 10000): a fuzzer that barely ran
# proves nothing, whatever its exit code.
#
# Toolchain: cargo-fuzz needs nightly-only rustc flags (-Zsanitizer,
# sancov). On the project's stable toolchain RUSTC_BOOTSTRAP=1 unlocks them
# and the build works (checked with rustc 1.95.0 and cargo-fuzz 0.13.2).
# Set FUZZ_TOOLCHAIN=nightly to use `cargo +nightly` instead.
set -euo pipefail

secs=${1:-20}
shift || true
min_runs=${FUZZ_MIN_RUNS:-10000}
[[ $min_runs =~ ^[0-9]+$ ]] || { echo "fuzz: FUZZ_MIN_RUNS must be a number, not '$min_runs'" >&2; exit 1; }
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
    # Not `mapfile < <(cargo fuzz list)`: a process substitution's exit
    # status escapes `set -e`, so a failed listing would fuzz nothing and pass.
    if ! listing=$("${cargo_cmd[@]}" fuzz list); then
        echo "fuzz: 'cargo fuzz list' failed" >&2
        exit 1
    fi
    targets=()
    while IFS= read -r line; do
        if [[ -n ${line//[[:space:]]/} ]]; then targets+=("$line"); fi
    done <<<"$listing"
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "fuzz: no fuzz targets (cargo fuzz list printed nothing): nothing was fuzzed" >&2
    exit 1
fi

echo "fuzz: building ${targets[*]}" >&2
for t in "${targets[@]}"; do
    if ! "${cargo_cmd[@]}" fuzz build -O "$t" >&2; then
        printf 'fuzz %-14s BUILD FAILED\n' "$t"
        exit 1
    fi
done

# runs_in LOG: how many inputs libFuzzer executed, from its closing lines
# ("Done N runs in S second(s)", or "#N<TAB>DONE" with its stats, or
# -print_final_stats's number_of_executed_units); empty when none is there.
runs_in() {
    local log=$1 n
    n=$(sed -n 's/^Done \([0-9][0-9]*\) runs in .*/\1/p' "$log" | tail -n1)
    [[ -n $n ]] || n=$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]]*DONE .*/\1/p' "$log" | tail -n1)
    [[ -n $n ]] || n=$(sed -n 's/^stat::number_of_executed_units: *\([0-9][0-9]*\).*/\1/p' "$log" | tail -n1)
    echo "$n"
}

fail=0
total_runs=0
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
    runs=$(runs_in "$log")
    total_runs=$((total_runs + ${runs:-0}))
    # The other stats are for the record only: a missing line must not
    # abort the report.
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1 || true)
    cov=$( (grep -Eo 'cov: [0-9]+' "$log" || true) | tail -1 | awk '{print $2}')
    corp=$(find "$work" -type f | wc -l)
    if [[ $rc -eq 0 && -z $runs ]]; then
        fail=1
        printf 'fuzz %-14s NO RUNS %3ss libFuzzer reported no executions log=%s\n' "$t" "$took" "$log"
        tail -n 5 "$log" | sed 's/^/    /'
    elif [[ $rc -eq 0 && $runs -lt $min_runs ]]; then
        fail=1
        printf 'fuzz %-14s TOO FEW %3ss runs=%s < FUZZ_MIN_RUNS=%s exec/s=%s log=%s\n' \
            "$t" "$took" "$runs" "$min_runs" "${speed:-?}" "$log"
    elif [[ $rc -eq 0 ]]; then
        printf 'fuzz %-14s ok     %4ss runs=%s exec/s=%s cov=%s corpus=%s\n' \
            "$t" "$took" "$runs" "${speed:-?}" "${cov:-?}" "$corp"
    else
        fail=1
        crash=$( (grep -Eo 'Test unit written to [^ ]+' "$log" || true) | tail -1 | sed 's/Test unit written to //')
        printf 'fuzz %-14s CRASH  %4ss rc=%s artifact=%s log=%s\n' \
            "$t" "$took" "$rc" "${crash:--}" "$log"
        (grep -E 'panicked|ERROR: |SUMMARY' "$log" || true) | head -5 | sed 's/^/    /'
    fi
done
echo "fuzz: ${#targets[@]} target(s), $total_runs executions in total (floor $min_runs per target)"
exit $fail
