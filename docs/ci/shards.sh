#!/usr/bin/env bash
# Run a validation matrix shard by shard, each shard in its own launch, and merge.
#
#   docs/ci/shards.sh CONFIG SHARDS OUTDIR [validate options...]
#
# LAUNCH (default: none) prefixes each shard's command, e.g.
#   LAUNCH="env SMP=2 ../shared/nested-svm/run" docs/ci/shards.sh configs/zoo.json 12 out/nested
# A launch that exits 126 (nested-svm: the nested guest froze) or 124 (ran past its
# TIMEOUT) is tried again, up to ATTEMPTS times (default 3), each attempt a fresh VM; every
# retry is printed and kept in OUTDIR/retries.txt, never dropped. A shard that still fails
# is named and the merge runs with --allow-partial, so the report says which shards are
# missing and this script exits 1.
set -uo pipefail
[ $# -ge 3 ] || { sed -n '2,13p' "$0"; exit 2; }
config=$1 shards=$2 out=$3
shift 3
vmm=${VMM:-./target/release/vmm}
attempts=${ATTEMPTS:-3}
mkdir -p "$out"
: > "$out/retries.txt"
missing=()
for k in $(seq 1 "$shards"); do
	for attempt in $(seq 1 "$attempts"); do
		start=$SECONDS
		# shellcheck disable=SC2086
		$LAUNCH "$vmm" validate --config "$config" --shard "$k/$shards" -o "$out/shard-$k.json" "$@" \
			> "$out/shard-$k.txt" 2> "$out/shard-$k.err"
		rc=$?
		echo "shard $k/$shards attempt $attempt: exit $rc in $((SECONDS - start)) s"
		case $rc in
		0 | 1) break ;; # 1: the report was written, a requirement failed
		124 | 126)
			echo "shard $k/$shards attempt $attempt: exit $rc (frozen or timed out), again in a fresh launch" | tee -a "$out/retries.txt"
			rm -f "$out/shard-$k.json"
			;;
		*) break ;;
		esac
	done
	[ -s "$out/shard-$k.json" ] || missing+=("$k")
done
reports=("$out"/shard-*.json)
[ -e "${reports[0]}" ] || { echo "no shard wrote a report" >&2; exit 1; }
partial=()
[ ${#missing[@]} -eq 0 ] || partial=(--allow-partial)
"$vmm" merge "${partial[@]}" "${reports[@]}" -o "$out/merged.json" --markdown "$out/merged.md" \
	--matrix-plot "$out/matrix.svg" > "$out/merged.txt"
rc=$?
if [ ${#missing[@]} -ne 0 ]; then
	echo "shards that never finished: ${missing[*]} (the merge says so)" >&2
	exit 1
fi
exit $rc
