#!/usr/bin/env bash
# Runs every command of every lab exercise (the ```sh blocks of docs/lab/*.md) and checks
# that each behaves as its exercise says: exit 0, or — where the exercise says a command is
# refused or exits 1 on this kind of KVM — a non-zero exit with vmm's own error message.
# Needs a built vmm (target/release/vmm) and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/target/release:$PATH"
command -v vmm >/dev/null || { echo "lab: build vmm first (cargo build --release)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
ran=0
for page in docs/lab/[0-9]*.md; do
	in_block=0
	while IFS= read -r line; do
		case "$line" in
		'```sh') in_block=1; continue ;;
		'```') in_block=0; continue ;;
		esac
		[ "$in_block" = 1 ] && [ -n "$line" ] || continue
		ran=$((ran + 1))
		# "refused" or "exits 1" in the line's comment: a non-zero exit is the expected answer.
		expect_failure=0
		case "$line" in *"# refused"* | *"# exits 1"*) expect_failure=1 ;; esac
		if (cd "$work" && bash -o pipefail -c "$line") >"$work/out" 2>&1; then
			status=0
		else
			status=$?
		fi
		if [ "$expect_failure" = 1 ]; then
			# Refused where the KVM cannot; on one that can, it runs: either way, no crash.
			if [ "$status" -ne 0 ] && ! grep -q "^vmm: error: " "$work/out"; then
				echo "lab: FAIL ($page): $line: exit $status without vmm's error message" >&2
				failed=$((failed + 1))
			elif [ "$status" -gt 1 ]; then
				echo "lab: FAIL ($page): $line: exit $status" >&2
				failed=$((failed + 1))
			fi
		elif [ "$status" -ne 0 ] || [ ! -s "$work/out" ]; then
			echo "lab: FAIL ($page): $line: exit $status" >&2
			sed 's/^/    /' "$work/out" | tail -5 >&2
			failed=$((failed + 1))
		fi
	done <"$page"
done
[ -s "$work/paths.svg" ] || { echo "lab: FAIL: exercise 5 drew no paths.svg" >&2; failed=$((failed + 1)); }
echo "lab: $((ran - failed)) passed, $failed failed"
[ "$failed" = 0 ]
