//! One timing CPU per run: an advisory lock per host CPU, taken by every timed run (VM or
//! native), so that two `vmm` processes on one host never time on the same CPU without
//! saying so. A second process waits for the CPU (saying so), or is refused, or — told
//! `--cpu-lock off` — shares it knowingly.
//!
//! The lock is `flock(2)` on a file per CPU in a directory every process on the host sees
//! (`VMM_LOCK_DIR`, else `/dev/shm`, else the temporary directory). The kernel drops it
//! when the process ends, however it ends: no stale lock survives a crash.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// What a process does when the CPU it would time on is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuLockPolicy {
    /// Wait until the other process is done with it, saying so.
    #[default]
    Wait,
    /// Refuse the run, naming the CPU and the process that holds it.
    Fail,
    /// Take no lock: time on the CPU whoever else does.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuLockError {
    #[error("CPU {cpu} is being timed on by another vmm process{holder} (--cpu-lock fail): wait with --cpu-lock wait, choose another with --cpu, or share it with --cpu-lock off")]
    Busy { cpu: usize, holder: String },
    #[error("cannot open the CPU lock file {path}: {source} (set VMM_LOCK_DIR to a directory every vmm process on this host can write, or --cpu-lock off)")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("interrupted while waiting for CPU {cpu}")]
    Interrupted { cpu: usize },
}

static POLICY: OnceLock<CpuLockPolicy> = OnceLock::new();

/// The process's policy, set once from the command line (`--cpu-lock`).
pub fn set_policy(policy: CpuLockPolicy) {
    let _ = POLICY.set(policy);
}

pub fn policy() -> CpuLockPolicy {
    POLICY.get().copied().unwrap_or_default()
}

fn lock_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMM_LOCK_DIR") {
        return PathBuf::from(dir);
    }
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        return shm;
    }
    std::env::temp_dir()
}

/// The CPUs this process holds, each until it ends (or the value is dropped).
#[derive(Debug)]
pub struct CpuLocks {
    dir: PathBuf,
    held: HashMap<usize, File>,
}

impl Default for CpuLocks {
    fn default() -> Self {
        Self::in_dir(lock_dir())
    }
}

impl CpuLocks {
    /// Locks kept as files in `dir`.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self {
            dir,
            held: HashMap::new(),
        }
    }

    /// The path of CPU `cpu`'s lock file.
    pub fn path(&self, cpu: usize) -> PathBuf {
        self.dir.join(format!("vmm-cpu-{cpu}.lock"))
    }

    /// Takes `cpu`'s lock under `policy`; `Ok(false)` only under `Off` (nothing taken).
    /// `say` is told once if the process is about to wait.
    pub fn take(
        &mut self,
        cpu: usize,
        policy: CpuLockPolicy,
        interrupted: &dyn Fn() -> bool,
        say: &mut dyn FnMut(&str),
    ) -> Result<bool, CpuLockError> {
        if policy == CpuLockPolicy::Off {
            return Ok(false);
        }
        if self.held.contains_key(&cpu) {
            return Ok(true);
        }
        let path = self.path(cpu);
        let mut file = open(&path)?;
        let mut waited = false;
        while !try_lock(&file, &path)? {
            let holder = holder(&mut file);
            if policy == CpuLockPolicy::Fail {
                return Err(CpuLockError::Busy { cpu, holder });
            }
            if !waited {
                say(&format!(
                    "vmm: CPU {cpu} is being timed on by another vmm process{holder}: waiting for it \
                     (--cpu-lock fail refuses instead, --cpu another CPU, --cpu-lock off shares it)"
                ));
                waited = true;
            }
            if interrupted() {
                return Err(CpuLockError::Interrupted { cpu });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.hold(cpu, file);
        Ok(true)
    }

    /// Is `cpu` free right now (not held by another process)? Takes it if so.
    pub fn try_take(&mut self, cpu: usize) -> Result<bool, CpuLockError> {
        if self.held.contains_key(&cpu) {
            return Ok(true);
        }
        let path = self.path(cpu);
        let file = open(&path)?;
        if try_lock(&file, &path)? {
            self.hold(cpu, file);
            return Ok(true);
        }
        Ok(false)
    }

    /// Keeps `file`'s lock, writing this process's id into it for a process that finds
    /// the CPU taken (best effort: another user's file may be open read-only).
    fn hold(&mut self, cpu: usize, mut file: File) {
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()));
        self.held.insert(cpu, file);
    }

    pub fn holds(&self, cpu: usize) -> bool {
        self.held.contains_key(&cpu)
    }
}

fn open(path: &std::path::Path) -> Result<File, CpuLockError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    match opened {
        Ok(file) => {
            // Another user's vmm must be able to open it too (the umask narrowed it).
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));
            Ok(file)
        }
        // Another user's file: flock works on a descriptor opened for reading.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| CpuLockError::Open {
                path: path.to_path_buf(),
                source,
            }),
        Err(source) => Err(CpuLockError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn try_lock(file: &File, path: &std::path::Path) -> Result<bool, CpuLockError> {
    loop {
        // SAFETY: flock on a descriptor this File owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => {
                return Err(CpuLockError::Lock {
                    path: path.to_path_buf(),
                    source: error,
                })
            }
        }
    }
}

/// " (pid N)" from the lock file, where the holder wrote it.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.take(32).read_to_string(&mut text));
    match text.trim().parse::<u32>() {
        Ok(pid) => format!(" (pid {pid})"),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two holders in one process stand for two processes: flock locks belong to the open
    /// file description, so a second open of the same file is refused while the first
    /// holds it, and gets it once the first is dropped.
    #[test]
    fn a_second_holder_is_refused_or_waits_until_the_first_is_gone() {
        let dir = std::env::temp_dir().join(format!("vmm-cpu-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cpu = 7;
        let mut first = CpuLocks::in_dir(dir.clone());
        assert!(first.take(cpu, CpuLockPolicy::Fail, &|| false, &mut |_| {}).unwrap());
        let mut second = CpuLocks::in_dir(dir.clone());
        let refused = second.take(cpu, CpuLockPolicy::Fail, &|| false, &mut |_| {});
        let message = refused.unwrap_err().to_string();
        assert!(
            message.contains(&format!("CPU {cpu}")) && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(!second.try_take(cpu).unwrap());
        // Waiting says so, and stops when told to.
        let mut said = Vec::new();
        let waited = second.take(cpu, CpuLockPolicy::Wait, &|| true, &mut |s| said.push(s.to_owned()));
        assert!(matches!(waited, Err(CpuLockError::Interrupted { .. })));
        assert!(said[0].contains("waiting for it"), "{said:?}");
        assert!(!second.take(cpu, CpuLockPolicy::Off, &|| false, &mut |_| {}).unwrap());
        drop(first);
        assert!(second.take(cpu, CpuLockPolicy::Fail, &|| false, &mut |_| {}).unwrap());
        assert!(second.holds(cpu));
        std::fs::remove_dir_all(&dir).ok();
    }
}
