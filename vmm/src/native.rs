//! The native runner: the same timing core as the guest, in a host thread pinned to one
//! CPU, so that native and guest samples come from identical instructions.

use crate::host::{pin_current_thread, AffinityError, Placement};
use crate::results::{ProbeSamples, Results, ResultsError};
use guest_payload::timing::{self, CpuidCall, Request};
use guest_payload::{probes_in, ClockReadings, Config, Cycles, Probe, CPUID_SNAPSHOT_LEAVES};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(transparent)]
    Affinity(#[from] AffinityError),
    #[error("cannot pin the measuring thread to CPU {cpu}: {source}")]
    Pin { cpu: usize, source: std::io::Error },
    #[error("cannot start the measuring thread: {0}")]
    Thread(std::io::Error),
    #[error("the measuring thread panicked")]
    Panicked,
    #[error("the native timing core stopped: {0}")]
    Measure(&'static str),
    #[error("the native run passed its deadline ({timeout:?}) and was stopped")]
    PastDeadline { timeout: Duration },
    #[error("cannot run the native twin {twin}: {source}")]
    Twin { twin: String, source: std::io::Error },
    #[error("cannot run native twins as user {user} (vmm runs them unprivileged when it runs as root): {why}; name another with --twin-user, or --twin-user root")]
    TwinUser { user: String, why: String },
    #[error("the native twin {twin} ran past its timeout ({timeout:?}) and was killed")]
    TwinHung { twin: String, timeout: Duration },
    #[error("the native twin {twin} failed ({status}){stderr}")]
    TwinFailed {
        twin: String,
        status: String,
        stderr: String,
    },
    #[error("the native twin {twin} stopped with status {value}: {}{stderr}", guest_payload::Status::from_u32(*.value).map_or("a status this VMM does not know", guest_payload::Status::describe))]
    TwinStatus { twin: String, value: u32, stderr: String },
    #[error("the native twin {twin}'s result block is not valid: {why}")]
    TwinResults { twin: String, why: String },
}

/// What a native run measured, and where.
#[derive(Clone, Debug)]
pub struct NativeRun {
    pub results: Results,
    /// The CPU the measuring thread (or the twin) was pinned to.
    pub cpu: usize,
    pub run: Duration,
}

/// Samples of one probe measured between two looks at the deadline.
const NATIVE_CHUNK: usize = 65_536;

/// The native side of `--vcpus 2`: a host thread pinned to another CPU running the very
/// loop the counter vCPU runs ([`timing::run_counter_loop`]), stopped and joined on drop.
struct CounterThread {
    /// Shared with the thread (an `Arc`, never a `Box` another thread writes through).
    block: std::sync::Arc<guest_payload::CounterBlock>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CounterThread {
    fn start(cpu: usize) -> Result<Self, NativeError> {
        let block = std::sync::Arc::new(guest_payload::CounterBlock::default());
        let shared = std::sync::Arc::clone(&block);
        let thread = std::thread::Builder::new()
            .name("vmm-native-counter".into())
            .spawn(move || {
                // Unpinned, it still counts: the measuring thread is what must be pinned.
                let _ = pin_current_thread(cpu);
                // SAFETY: the thread holds its own reference to the block for as long as
                // the loop runs; the loop's fields are atomics (see CounterBlock).
                unsafe { timing::run_counter_loop(std::sync::Arc::as_ptr(&shared).cast_mut()) };
            })
            .map_err(NativeError::Thread)?;
        Ok(Self {
            block,
            thread: Some(thread),
        })
    }

    fn addr(&self) -> u64 {
        std::sync::Arc::as_ptr(&self.block) as u64
    }
}

impl Drop for CounterThread {
    fn drop(&mut self) {
        self.block
            .stamp_request
            .store(guest_payload::counter::STOP, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn measure_error(error: timing::MeasureError) -> NativeError {
    NativeError::Measure(match error {
        timing::MeasureError::NoCounter => "a probe needs the counter and there is none",
        timing::MeasureError::CounterStalled => "the counter thread stopped counting",
    })
}

/// Runs the timing core on the host as `config` asks, pinned as `placement` says. A
/// non-zero `config.counter_addr` asks for a counter: a host thread on the placement's
/// counter CPU keeps one (the address itself is the guest's and means nothing here).
pub fn run(config: &Config, placement: Placement, timeout: Duration) -> Result<NativeRun, NativeError> {
    let cpu = placement.timing;
    let counter = match (config.counter_addr, placement.counter) {
        (0, _) => None,
        (_, Some(other)) => Some(CounterThread::start(other)?),
        (_, None) => return Err(AffinityError::NoCounterCpu { cpu }.into()),
    };
    let config = Config {
        counter_addr: counter.as_ref().map_or(0, CounterThread::addr),
        ..*config
    };
    let thread = std::thread::Builder::new()
        .name("vmm-native".into())
        .spawn(move || -> Result<NativeRun, NativeError> {
            pin_current_thread(cpu).map_err(|source| NativeError::Pin { cpu, source })?;
            let started = Instant::now();
            let request = Request {
                cpuid_leaf: config.cpuid_leaf,
                cpuid_subleaf: config.cpuid_subleaf,
                warmup: config.warmup,
                cpuid_call: CpuidCall::Instruction,
                counter_addr: config.counter_addr,
            };
            let with_ticks = config.counter_addr != 0;
            let mut samples = ProbeSamples::new();
            let mut ticks = ProbeSamples::new();
            let deadline = started + timeout;
            let iterations = config.iterations as usize;
            let counter_rate = if with_ticks {
                Some(timing::measure_counter_rate(&request, crate::vm::pm_timer::count).map_err(measure_error)?)
            } else {
                None
            };
            let timer_pair = Probe::TimerCpuid.bit() | Probe::TimerLfence8.bit();
            let paired = config.probes & timer_pair == timer_pair;
            // The quiet span and the run's span on the host's clocks: the TSC by RDTSC
            // and (where the CPU has it) RDTSCP, and the monotonic clock in PM timer
            // ticks (no MSR, no kvmclock in a host process: reported unavailable).
            let rdtscp = crate::host::has_rdtscp();
            let host_clocks = |end: bool| {
                let mut r = ClockReadings::default();
                if end {
                    r.tsc = timing::read_tsc();
                    r.rdtscp = if rdtscp { timing::read_tscp() } else { 0 };
                    r.pm_timer = u64::from(crate::vm::pm_timer::count());
                } else {
                    r.pm_timer = u64::from(crate::vm::pm_timer::count());
                    r.rdtscp = if rdtscp { timing::read_tscp() } else { 0 };
                    r.tsc = timing::read_tsc();
                }
                r
            };
            let quiet = timing::quiet_span(host_clocks, crate::vm::pm_timer::count);
            let span_start = host_clocks(false);
            for probe in probes_in(config.probes) {
                // A VM's clocks (an MSR) are not a host process's: reported unavailable.
                if (paired && probe == Probe::TimerLfence8) || probe.needs_clocks() {
                    continue;
                }
                let mut out: Vec<Cycles> = vec![0; iterations];
                let mut out_ticks: Vec<Cycles> = vec![0; if with_ticks { iterations } else { 0 }];
                let mut lfence: Vec<Cycles> = vec![
                    0;
                    if paired && probe == Probe::TimerCpuid {
                        iterations
                    } else {
                        0
                    }
                ];
                let mut lfence_ticks: Vec<Cycles> = vec![0; if with_ticks { lfence.len() } else { 0 }];
                // In chunks, so that the deadline is checked as a guest's run is: the
                // warm-up comes before the first chunk only, as in one call.
                let mut start = 0;
                while start < iterations {
                    if Instant::now() > deadline {
                        return Err(NativeError::PastDeadline { timeout });
                    }
                    let end = (start + NATIVE_CHUNK).min(iterations);
                    let request = Request {
                        warmup: if start == 0 { request.warmup } else { 0 },
                        ..request
                    };
                    // This chunk of each output, or nothing of one the run does not fill.
                    let chunk = |v: &[Cycles]| if v.is_empty() { 0..0 } else { start..end };
                    let (r_out, r_ticks, r_lf, r_lft) =
                        (chunk(&out), chunk(&out_ticks), chunk(&lfence), chunk(&lfence_ticks));
                    if paired && probe == Probe::TimerCpuid {
                        timing::measure_timer_pairs(
                            &request,
                            timing::TimerOut {
                                cpuid_tsc: &mut out[r_out],
                                cpuid_ticks: &mut out_ticks[r_ticks],
                                lfence_tsc: &mut lfence[r_lf],
                                lfence_ticks: &mut lfence_ticks[r_lft],
                            },
                        )
                    } else {
                        let t = with_ticks.then_some(&mut out_ticks[r_ticks]);
                        timing::measure(probe, &request, &mut out[r_out], t)
                    }
                    .map_err(measure_error)?;
                    start = end;
                }
                if paired && probe == Probe::TimerCpuid {
                    samples.insert(Probe::TimerLfence8, lfence);
                    if with_ticks {
                        ticks.insert(Probe::TimerLfence8, lfence_ticks);
                    }
                }
                samples.insert(probe, out);
                if with_ticks {
                    ticks.insert(probe, out_ticks);
                }
            }
            let span_end = host_clocks(true);
            let clocks = Some(crate::results::ClockRecord {
                read: guest_payload::clocks::TSC
                    | guest_payload::clocks::PM_TIMER
                    | if rdtscp { guest_payload::clocks::RDTSCP } else { 0 },
                kvmclock_tsc_khz: 0,
                quiet: quiet.map(Into::into),
                span: [span_start.into(), span_end.into()],
            });
            let snapshot = config.flags & guest_payload::flags::CPUID_SNAPSHOT != 0;
            let (cpuid, site_bytes) = if snapshot {
                let cpuid = CPUID_SNAPSHOT_LEAVES
                    .iter()
                    .map(|&(leaf, sub)| timing::query_cpuid(CpuidCall::Instruction, leaf, sub))
                    .collect();
                (cpuid, timing::cpuid_site_bytes().to_vec())
            } else {
                (Vec::new(), Vec::new())
            };
            Ok(NativeRun {
                results: Results {
                    samples,
                    ticks,
                    counter_rate,
                    cpuid,
                    site_bytes,
                    verdict: None,
                    clocks,
                },
                cpu,
                run: started.elapsed(),
            })
        })
        .map_err(NativeError::Thread)?;
    let run = thread.join().map_err(|_| NativeError::Panicked)?;
    drop(counter);
    run
}

/// Where a payload's native twin lives, by the SDK's convention: `NAME.elf` has its twin
/// in `NAME.native` beside it (any other name: the name with `.native` appended).
pub fn twin_of(payload: &Path) -> PathBuf {
    let twin = match payload.extension() {
        Some(ext) if ext == "elf" => payload.with_extension("native"),
        _ => {
            let mut name = payload.as_os_str().to_owned();
            name.push(".native");
            PathBuf::from(name)
        }
    };
    // Beside the payload, however it was spelt: a bare name is not looked up on PATH.
    if twin.is_absolute() || twin.starts_with(".") {
        twin
    } else {
        Path::new(".").join(twin)
    }
}

/// The largest result file a twin may write (the same bound as guest RAM).
const MAX_TWIN_RESULT: u64 = guest_payload::layout::IDENTITY_MAP_BYTES;

/// The user a native twin runs as when vmm runs as root (`--twin-user`): `None` keeps
/// the default, `nobody`; "root" keeps root's privileges (no_new_privs still applies).
static TWIN_USER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Sets who twins run as, once, from the command line.
pub fn set_twin_user(user: Option<String>) {
    let _ = TWIN_USER.set(user);
}

/// An unprivileged identity for a twin.
#[derive(Clone, Copy, Debug)]
struct TwinIdentity {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// Who the twin runs as: `None` to run as this process (not root, or told `root`).
fn twin_identity() -> Result<Option<TwinIdentity>, NativeError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = TWIN_USER
        .get()
        .cloned()
        .flatten()
        .unwrap_or_else(|| "nobody".to_owned());
    if name == "root" {
        return Ok(None);
    }
    let unknown = || NativeError::TwinUser {
        user: name.clone(),
        why: "no such user".into(),
    };
    let c_name = std::ffi::CString::new(name.clone()).map_err(|_| unknown())?;
    // SAFETY: `passwd` is plain C data; all zeroes is a valid (empty) value.
    let mut record: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `record` and `buffer`, both alive and sized as given.
    let status = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut record,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if status != 0 || found.is_null() {
        return Err(unknown());
    }
    if record.pw_uid == 0 {
        return Ok(None);
    }
    Ok(Some(TwinIdentity {
        uid: record.pw_uid,
        gid: record.pw_gid,
    }))
}

/// What of a twin's stderr is kept (for `--console` and error messages); the rest is
/// read and dropped, so a twin that writes a lot never blocks on a full pipe.
const MAX_TWIN_STDERR: usize = 64 * 1024;

/// A twin's stderr, drained on a thread of its own while the twin runs.
fn drain(pipe: Option<std::process::ChildStderr>) -> std::thread::JoinHandle<(Vec<u8>, u64)> {
    std::thread::spawn(move || {
        use std::io::Read;
        let (mut kept, mut dropped) = (Vec::new(), 0u64);
        let Some(mut pipe) = pipe else { return (kept, dropped) };
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = MAX_TWIN_STDERR.saturating_sub(kept.len()).min(n);
                    kept.extend_from_slice(&buf[..room]);
                    dropped += (n - room) as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        (kept, dropped)
    })
}

/// Ends the twin's whole process group: a grandchild it left behind ends with it.
fn end_group(child: &mut std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: a signal to the process group the twin leads (set up before exec).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
}

/// Runs a payload's native twin pinned to one CPU, as `TWIN CONFIG_FILE RESULT_FILE`,
/// stopped at `timeout`; reads the result block it wrote in the guest's format. What the
/// twin wrote to stderr (its `vmm_print` lines) goes to `console` where one is given.
pub fn run_twin(
    twin: &Path,
    config: &Config,
    placement: Placement,
    timeout: Duration,
    console: Option<&mut (dyn std::io::Write + Send)>,
) -> Result<NativeRun, NativeError> {
    let cpu = placement.timing;
    let name = twin.display().to_string();
    let io = |source| NativeError::Twin {
        twin: name.clone(),
        source,
    };
    let config = Config {
        result_capacity: crate::vm::memory::result_capacity_for(config).map_err(|e| NativeError::TwinResults {
            twin: name.clone(),
            why: e.to_string(),
        })?,
        ..*config
    };
    let dir = scratch_dir().map_err(io)?;
    let (config_file, result_file) = (dir.path.join("config"), dir.path.join("result"));
    std::fs::write(&config_file, config.as_bytes()).map_err(io)?;
    // As root, the twin runs as an unprivileged user (--twin-user), from a copy in a
    // directory of its own that only that user may enter: wherever the twin lives, it can
    // run, and it can write its result and nothing of root's.
    let identity = twin_identity()?;
    let program = match identity {
        None => twin.to_path_buf(),
        Some(who) => {
            let copy = dir.path.join("twin");
            std::fs::copy(twin, &copy).map_err(io)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o500)).map_err(io)?;
            for path in [&copy, &config_file, &dir.path] {
                std::os::unix::fs::chown(path, Some(who.uid), Some(who.gid)).map_err(io)?;
            }
            copy
        }
    };
    let mut command = std::process::Command::new(&program);
    command
        .arg(&config_file)
        .arg(&result_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls on the child itself:
    // setpgid (a group of its own, ended as one), no_new_privs, dropping to the twin's
    // user (groups, gid, then uid), and sched_setaffinity, with everything they need
    // built before the fork.
    unsafe {
        use std::os::unix::process::CommandExt;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(who) = identity {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(who.gid) != 0 || libc::setuid(who.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = command.spawn().map_err(io)?;
    let stderr_thread = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() > timeout => {
                break Err(NativeError::TwinHung {
                    twin: name.clone(),
                    timeout,
                })
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(error) => break Err(io(error)),
        }
    };
    let run = started.elapsed();
    // Whatever the twin left running in its group ends here, so the pipe closes.
    end_group(&mut child);
    let _ = child.wait();
    let (stderr_bytes, dropped) = stderr_thread.join().unwrap_or_default();
    if let Some(console) = console {
        let _ = console.write_all(&stderr_bytes);
        if dropped > 0 {
            let _ = writeln!(console, "[vmm: {dropped} more bytes of the twin's stderr dropped]");
        }
    }
    let status = status?;
    if !status.success() {
        let text = String::from_utf8_lossy(&stderr_bytes[..stderr_bytes.len().min(4096)]).into_owned();
        let stderr = match text.trim() {
            "" => String::new(),
            text => format!(": {}", text.escape_debug()),
        };
        // The SDK's twin exits with NATIVE_TWIN_STATUS_BASE + status when its detector
        // stopped with a status other than ok, as a guest rings it on the done port.
        let stopped = status
            .code()
            .and_then(|code| {
                u32::try_from(code)
                    .ok()?
                    .checked_sub(guest_payload::NATIVE_TWIN_STATUS_BASE)
            })
            .filter(|&value| {
                value != guest_payload::Status::Ok as u32 && guest_payload::Status::from_u32(value).is_some()
            });
        return Err(match stopped {
            Some(value) => NativeError::TwinStatus {
                twin: name,
                value,
                stderr,
            },
            None => NativeError::TwinFailed {
                twin: name,
                status: status.to_string(),
                stderr,
            },
        });
    }
    let bytes = read_capped(&result_file, MAX_TWIN_RESULT).map_err(io)?;
    let results = crate::results::parse_results(&config, |offset, len| {
        let start = usize::try_from(offset).map_err(|_| ResultsError::Invalid("a sample offset overflows"))?;
        start
            .checked_add(len)
            .and_then(|end| bytes.get(start..end))
            .map(<[u8]>::to_vec)
            .ok_or(ResultsError::Invalid("the result file is shorter than its header says"))
    })
    .map_err(|e| NativeError::TwinResults {
        twin: name.clone(),
        why: e.to_string(),
    })?;
    Ok(NativeRun { results, cpu, run })
}

/// A file's bytes, refused past `cap`, and refused unless it is a regular file: a twin
/// that leaves a FIFO or a link to a device there cannot stall or flood the VMM.
fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::other(format!("larger than {cap} bytes")));
    }
    Ok(bytes)
}

/// A private directory removed on drop.
struct ScratchDir {
    path: PathBuf,
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn scratch_dir() -> std::io::Result<ScratchDir> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "vmm-twin-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&path)?;
    Ok(ScratchDir { path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_cpu() -> Placement {
        Placement::choose(None, false).unwrap()
    }

    #[test]
    fn native_run_fills_every_probe_on_the_chosen_cpu() {
        let config = Config {
            iterations: 200,
            warmup: 10,
            probes: 0b111,
            ..Default::default()
        };
        let cpu = crate::host::allowed_cpus()[0];
        let placement = Placement {
            timing: cpu,
            counter: None,
        };
        let run = run(&config, placement, Duration::from_secs(60)).unwrap();
        assert_eq!(run.cpu, cpu);
        assert_eq!(run.results.samples.len(), 3);
        assert!(run.results.samples.values().all(|s| s.len() == 200));
    }

    #[test]
    fn twins_sit_beside_their_payloads() {
        assert_eq!(twin_of(Path::new("/x/pafish.elf")), PathBuf::from("/x/pafish.native"));
        assert_eq!(twin_of(Path::new("detector")), PathBuf::from("./detector.native"));
        assert_eq!(twin_of(Path::new("d/p.elf")), PathBuf::from("./d/p.native"));
        assert_eq!(twin_of(Path::new("./p.elf")), PathBuf::from("./p.native"));
    }

    #[test]
    fn a_twin_that_fails_or_hangs_is_reported_as_such() {
        let config = Config {
            magic: guest_payload::CONFIG_MAGIC,
            abi_version: guest_payload::ABI_VERSION,
            iterations: 1,
            probes: 1,
            ..Default::default()
        };
        let failed = run_twin(
            Path::new("/bin/false"),
            &config,
            any_cpu(),
            Duration::from_secs(5),
            None,
        );
        assert!(matches!(failed, Err(NativeError::TwinFailed { .. })), "{failed:?}");
        let silent = run_twin(Path::new("/bin/true"), &config, any_cpu(), Duration::from_secs(5), None);
        assert!(
            matches!(silent, Err(NativeError::Twin { .. })),
            "no result file: {silent:?}"
        );
        // A detector that stopped with a status (3: its samples do not fit) says which.
        let stopped = std::env::temp_dir().join(format!("vmm-test-{}-status.sh", std::process::id()));
        std::fs::write(&stopped, "#!/bin/sh\nexit 13\n").unwrap();
        std::fs::set_permissions(&stopped, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let status = run_twin(&stopped, &config, any_cpu(), Duration::from_secs(5), None);
        std::fs::remove_file(&stopped).ok();
        match status {
            Err(error @ NativeError::TwinStatus { value: 3, .. }) => {
                assert!(error.to_string().contains("do not fit the result area"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        let script = std::env::temp_dir().join(format!("vmm-test-{}-sleep.sh", std::process::id()));
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let started = Instant::now();
        let hung = run_twin(&script, &config, any_cpu(), Duration::from_millis(200), None);
        std::fs::remove_file(&script).ok();
        assert!(matches!(hung, Err(NativeError::TwinHung { .. })), "{hung:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A twin that floods stderr is drained while it runs (not killed as hung), its text
    /// reaches the console, bounded; a FIFO left at the result path is refused, not read.
    #[test]
    fn a_twin_that_floods_stderr_and_leaves_a_fifo_neither_blocks_nor_hangs() {
        let config = Config::default();
        let script = std::env::temp_dir().join(format!("vmm-test-{}-flood.sh", std::process::id()));
        std::fs::write(
            &script,
            "#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\0' x >&2\nrm -f \"$2\"; mkfifo \"$2\"\nexit 0\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut console: Vec<u8> = Vec::new();
        let started = Instant::now();
        let run = run_twin(&script, &config, any_cpu(), Duration::from_secs(20), Some(&mut console));
        std::fs::remove_file(&script).ok();
        assert!(started.elapsed() < Duration::from_secs(10));
        let error = run.expect_err("a FIFO is no result file").to_string();
        assert!(error.contains("not a regular file"), "{error}");
        assert_eq!(console.iter().filter(|&&b| b == b'x').count(), MAX_TWIN_STDERR);
        let text = String::from_utf8_lossy(&console);
        assert!(
            text.contains("more bytes of the twin's stderr dropped"),
            "{}",
            &text[text.len() - 80..]
        );
    }

    #[test]
    fn a_twin_is_found_beside_its_payload_whatever_the_spelling() {
        assert_eq!(twin_of(Path::new("p.elf")), PathBuf::from("./p.native"));
    }

    #[test]
    fn a_cpu_outside_the_affinity_mask_is_refused() {
        assert!(matches!(
            Placement::choose(Some(100_000), false),
            Err(AffinityError::CpuNotAllowed { .. })
        ));
    }
}
