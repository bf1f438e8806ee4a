#!/usr/bin/env bash
# Runs every command of every lab exercise (the ```sh blocks of docs/lab/*.md) and checks
# that each behaves as its exercise says. A command's trailing comment may say:
#   "# exits 1: ..."   it must exit 1, with vmm's error message;
#   "# refused ..."    refused where this KVM cannot (exit 1, a refusal in vmm's words), or
#                      run (exit 0) where it can;
# any other command must exit 0 and print something. A comment may also carry claims the
# exercise's text makes of the output, each "expect /ERE/" (a line must match; several
# allowed): the check fails when the tool no longer prints what the text says.
# Then docs/lab/key.py checks the figures and claims the pages mark (the teacher's key).
# Arguments go to key.py: `check.sh --portable` (CI) checks counts, ratios and claims and
# shows cycle counts beside their quotes without checking them (they differ by host).
# Needs a built vmm (target/release/vmm), python3 and /dev/kvm.
set -euo pipefail
# Refused before minutes of exercises run, not blamed on the key at the end.
case "$*" in
"" | --portable) ;;
*) echo "lab: usage: docs/lab/check.sh [--portable] (not: $*)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
export PATH="$PWD/target/release:$PATH"
command -v vmm >/dev/null || { echo "lab: build vmm first (cargo build --release)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Commands run in a scratch directory (what they write stays out of the tree) that sees
# the SDK examples at the paths the exercises give, relative to the repository.
ln -s "$PWD/guest-payload" "$work/guest-payload"
ln -s "$PWD/tools" "$work/tools"
failed=0
ran=0
claims=0
for page in docs/lab/[0-9]*.md; do
	page_start=$SECONDS
	in_block=0
	while IFS= read -r line; do
		case "$line" in
		'```sh') in_block=1; continue ;;
		'```') in_block=0; continue ;;
		esac
		[ "$in_block" = 1 ] && [ -n "$line" ] || continue
		ran=$((ran + 1))
		comment=""
		case "$line" in *" # "*) comment=${line#* # } ;; esac
		expect=ok
		case "$comment" in "exits 1"*) expect=exit1 ;; "refused"*) expect=refused ;; esac
		if (cd "$work" && bash -o pipefail -c "$line") >"$work/out" 2>&1; then
			status=0
		else
			status=$?
		fi
		refusal='not honoured by this KVM|not delivered by this KVM|cannot run rdtscp|refuse'
		if [ "$expect" = exit1 ]; then
			if [ "$status" -ne 1 ] || ! grep -q "^vmm: error: " "$work/out"; then
				echo "lab: FAIL ($page): $line: exit $status, not 1 with vmm's error message" >&2
				failed=$((failed + 1))
			fi
		elif [ "$expect" = refused ]; then
			if [ "$status" -ne 0 ] && { [ "$status" -ne 1 ] || ! grep -Eq "^vmm: error: .*($refusal)" "$work/out"; }; then
				echo "lab: FAIL ($page): $line: exit $status, neither run nor refused" >&2
				sed 's/^/    /' "$work/out" | tail -3 >&2
				failed=$((failed + 1))
			fi
		elif [ "$status" -ne 0 ] || [ ! -s "$work/out" ]; then
			echo "lab: FAIL ($page): $line: exit $status" >&2
			sed 's/^/    /' "$work/out" | tail -5 >&2
			failed=$((failed + 1))
		fi
		# The claims: each "expect /ERE/" of the comment, where the command ran (or, for
		# "exits 1", where it failed as the exercise says).
		rest=$comment
		[ "$status" = 0 ] || { [ "$expect" = exit1 ] && [ "$status" = 1 ]; } || rest=""
		while [[ $rest =~ expect\ /([^/]*)/(.*) ]]; do
			claim=${BASH_REMATCH[1]}
			rest=${BASH_REMATCH[2]}
			claims=$((claims + 1))
			if ! grep -Eq -- "$claim" "$work/out"; then
				echo "lab: FAIL ($page): $line: no line matches /$claim/ (the exercise claims it)" >&2
				sed 's/^/    /' "$work/out" | tail -5 >&2
				failed=$((failed + 1))
			fi
		done
	done <"$page"
	# What a teacher plans with: each exercise's commands, timed on this machine.
	echo "lab: ${page##*/}: its commands took $((SECONDS - page_start)) s here"
done
for picture in plane.svg paths.svg; do
	grep -q "<svg" "$work/$picture" 2>/dev/null || { echo "lab: FAIL: the lab drew no $picture" >&2; failed=$((failed + 1)); }
done
# The teacher's key: every figure and claim the pages mark, measured on this KVM's kind
# (docs/lab/key.py; the other kinds' figures are listed as not checked here).
key_start=$SECONDS
if ! python3 docs/lab/key.py "$@"; then
	echo "lab: FAIL: the teacher's key no longer holds (docs/lab/key.py above)" >&2
	failed=$((failed + 1))
fi
echo "lab: the key's measurements took $((SECONDS - key_start)) s here"
echo "lab: $ran commands and $claims claims checked, $failed failed"
[ "$failed" = 0 ]
