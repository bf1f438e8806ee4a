#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for .ci/run: Debian's slurm-wlm and munge,
# configured in a directory of its own. `start DIR` installs what is missing, writes the
# configuration, starts munged, slurmctld and slurmd (only those not already running),
# and waits for the node to be idle; `stop DIR` stops exactly what `start` started.
set -euo pipefail
cmd=${1:?start DIR or stop DIR}
dir=${2:?a directory for the cluster state}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

case $cmd in
start)
	if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
	fi
	mkdir -p "$dir"/{spool,state,log,run} /run/munge /var/log/munge /var/lib/munge
	: >"$dir/started"
	# munge: the key Debian's package made, or a new one.
	[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
	chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
	chmod 0400 /etc/munge/munge.key
	if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
		pkill -x munged 2>/dev/null && sleep 1
		runuser -u munge -- /usr/sbin/munged
		echo munged >>"$dir/started"
	fi
	cpus=$(nproc)
	mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
	host=$(hostname -s)
	cat >"$dir/slurm.conf" <<CONF
ClusterName=vmm-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
	export SLURM_CONF="$dir/slurm.conf"
	/usr/sbin/slurmctld -f "$SLURM_CONF"
	echo slurmctld >>"$dir/started"
	/usr/sbin/slurmd -f "$SLURM_CONF"
	echo slurmd >>"$dir/started"
	for _ in $(seq 1 60); do
		if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
			echo "slurm: single-node cluster up ($host, $cpus CPUs); SLURM_CONF=$SLURM_CONF"
			exit 0
		fi
		sleep 1
	done
	echo "slurm: the node did not become idle in 60 s" >&2
	sinfo >&2 || true
	tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
	exit 1
	;;
stop)
	[ -f "$dir/started" ] || exit 0
	# The daemons this script started, by the configuration file only they were given.
	if grep -qx slurmd "$dir/started" || grep -qx slurmctld "$dir/started"; then
		pkill -f -- "-f $dir/slurm.conf" || true
	fi
	if grep -qx munged "$dir/started"; then
		pkill -x munged || true
	fi
	for _ in $(seq 1 50); do
		pgrep -f -- "-f $dir/slurm.conf" >/dev/null || { grep -qx munged "$dir/started" && pgrep -x munged >/dev/null; } || break
		sleep 0.1
	done
	rm -f "$dir/started"
	;;
*)
	echo "usage: $0 start|stop DIR" >&2
	exit 2
	;;
esac
