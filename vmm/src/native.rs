//! The native runner: the same timing core as the guest, in a host thread pinned to one
//! CPU, so that native and guest samples come from identical instructions.

use crate::vm::ProbeSamples;
use guest_payload::timing::{self, CpuidPath, Request};
use guest_payload::{probes_in, Config, CpuidRecord, Cycles, CPUID_SNAPSHOT_LEAVES};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("CPU {cpu} is not one this process may run on (allowed: {allowed:?})")]
    CpuNotAllowed { cpu: usize, allowed: Vec<usize> },
    #[error("cannot pin the measuring thread to CPU {cpu}: {source}")]
    Pin { cpu: usize, source: std::io::Error },
    #[error("cannot start the measuring thread: {0}")]
    Thread(std::io::Error),
    #[error("the measuring thread panicked")]
    Panicked,
}

/// What a native run measured.
#[derive(Clone, Debug)]
pub struct NativeRun {
    pub samples: ProbeSamples,
    pub cpuid: Vec<CpuidRecord>,
    /// This binary's own CPUID sites, read as a guest reads its code.
    pub site_bytes: Vec<[u8; 2]>,
    pub cpu: usize,
    pub run: Duration,
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size matches the set.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return vec![0];
    }
    // SAFETY: CPU_ISSET reads within the set for indices below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

fn pin_current_thread(cpu: usize) -> Result<(), NativeError> {
    // SAFETY: as in `allowed_cpus`; CPU_SET writes within the set (cpu < CPU_SETSIZE is
    // guaranteed by the caller, which checked it against the allowed list).
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        return Err(NativeError::Pin {
            cpu,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs the timing core on the host as `config` asks, pinned to `cpu` (default: the last
/// CPU this process may use, away from CPU 0's interrupt load).
pub fn run(config: &Config, cpu: Option<usize>) -> Result<NativeRun, NativeError> {
    let allowed = allowed_cpus();
    let cpu = match cpu {
        Some(cpu) if !allowed.contains(&cpu) => return Err(NativeError::CpuNotAllowed { cpu, allowed }),
        Some(cpu) => cpu,
        None => *allowed.last().unwrap_or(&0),
    };
    let config = *config;
    let thread = std::thread::Builder::new()
        .name("vmm-native".into())
        .spawn(move || -> Result<NativeRun, NativeError> {
            pin_current_thread(cpu)?;
            let started = Instant::now();
            let request = Request {
                cpuid_leaf: config.cpuid_leaf,
                cpuid_subleaf: config.cpuid_subleaf,
                warmup: config.warmup,
                cpuid_path: CpuidPath::Instruction,
            };
            let mut samples = ProbeSamples::new();
            for probe in probes_in(config.probes) {
                let mut out: Vec<Cycles> = vec![0; config.iterations as usize];
                timing::measure(probe, &request, &mut out);
                samples.insert(probe, out);
            }
            let snapshot = config.flags & guest_payload::flags::CPUID_SNAPSHOT != 0;
            let (cpuid, site_bytes) = if snapshot {
                let cpuid = CPUID_SNAPSHOT_LEAVES
                    .iter()
                    .map(|&(leaf, sub)| timing::query_cpuid(CpuidPath::Instruction, leaf, sub))
                    .collect();
                (cpuid, timing::cpuid_site_bytes().to_vec())
            } else {
                (Vec::new(), Vec::new())
            };
            Ok(NativeRun {
                samples,
                cpuid,
                site_bytes,
                cpu,
                run: started.elapsed(),
            })
        })
        .map_err(NativeError::Thread)?;
    thread.join().map_err(|_| NativeError::Panicked)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_run_fills_every_probe_on_the_chosen_cpu() {
        let config = Config {
            iterations: 200,
            warmup: 10,
            probes: 0b111,
            ..Default::default()
        };
        let cpu = allowed_cpus()[0];
        let run = run(&config, Some(cpu)).unwrap();
        assert_eq!(run.cpu, cpu);
        assert_eq!(run.samples.len(), 3);
        assert!(run.samples.values().all(|s| s.len() == 200));
    }

    #[test]
    fn a_cpu_outside_the_affinity_mask_is_refused() {
        let config = Config {
            iterations: 1,
            probes: 1,
            ..Default::default()
        };
        assert!(matches!(
            run(&config, Some(100_000)),
            Err(NativeError::CpuNotAllowed { .. })
        ));
    }
}
