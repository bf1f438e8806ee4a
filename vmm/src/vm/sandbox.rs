//! The vCPU threads' sandbox: once a VM's file descriptors are open, the thread that runs
//! a vCPU needs only KVM's vCPU ioctls, its allocator, futexes and signals. A seccomp
//! filter (installed per thread with seccompiler, as Firecracker does for its vCPU threads)
//! allows exactly that, so a guest that found a bug in the exit path could not open a
//! file, a socket or a process from there.
//!
//! The program is written here, instruction by instruction, rather than generated from
//! seccompiler's rules: installing a filter costs the kernel time in proportion to its
//! length (it checks it, translates it and evaluates it for every system call number to
//! fill its action cache), paid once per VM. seccompiler's rules for the same policy made
//! 189 instructions (each ioctl request repeated the descriptor check) and ~110-160 µs per
//! install here; this one checks the descriptor once and is well under half that length.
//!
//! A forbidden call fails with EPERM rather than killing the process: the VMM reports it as
//! the error it is, and every measurement already taken is kept.
//!
//! Arguments are checked where a call could reach beyond the thread's job: KVM ioctls only
//! on the thread's own vCPU descriptor, `write` only to stderr (a panic's message), `mmap`
//! never with PROT_EXEC.

use kvm_bindings::{kvm_device_attr, kvm_guest_debug, kvm_msrs, kvm_regs, kvm_sregs, kvm_vcpu_events, KVMIO};
use seccompiler::{sock_filter, BpfProgram};
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::Mutex;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_SET_GUEST_DEBUG, KVMIO, 0x9b, kvm_guest_debug);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the vCPU threads' seccomp filter: {0}")]
    Build(String),
    #[error("cannot install the seccomp filter on a vCPU thread: {0}")]
    Install(String),
}

/// The system calls a vCPU thread makes once its VM is set up, and why.
const ALLOWED: &[(libc::c_long, &str)] = &[
    (
        libc::SYS_ioctl,
        "KVM's vCPU ioctls only (see KVM_IOCTLS), on the thread's own vCPU fd",
    ),
    (libc::SYS_futex, "locks, channels, joining"),
    (libc::SYS_mmap, "the allocator (never PROT_EXEC)"),
    (libc::SYS_munmap, "the allocator, and the thread's exit"),
    (libc::SYS_mremap, "the allocator"),
    (libc::SYS_madvise, "the allocator, and the thread's exit"),
    (libc::SYS_brk, "the allocator"),
    (libc::SYS_rt_sigreturn, "returning from the watchdog's kick signal"),
    (libc::SYS_rt_sigprocmask, "the thread's exit"),
    (libc::SYS_sigaltstack, "the thread's exit"),
    (libc::SYS_sched_yield, "waiting for the counter vCPU"),
    (libc::SYS_nanosleep, "waiting for the counter vCPU"),
    (libc::SYS_clock_nanosleep, "waiting for the counter vCPU"),
    (libc::SYS_clock_gettime, "Instant::now where the vDSO is not used"),
    (libc::SYS_getrandom, "a HashMap's keys"),
    (libc::SYS_gettid, "signals to itself"),
    (libc::SYS_getpid, "a panic's abort"),
    (libc::SYS_tgkill, "a panic's abort"),
    (libc::SYS_write, "a panic's message on stderr (fd 2 only)"),
    (libc::SYS_exit, "the thread's end"),
    (libc::SYS_exit_group, "a panic's abort"),
];

