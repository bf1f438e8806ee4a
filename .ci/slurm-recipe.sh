#!/usr/bin/env bash
# The Slurm recipe, run for real: a single-node cluster on this machine (.ci/slurm-cluster.sh),
# the recipe submitted exactly as docs/ci.md tells a user, the merge compared with an
# unsharded run of the same matrix; then a submission with one task cancelled, whose
# merge must fail naming the missing shard. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
state=$(mktemp -d /tmp/vmm-slurm-ci.XXXXXX)
work=$(mktemp -d /tmp/vmm-slurm-work.XXXXXX)
cleanup() {
	bash "$root/.ci/slurm-cluster.sh" stop "$state" || true
	rm -rf "$work"
}
trap cleanup EXIT
bash .ci/slurm-cluster.sh start "$state"
export SLURM_CONF="$state/slurm.conf"
export VMM="$PWD/target/release/vmm"
[ -x "$VMM" ] || cargo build --release -q
# The recipe's paths are relative to the repository, as a user runs it: a copy of the
# files it reads, so reports/ lands in the scratch directory.
mkdir -p "$work/docs" && cp -r docs/ci "$work/docs/" && cp -r configs "$work/"
cd "$work"

echo "slurm: the recipe, 4 shards of configs/validation.json"
SHARDS=4 bash docs/ci/slurm-submit.sh --wait
array=$(ls -d reports/*/ | head -1)
array=$(basename "$array")
"$VMM" validate --config configs/validation.json -o whole.json >/dev/null 2>&1
python3 - "reports/$array/merged.json" whole.json <<'PY'
import json, sys
merged, whole = (json.load(open(p)) for p in sys.argv[1:3])
def jobs(r): return sorted((x["cell"], x["repeat"]) for x in r["runs"])
def cells(r): return [(c["mode"], c["shaping"], c["busy"], c["truth"], c["runs"]) for c in r["cells"]]
assert merged["matrix_coverage"]["missing"] == 0, merged["matrix_coverage"]
assert jobs(merged) == jobs(whole), "the merged shards ran other jobs than the unsharded run"
assert cells(merged) == cells(whole), "cells differ"
assert merged["coverage"][0]["refused"] == whole["coverage"][0]["refused"]
same = 0
for rule in ["fixed-threshold", "hypervisor-bit", "code-integrity", "tsc-monotonic"]:
    for key in ["true_positive", "false_negative", "false_positive", "true_negative"]:
        assert merged["confusion"][rule][key] == whole["confusion"][rule][key], (rule, key)
        same += 1
print(f"slurm: merged shards = unsharded run: {len(jobs(merged))} runs, {len(cells(merged))} cells, {same} deterministic counts")
PY

echo "slurm: one task cancelled: the merge must fail, naming the shard"
rm -rf reports
SBATCH_HOLD=1 SHARDS=4 bash docs/ci/slurm-submit.sh >submit.log
cat submit.log
array=$(sed -n 's/.*array job \([0-9]*\).*/\1/p' submit.log)
merge=$(sed -n 's/.*merge job \([0-9]*\).*/\1/p' submit.log)
scancel "${array}_2"
scontrol release "$array" "$merge"
for _ in $(seq 1 600); do
	squeue -h -j "$array,$merge" 2>/dev/null | grep -q . || break
	sleep 1
done
log="reports/slurm-${array}-merge.log"
tail -n 3 "$log" >&2
grep -q "shards not given: 3/4" "$log" || { echo "FAIL: the merge did not name the cancelled shard 3/4" >&2; exit 1; }
grep -q "the merge is PARTIAL" "$log" || { echo "FAIL: the merge did not fail as partial" >&2; exit 1; }
echo "slurm: the cancelled task's merge failed, naming shard 3/4"
