#!/usr/bin/env bash
# Checks every Kubernetes YAML under docs/ci/ offline, without a cluster:
#  1. against the Kubernetes API's JSON schemas (strict: an unknown field fails), with
#     kubernetes-validate (PyPI), which ships the schemas of Kubernetes 1.25 onwards inside
#     the package; it is installed here if missing. Each resource is checked against the
#     oldest version the recipe supports (1.29: backoffLimitPerIndex, podFailurePolicy
#     FailIndex) and the newest the validator ships; K8S_VERSIONS="1.30 1.33" overrides.
#  2. against what the recipe promises and a schema cannot say (docs/ci.md, "Kubernetes"):
#     a ReadWriteMany claim defined for every claim mounted, Guaranteed whole cores for the
#     shards, VMM_SHARD_COUNT = completions = parallelism, shard files keyed by the Job's
#     uid, a merge that never gets --allow-partial.
# Exits 1 naming each failure. Usage: bash .ci/k8s-schema.sh [FILE.yaml ...]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
	command -v pip3 >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null; }
	pip3 install -q kubernetes-validate >/dev/null 2>&1 ||
		pip3 install -q --break-system-packages kubernetes-validate
fi

if [ $# -eq 0 ]; then
	mapfile -t files < <(find docs/ci -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
	set -- "${files[@]}"
fi
[ $# -gt 0 ] || { echo "k8s-schema: no YAML under docs/ci" >&2; exit 1; }

python3 - "$@" <<'PY'
import os
import re
import sys

import yaml
import kubernetes_validate
from kubernetes_validate import utils

MIN_VERSION = "1.29"
versions = os.environ.get("K8S_VERSIONS", "").split() or [MIN_VERSION, utils.latest_version()]
failures = []
resources = []


def fail(where, why):
    failures.append(f"{where}: {why}")


for path in sys.argv[1:]:
    try:
        with open(path) as f:
            documents = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        fail(path, f"cannot read it as YAML: {e}")
        continue
    if not documents:
        fail(path, "no resource in it")
    for doc in documents:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            fail(path, "a document that is not a Kubernetes resource (no apiVersion and kind)")
            continue
        meta = doc.get("metadata") or {}
        name = meta.get("name") or (meta.get("generateName", "") + "*")
        where = f"{path}: {doc['kind']}/{name}"
        resources.append((where, doc))
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                at = ".".join(str(p) for p in e.path) or "(top)"
                fail(where, f"Kubernetes {utils.major_minor(version)} schema: at {at}: {e.message}")
            except (utils.SchemaNotFoundError, utils.VersionNotSupportedError) as e:
                fail(where, f"Kubernetes {version}: {e}")

# What the recipe promises, beyond the schema.
claims = {doc["metadata"]["name"]: (where, doc) for where, doc in resources
          if doc["kind"] == "PersistentVolumeClaim"}
for where, doc in claims.values():
    if "ReadWriteMany" not in (doc.get("spec", {}).get("accessModes") or []):
        fail(where, "the reports volume must be ReadWriteMany (shard pods on several nodes mount it)")


def pod_spec(doc):
    if doc["kind"] == "Pod":
        return doc.get("spec", {})
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def script(container):
    return " ".join(container.get("command", []) + container.get("args", []))


def whole(quantity):
    return re.fullmatch(r"[1-9][0-9]*", str(quantity)) is not None


for where, doc in resources:
    if doc["kind"] not in ("Job", "Pod"):
        continue
    spec = pod_spec(doc)
    for volume in spec.get("volumes", []):
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is not None and claim not in claims:
            fail(where, f"mounts the claim {claim}, which no file under docs/ci defines")
    for container in spec.get("containers", []):
        text = script(container)
        env = {e["name"]: e for e in container.get("env", [])}
        if "vmm merge" in text and "--allow-partial" in text:
            fail(where, "the merge must fail on a partial matrix: no --allow-partial")
        if "vmm validate" not in text:
            continue
        job = doc.get("spec", {}) if doc["kind"] == "Job" else {}
        res = container.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        for r in ("cpu", "memory"):
            if r not in limits or str(requests.get(r, limits[r])) != str(limits[r]):
                fail(where, f"{container['name']}: {r} requests must equal limits (Guaranteed QoS)")
        if not whole(limits.get("cpu", "")):
            fail(where, f"{container['name']}: the cpu limit must be whole cores, not {limits.get('cpu')!r}")
        if "--shard auto" in text:
            if job.get("completionMode") != "Indexed":
                fail(where, "--shard auto on Kubernetes needs completionMode: Indexed")
            count = env.get("VMM_SHARD_COUNT", {}).get("value")
            if count is None or str(job.get("completions")) != str(count):
                fail(where, f"VMM_SHARD_COUNT ({count}) must equal completions ({job.get('completions')})")
            if job.get("parallelism", 1) > job.get("completions", 1):
                fail(where, "parallelism above completions")
            run_id = env.get("VMM_RUN_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            if "controller-uid" not in run_id or "$VMM_RUN_ID" not in text:
                fail(where, "shard files must go to a directory of this Job's own: "
                            "VMM_RUN_ID from the controller-uid label, in the output path")

for failure in failures:
    print(f"k8s-schema: FAIL {failure}", file=sys.stderr)
if failures:
    sys.exit(1)
for where, _ in resources:
    print(f"k8s-schema: ok {where} (Kubernetes {', '.join(utils.major_minor(v) for v in versions)})")
PY
