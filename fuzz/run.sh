#!/usr/bin/env bash
# Runs every fuzz target for at most RUNS executions or SECONDS seconds each, from the
# seeds in seeds/<target>/ (copied into a scratch corpus), and fails on the first crash.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); builds on stable with `-s none`, with
# debug assertions (-a) so that overflows are found, not wrapped.
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-1000000}
SECONDS_EACH=${SECONDS_EACH:-330}
cargo fuzz build -s none -O -a
for target in $(cargo fuzz list); do
	rm -rf "corpus/$target"
	mkdir -p "corpus/$target"
	cp seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
	log=$(mktemp)
	if ! cargo fuzz run "$target" -s none -O -a "corpus/$target" -- \
		-runs="$RUNS" -max_total_time="$SECONDS_EACH" -print_final_stats=1 >"$log" 2>&1; then
		tail -40 "$log" >&2
		echo "fuzz: $target CRASHED (artifacts in fuzz/artifacts/$target)" >&2
		exit 1
	fi
	runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
	echo "fuzz: $target: $runs executions, no crash"
	rm -f "$log"
done
