#!/usr/bin/env bash
# Submits a sharded validation to Kubernetes with kubectl and waits for its verdict: the
# reports volume (docs/ci/kubernetes-pvc.yaml, applied if missing), a new Indexed Job
# (docs/ci/kubernetes-indexed-job.yaml), then, once that Job has ended well or not, the
# merge Job (docs/ci/kubernetes-merge-job.yaml) for that Job's uid. Exits 0 only when every
# shard succeeded and the merge passed (whole matrix covered, requirements held).
#
#   VMM_IMAGE=registry.example.com/vmm:1 bash docs/ci/kubernetes-submit.sh
#   VMM_IMAGE=... SHARDS=8 KVM_RESOURCE=smarter-devices/kvm bash docs/ci/kubernetes-submit.sh
#
# VMM_IMAGE (required): the image of ./Containerfile, pushed where the cluster pulls from.
# SHARDS (default 4): completions, parallelism and VMM_SHARD_COUNT together.
# KVM_RESOURCE (default devices.kubevirt.io/kvm): the device plugin's resource for /dev/kvm.
# TIMEOUT (seconds, default 7200): how long to wait for each Job.
# kubectl's own context and namespace apply (KUBECONFIG, `kubectl config set-context`).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${VMM_IMAGE:?set VMM_IMAGE to the vmm image (./Containerfile) the cluster can pull}"
shards=${SHARDS:-4}
kvm=${KVM_RESOURCE:-devices.kubevirt.io/kvm}
timeout=${TIMEOUT:-7200}
[[ $shards =~ ^[1-9][0-9]*$ ]] || { echo "kubernetes-submit: SHARDS must be a positive number" >&2; exit 1; }

# Waits for a Job to end; prints Complete or Failed (kubectl wait takes one condition only).
wait_job() {
	local job=$1 start=$SECONDS conditions
	while :; do
		conditions=" $(kubectl get "job/$job" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}') "
		case $conditions in
		*" Complete "*) echo Complete; return 0 ;;
		*" Failed "*) echo Failed; return 0 ;;
		esac
		if ((SECONDS - start > timeout)); then
			echo "kubernetes-submit: job/$job has not ended after ${timeout}s" >&2
			return 1
		fi
		sleep 10
	done
}

kubectl get pvc vmm-reports >/dev/null 2>&1 || kubectl apply -f docs/ci/kubernetes-pvc.yaml
manifest=$(sed -e "s#registry.example.com/vmm:latest#$VMM_IMAGE#" \
	-e "s#^  completions: [0-9]* \# = VMM_SHARD_COUNT#  completions: $shards#" \
	-e "s#^  parallelism: [0-9]* \# = VMM_SHARD_COUNT#  parallelism: $shards#" \
	-e "s#value: \"[0-9]*\" \# = completions#value: \"$shards\"#" \
	-e "s#^\( *\)devices.kubevirt.io/kvm:#\1$kvm:#" docs/ci/kubernetes-indexed-job.yaml)
# The three numbers must have changed together (VMM_SHARD_COUNT must equal completions).
if [ "$(grep -cE "^  (completions|parallelism): $shards\$|value: \"$shards\"\$" <<<"$manifest")" != 3 ]; then
	echo "kubernetes-submit: could not set the shard count in docs/ci/kubernetes-indexed-job.yaml (edited?)" >&2
	exit 1
fi
job=$(kubectl create -f - -o jsonpath='{.metadata.name}' <<<"$manifest")
uid=$(kubectl get "job/$job" -o jsonpath='{.metadata.uid}')
echo "kubernetes-submit: job/$job ($shards shards), reports in vmm-reports:/reports/$uid/"
state=$(wait_job "$job")
echo "kubernetes-submit: job/$job: $state"

merge=$(sed -e "s#registry.example.com/vmm:latest#$VMM_IMAGE#" -e "s#SET-TO-THE-VALIDATE-JOB-UID#$uid#" \
	docs/ci/kubernetes-merge-job.yaml | kubectl create -f - -o jsonpath='{.metadata.name}')
merge_state=$(wait_job "$merge")
kubectl logs "job/$merge" || true
echo "kubernetes-submit: job/$merge: $merge_state; reports in vmm-reports:/reports/$uid/ (docs/ci/kubernetes-reports-pod.yaml copies them out)"
[ "$state" = Complete ] && [ "$merge_state" = Complete ]