/// The vCPU ioctls a run makes: running, registers, guest debug (and the guest's own
/// exceptions it catches, reflected back), TSC moves and reads.
fn kvm_ioctls() -> [(u64, &'static str); 13] {
    [
        (KVM_RUN(), "KVM_RUN"),
        (KVM_GET_REGS(), "KVM_GET_REGS"),
        (KVM_SET_REGS(), "KVM_SET_REGS"),
        (KVM_GET_SREGS(), "KVM_GET_SREGS"),
        (KVM_GET_MSRS(), "KVM_GET_MSRS"),
        (KVM_SET_MSRS(), "KVM_SET_MSRS"),
        (KVM_SET_GUEST_DEBUG(), "KVM_SET_GUEST_DEBUG"),
        (KVM_GET_VCPU_EVENTS(), "KVM_GET_VCPU_EVENTS"),
        (KVM_SET_VCPU_EVENTS(), "KVM_SET_VCPU_EVENTS"),
        (KVM_GET_TSC_KHZ(), "KVM_GET_TSC_KHZ"),
        (KVM_SET_DEVICE_ATTR(), "KVM_SET_DEVICE_ATTR"),
        (KVM_GET_DEVICE_ATTR(), "KVM_GET_DEVICE_ATTR"),
        (KVM_HAS_DEVICE_ATTR(), "KVM_HAS_DEVICE_ATTR"),
    ]
}

// Classic BPF, as seccomp runs it (linux/filter.h, linux/seccomp.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_AND_K: u16 = 0x54;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `struct seccomp_data`: the syscall number, the architecture, then the arguments (eight
/// bytes each; the low half of a little-endian argument comes first).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const fn data_arg_low(arg: u32) -> u32 {
    16 + 8 * arg
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

/// A program under construction, whose jumps name labels resolved at the end.
#[derive(Default)]
struct Program {
    code: Vec<sock_filter>,
    /// (instruction, its true-branch label, its false-branch label); `None` falls through.
    jumps: Vec<(usize, Option<Label>, Option<Label>)>,
    labels: BTreeMap<Label, usize>,
}

/// Where a jump goes: a block's start, or one of its two verdicts. BPF jumps only
/// forward, so each block ends with verdicts of its own.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Label {
    Start(Block),
    Allow(Block),
    Refuse(Block),
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Block {
    Calls,
    Ioctl,
    Write,
    Mmap,
}

impl Program {
    fn push(&mut self, instruction: sock_filter) {
        self.code.push(instruction);
    }

    /// If the accumulator equals `k`, go to `then`, else to `otherwise` (`None`: next).
    fn jeq(&mut self, k: u32, then: Option<Label>, otherwise: Option<Label>) {
        self.jumps.push((self.code.len(), then, otherwise));
        self.push(sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 0,
            k,
        });
    }

    fn label(&mut self, label: Label) {
        self.labels.insert(label, self.code.len());
    }

    /// The block's two verdicts: refused with EPERM, allowed.
    fn verdicts(&mut self, block: Block) {
        self.label(Label::Refuse(block));
        self.push(stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32));
        self.label(Label::Allow(block));
        self.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    }

    fn finish(mut self) -> Result<BpfProgram, SandboxError> {
        for &(at, then, otherwise) in &self.jumps {
            let offset = |label: Option<Label>| -> Result<u8, SandboxError> {
                let Some(label) = label else { return Ok(0) };
                let target = self.labels.get(&label).copied().unwrap_or(usize::MAX);
                target
                    .checked_sub(at + 1)
                    .and_then(|o| u8::try_from(o).ok())
                    .ok_or_else(|| SandboxError::Build("a jump out of reach".into()))
            };
            let (jt, jf) = (offset(then)?, offset(otherwise)?);
            self.code[at].jt = jt;
            self.code[at].jf = jf;
        }
        Ok(self.code)
    }
}

fn build(vcpu_fd: RawFd) -> Result<BpfProgram, SandboxError> {
    let fd = u32::try_from(vcpu_fd).map_err(|_| SandboxError::Build(format!("no vCPU descriptor ({vcpu_fd})")))?;
    let mut p = Program::default();
    use Block::{Calls, Ioctl, Mmap, Write};
    // Another architecture's system call numbers mean other calls: none is made here.
    p.push(stmt(BPF_LD_W_ABS, DATA_ARCH));
    p.jeq(AUDIT_ARCH_X86_64, None, Some(Label::Refuse(Calls)));
    p.push(stmt(BPF_LD_W_ABS, DATA_NR));
    p.jeq(libc::SYS_ioctl as u32, Some(Label::Start(Ioctl)), None);
    p.jeq(libc::SYS_write as u32, Some(Label::Start(Write)), None);
    p.jeq(libc::SYS_mmap as u32, Some(Label::Start(Mmap)), None);
    for &(call, _) in ALLOWED {
        if ![libc::SYS_ioctl, libc::SYS_write, libc::SYS_mmap].contains(&call) {
            p.jeq(call as u32, Some(Label::Allow(Calls)), None);
        }
    }
    p.verdicts(Calls);
    // ioctl(fd, request, ...): the thread's own vCPU, one of the requests a run makes (the
    // kernel reads both as 32-bit values).
    p.label(Label::Start(Ioctl));
    p.push(stmt(BPF_LD_W_ABS, data_arg_low(0)));
    p.jeq(fd, None, Some(Label::Refuse(Ioctl)));
    p.push(stmt(BPF_LD_W_ABS, data_arg_low(1)));
    for (request, _) in kvm_ioctls() {
        let request = u32::try_from(request).map_err(|_| SandboxError::Build(format!("ioctl {request:#x}")))?;
        p.jeq(request, Some(Label::Allow(Ioctl)), None);
    }
    p.verdicts(Ioctl);
    // write(2, ...) only: a panic's message.
    p.label(Label::Start(Write));
    p.push(stmt(BPF_LD_W_ABS, data_arg_low(0)));
    p.jeq(2, Some(Label::Allow(Write)), Some(Label::Refuse(Write)));
    p.verdicts(Write);
    // mmap(addr, len, prot, ...) never with PROT_EXEC.
    p.label(Label::Start(Mmap));
    p.push(stmt(BPF_LD_W_ABS, data_arg_low(2)));
    p.push(stmt(BPF_AND_K, libc::PROT_EXEC as u32));
    p.jeq(0, Some(Label::Allow(Mmap)), Some(Label::Refuse(Mmap)));
    p.verdicts(Mmap);
    p.finish()
}

