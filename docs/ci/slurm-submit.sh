#!/usr/bin/env bash
# Submits a sharded validation to Slurm: the array (docs/ci/slurm-array.sh) and one merge
# job that runs after every task has ended, successfully or not (afterany), and fails if
# a shard is missing or a run failed. Run it from the repository's root:
#
#   bash docs/ci/slurm-submit.sh              # 8 shards of configs/validation.json
#   bash docs/ci/slurm-submit.sh --wait       # ... and wait for the merge, exit with its status
#   VMM_CONFIG=configs/arms-race.json SHARDS=4 bash docs/ci/slurm-submit.sh
#
# VMM: the vmm binary (default: `vmm` on PATH, else ./target/release/vmm); it must be at
# the same path on every node (a shared file system, or installed on each). Any other
# sbatch option can be set in the environment (SBATCH_PARTITION, SBATCH_ACCOUNT, ...).
set -euo pipefail
wait=
[ "${1:-}" = --wait ] && wait=--wait
shards=${SHARDS:-8}
VMM=${VMM:-$(command -v vmm || echo "$PWD/target/release/vmm")}
VMM=$(realpath "$VMM" 2>/dev/null || echo "$VMM")
if [ ! -x "$VMM" ]; then
	echo "slurm-submit: no vmm binary at $VMM: build it (cargo build --release) or set VMM=/path/to/vmm" >&2
	exit 1
fi
for var in VMM_SHARD_INDEX VMM_SHARD_COUNT JOB_COMPLETION_INDEX; do
	if [ -n "${!var:-}" ]; then
		echo "slurm-submit: $var is set in this shell and would reach every task (sbatch exports the environment): unset it" >&2
		exit 1
	fi
done
export VMM
# Slurm opens each task's log before the task runs: the directory must exist now.
mkdir -p reports
array=$(sbatch --parsable --array="0-$((shards - 1))" docs/ci/slurm-array.sh)
array=${array%%;*}
echo "slurm-submit: array job $array ($shards shards): reports/$array/shard-*.json, logs reports/slurm-${array}_*.log"
merge=$(sbatch --parsable $wait --dependency=afterany:"$array" --job-name=vmm-merge \
	--output="reports/slurm-${array}-merge.log" \
	--wrap "\"$VMM\" merge reports/$array/shard-*.json -o reports/$array/merged.json --markdown reports/$array/merged.md")
status=$?
merge=${merge%%;*}
echo "slurm-submit: merge job ${merge:-?}: reports/$array/merged.json, log reports/slurm-${array}-merge.log"
exit $status
