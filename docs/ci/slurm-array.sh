#!/usr/bin/env bash
# One shard of a validation, as one task of a Slurm job array. Submit it with
# docs/ci/slurm-submit.sh (it checks what a node needs, then submits this array and the
# merge that waits for it); docs/ci.md has every step.
#
# Each task runs `vmm validate --shard auto`: the shard is the task's place in the array,
# (SLURM_ARRAY_TASK_ID - MIN) / STEP of SLURM_ARRAY_TASK_COUNT, so --array=0-7 and
# --array=0-14:2 are both eight shards. A list (--array=1,2,5) is refused. To re-run one
# shard of N, submit it with VMM_SHARD_COUNT=N: the task ID is then the 0-based shard.
#
# Reports go to reports/<array job id>/shard-<task id>.json: two submissions never mix.
#
# Whole cores: two tasks on one node must not time on one CPU. --cpus-per-task=2 gives
# each task two cores of its own under select/cons_tres with CR_Core (the timing CPU,
# and the counter CPU of `--vcpus 2` matrices); --hint=nomultithread keeps them off
# hyperthread siblings. vmm also takes an advisory lock per timing CPU, so a second
# process on the same CPU waits (or, with --cpu-lock fail, is refused).
#SBATCH --job-name=vmm-validate
#SBATCH --array=0-7
#SBATCH --cpus-per-task=2
#SBATCH --hint=nomultithread
#SBATCH --time=00:30:00
#SBATCH --output=reports/slurm-%A_%a.log
set -euo pipefail
: "${VMM:?VMM (the vmm binary, an absolute path) is not set: submit with docs/ci/slurm-submit.sh}"
out="reports/${SLURM_ARRAY_JOB_ID:?not inside a Slurm array job}"
mkdir -p "$out"
"$VMM" doctor
"$VMM" validate --config "${VMM_CONFIG:-configs/validation.json}" --shard auto \
	${VMM_PAYLOAD:+--payload "$VMM_PAYLOAD"} \
	-o "$out/shard-${SLURM_ARRAY_TASK_ID}.json"