/// The filter for a thread whose vCPU descriptor is `vcpu_fd`, built once per descriptor
/// number (VMs come and go; their descriptors' numbers repeat).
fn program(vcpu_fd: RawFd) -> Result<BpfProgram, SandboxError> {
    static PROGRAMS: Mutex<BTreeMap<RawFd, BpfProgram>> = Mutex::new(BTreeMap::new());
    let mut programs = PROGRAMS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(program) = programs.get(&vcpu_fd) {
        return Ok(program.clone());
    }
    let program = build(vcpu_fd)?;
    programs.insert(vcpu_fd, program.clone());
    Ok(program)
}

/// Puts the calling thread (a vCPU thread, its VM set up, `vcpu_fd` its vCPU) under the
/// filter, for good.
pub fn enter(vcpu_fd: RawFd) -> Result<(), SandboxError> {
    seccompiler::apply_filter(&program(vcpu_fd)?).map_err(|e| SandboxError::Install(e.to_string()))
}

/// How many system calls (and KVM ioctls) the filter allows: for `doctor`.
pub fn allowed_counts() -> (usize, usize) {
    (ALLOWED.len(), kvm_ioctls().len())
}

/// The seccomp mode of thread `tid` of this process as the kernel reports it (0 none,
/// 2 filter).
pub fn seccomp_mode_of(tid: libc::pid_t) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Seccomp:"))
        .and_then(|mode| mode.trim().parse().ok())
}

/// What a thread finds once under the filter, as seen by another (the sandboxed one may
/// not read /proc itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfTest {
    /// The thread's seccomp mode after [`enter`].
    pub mode: Option<u32>,
    /// The errno of `openat("/proc/self/status")` from inside the filter.
    pub open_errno: Option<i32>,
    /// The errno of `socket(AF_UNIX)` from inside the filter.
    pub socket_errno: Option<i32>,
    /// The errno of a `write` to stdout (fd 1), an `mmap` with PROT_EXEC, and KVM_RUN on a
    /// descriptor that is not the thread's vCPU.
    pub stdout_errno: Option<i32>,
    pub exec_mmap_errno: Option<i32>,
    pub foreign_ioctl_errno: Option<i32>,
    /// The errno of a listed KVM request on the thread's own descriptor (the filter lets
    /// it through: the descriptor itself refuses it, ENOTTY) and of an unlisted one (EPERM).
    pub own_ioctl_errno: Option<i32>,
    pub unlisted_ioctl_errno: Option<i32>,
}

/// The self-test's stand-in vCPU descriptor: stderr (open in every process; the test's
/// ioctl goes to stdin, which is not it).
const STAND_IN_VCPU_FD: RawFd = 2;

