#!/usr/bin/env bash
# One validation over a Slurm cluster: an array of N tasks, each running one shard
# (`vmm validate --shard auto` reads SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and
# SLURM_ARRAY_TASK_COUNT), then one dependent job merging them:
#
#   mkdir -p reports      # before sbatch: Slurm opens the --output logs before the script runs
#   jobid=$(sbatch --parsable docs/ci/slurm-array.sh)
#   sbatch --dependency=afterany:"$jobid" --wrap 'vmm merge reports/shard-*.json -o reports/merged.json --markdown reports/merged.md'
#
# Nodes need /dev/kvm readable and writable by the job's user (the kvm group). The array
# must be 1..N with no step: `--shard auto` maps task ids from SLURM_ARRAY_TASK_MIN on.
#SBATCH --job-name=vmm-validate
#SBATCH --array=1-8
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=reports/slurm-%A_%a.log
set -euo pipefail
mkdir -p reports
vmm doctor
vmm validate --config "${VMM_CONFIG:-configs/validation.json}" --shard auto \
	${VMM_PAYLOAD:+--payload "$VMM_PAYLOAD"} \
	-o "reports/shard-${SLURM_ARRAY_TASK_ID}.json"