/// Puts a thread of its own under the filter, reads its mode from outside, then has it try
/// two calls no vCPU thread makes: the proof `doctor` and the tests show.
pub fn self_test() -> Result<SelfTest, SandboxError> {
    use std::sync::mpsc::channel;
    let (entered_tx, entered) = channel::<Result<libc::pid_t, SandboxError>>();
    let (go, go_rx) = channel::<()>();
    let thread = std::thread::Builder::new()
        .name("vmm-sandbox-test".into())
        .spawn(move || -> [Option<i32>; 7] {
            // SAFETY: gettid has no arguments.
            let tid = unsafe { libc::gettid() };
            // A stand-in for the vCPU's descriptor: one that is open, and not stdout.
            if let Err(error) = enter(STAND_IN_VCPU_FD) {
                let _ = entered_tx.send(Err(error));
                return [None; 7];
            }
            let _ = entered_tx.send(Ok(tid));
            if go_rx.recv().is_err() {
                return [None; 7];
            }
            // Read at once: the next call overwrites errno.
            let errno =
                |ret: libc::c_long| (ret < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            // SAFETY: plain system calls with valid arguments; an fd opened is closed below.
            let open = unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/proc/self/status".as_ptr(),
                    libc::O_RDONLY,
                )
            };
            let open_errno = errno(open);
            // SAFETY: as above.
            let socket = unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            let socket_errno = errno(socket);
            for fd in [open, socket].into_iter().filter(|&fd| fd >= 0) {
                // SAFETY: an fd this thread just opened (close itself is then refused, and
                // the fd leaks: only if the filter failed, which the result says).
                unsafe { libc::close(fd as libc::c_int) };
            }
            // SAFETY: a zero-length write; an anonymous mapping unmapped if it was made; an
            // ioctl on stdin, which no KVM request can harm.
            let stdout = errno(unsafe { libc::syscall(libc::SYS_write, 1, c"".as_ptr(), 0) });
            // SAFETY: an anonymous mapping at an address of the kernel's choosing.
            let exec = unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            let exec_errno = errno(exec);
            if exec != -1 {
                // SAFETY: the mapping just made.
                unsafe { libc::munmap(exec as *mut libc::c_void, 4096) };
            }
            // SAFETY: an ioctl on stdin with a null argument; no KVM request can harm it.
            let foreign = errno(unsafe { libc::syscall(libc::SYS_ioctl, 0, KVM_GET_TSC_KHZ(), 0) });
            // SAFETY: as above, on the stand-in descriptor (stderr): a KVM request the
            // filter lists, and a terminal request it does not (TIOCGPGRP, into a local).
            let own = errno(unsafe { libc::syscall(libc::SYS_ioctl, STAND_IN_VCPU_FD, KVM_GET_TSC_KHZ(), 0) });
            let mut group: libc::pid_t = 0;
            // SAFETY: TIOCGPGRP writes one pid_t to a valid local.
            let unlisted =
                errno(unsafe { libc::syscall(libc::SYS_ioctl, STAND_IN_VCPU_FD, libc::TIOCGPGRP, &mut group) });
            [open_errno, socket_errno, stdout, exec_errno, foreign, own, unlisted]
        })
        .map_err(|e| SandboxError::Install(format!("cannot start a thread: {e}")))?;
    let entered = entered
        .recv()
        .map_err(|_| SandboxError::Install("the test thread ended early".into()));
    let mode = match &entered {
        Ok(Ok(tid)) => seccomp_mode_of(*tid),
        _ => None,
    };
    let _ = go.send(());
    let [open_errno, socket_errno, stdout_errno, exec_mmap_errno, foreign_ioctl_errno, own_ioctl_errno, unlisted_ioctl_errno] =
        thread
            .join()
            .map_err(|_| SandboxError::Install("the test thread panicked".into()))?;
    entered??;
    Ok(SelfTest {
        mode,
        open_errno,
        socket_errno,
        stdout_errno,
        exec_mmap_errno,
        foreign_ioctl_errno,
        own_ioctl_errno,
        unlisted_ioctl_errno,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_allows_each_listed_call_once() {
        let program = program(7).unwrap();
        assert!(program.len() < 90, "{} instructions: keep it short", program.len());
        assert!(build(-1).is_err(), "no descriptor, no filter");
        let mut calls: Vec<_> = ALLOWED.iter().map(|(call, _)| call).collect();
        calls.sort();
        calls.dedup();
        assert_eq!(calls.len(), ALLOWED.len());
        let mut ioctls: Vec<_> = kvm_ioctls().iter().map(|(request, _)| *request).collect();
        ioctls.sort();
        ioctls.dedup();
        assert_eq!(ioctls.len(), kvm_ioctls().len());
        // The numbers KVM's header gives (linux/kvm.h): a typo here would refuse a run.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_GUEST_DEBUG(), 0x4048_ae9b);
    }

    #[test]
    fn a_sandboxed_thread_is_in_filter_mode_and_cannot_open_files_or_sockets() {
        let test = self_test().unwrap();
        assert_eq!(test.mode, Some(2), "{test:?}");
        assert_eq!(test.open_errno, Some(libc::EPERM), "{test:?}");
        assert_eq!(test.socket_errno, Some(libc::EPERM), "{test:?}");
        assert_eq!(test.stdout_errno, Some(libc::EPERM), "write to stdout: {test:?}");
        assert_eq!(test.exec_mmap_errno, Some(libc::EPERM), "PROT_EXEC: {test:?}");
        assert_eq!(test.foreign_ioctl_errno, Some(libc::EPERM), "another fd: {test:?}");
        assert_ne!(test.own_ioctl_errno, Some(libc::EPERM), "a listed request: {test:?}");
        assert!(test.own_ioctl_errno.is_some(), "stderr is no vCPU: {test:?}");
        assert_eq!(
            test.unlisted_ioctl_errno,
            Some(libc::EPERM),
            "an unlisted request: {test:?}"
        );
        // The filter is per thread: this one is untouched.
        // SAFETY: gettid has no arguments.
        assert_eq!(seccomp_mode_of(unsafe { libc::gettid() }), Some(0));
    }
}
