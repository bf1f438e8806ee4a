//! How CPUID reaches whoever answers it (`--mode`), and the VMM's exit handling per mode.
//!
//! | mode | on `cpuid` | handled by |
//! |---|---|---|
//! | `native` | executes on the host CPU | hardware |
//! | `hw-assist` | VM exit, emulated inside KVM | KVM (userspace never sees it) |
//! | `trap-emulate` | traps to this VMM, emulated from its CPUID table | the VMM |
//! | `paravirt` | the guest asks the VMM by hypercall instead | the VMM |
//!
//! [`handle_exit`] dispatches one exit, whatever the mode, to the mode's
//! [`CpuidExitHandler`]: a free function over the [`Vcpu`] trait, so every path is
//! unit-tested with made-up exits and a simulated vCPU.

use crate::arch::x86_64::cpuid::CpuidTable;
use crate::vm::exits::{Exit, ExitHandler, ExitKind, Flow, HandlerError};
use crate::vm::vcpu::{Vcpu, VcpuError};
use guest_payload::ports;
use kvm_bindings::kvm_regs;
use std::io::Write;
use std::str::FromStr;

pub mod hw_assist;
pub mod paravirt;
pub mod trap_emulate;

use trap_emulate::Trap;

/// The `--mode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The timing core runs in a pinned host thread: no VM at all.
    Native,
    /// CPUID exits to KVM, which emulates it in the kernel (the ordinary VM case).
    HwAssist,
    /// CPUID traps to this VMM (see --trap), which emulates it from its CPUID table.
    TrapEmulate,
    /// The guest asks this VMM for CPUID with a hypercall (port I/O) instead of executing it.
    Paravirt,
}

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::HwAssist => "hw-assist",
            Mode::TrapEmulate => "trap-emulate",
            Mode::Paravirt => "paravirt",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One path CPUID can take: a mode, and for trap-emulate its trap. One spelling, shared
/// by `run`, `compare` and `validate`: `native`, `hw-assist`, `trap-emulate:hw-breakpoint`
/// (`trap-emulate` alone means that), `trap-emulate:int3-patch`, `trap-emulate:io-patch`,
/// `paravirt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    Native,
    HwAssist,
    TrapEmulate(Trap),
    Paravirt,
}

impl Path {
    /// Every path, in the order the comparison shows them.
    pub const ALL: [Path; 6] = [
        Path::Native,
        Path::HwAssist,
        Path::TrapEmulate(Trap::HwBreakpoint),
        Path::TrapEmulate(Trap::Int3Patch),
        Path::TrapEmulate(Trap::IoPatch),
        Path::Paravirt,
    ];

    /// `mode` with `trap` where the mode traps (the trap is ignored by the other modes).
    pub fn new(mode: Mode, trap: Trap) -> Self {
        match mode {
            Mode::Native => Path::Native,
            Mode::HwAssist => Path::HwAssist,
            Mode::TrapEmulate => Path::TrapEmulate(trap),
            Mode::Paravirt => Path::Paravirt,
        }
    }

    pub fn mode(self) -> Mode {
        match self {
            Path::Native => Mode::Native,
            Path::HwAssist => Mode::HwAssist,
            Path::TrapEmulate(_) => Mode::TrapEmulate,
            Path::Paravirt => Mode::Paravirt,
        }
    }

    pub fn trap(self) -> Option<Trap> {
        match self {
            Path::TrapEmulate(trap) => Some(trap),
            _ => None,
        }
    }

    /// True where this VMM handles the CPUID exits (and so can shape them).
    pub fn vmm_handles_cpuid(self) -> bool {
        matches!(self, Path::TrapEmulate(_) | Path::Paravirt)
    }

    pub fn name(self) -> &'static str {
        match self {
            Path::Native => "native",
            Path::HwAssist => "hw-assist",
            Path::TrapEmulate(Trap::HwBreakpoint) => "trap-emulate:hw-breakpoint",
            Path::TrapEmulate(Trap::Int3Patch) => "trap-emulate:int3-patch",
            Path::TrapEmulate(Trap::IoPatch) => "trap-emulate:io-patch",
            Path::Paravirt => "paravirt",
        }
    }

    /// The spellings [`FromStr`] takes, for messages.
    pub fn spellings() -> String {
        Path::ALL.map(Path::name).join(", ")
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Path {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "trap-emulate" {
            return Ok(Path::TrapEmulate(Trap::HwBreakpoint));
        }
        Path::ALL
            .into_iter()
            .find(|path| path.name() == text)
            .ok_or_else(|| format!("unknown path `{text}` ({})", Path::spellings()))
    }
}

impl serde::Serialize for Path {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("unexpected debug exit at RIP {rip:#x} (exception {exception}): this mode arms no trap there")]
    UnexpectedDebugExit { rip: u64, exception: u32 },
    #[error("the guest used the paravirtual hypercall port, but this mode does not offer it")]
    UnexpectedHypercall,
    #[error("the guest wrote to the io-patch trap port {port:#x} at RIP {rip:#x}, where this VMM patched no CPUID")]
    UnexpectedIoTrap { port: u16, rip: u64 },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("the payload's code holds no CPUID instruction: trap-emulate has nothing to trap")]
    NoCpuidSites,
    #[error("the payload has {sites} CPUID sites but x86 has only {slots} debug address registers (DR0-DR3); use --trap int3-patch or io-patch, which trap any number")]
    TooManySites { sites: usize, slots: usize },
    #[error(
        "the bytes at CPUID site {addr:#x} are {found:02x?}, not CPUID (0f a2): the payload does not match its symbols"
    )]
    NotCpuid { addr: u64, found: [u8; 2] },
    #[error("cannot access guest memory at {addr:#x}: {source}")]
    Memory {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{trap} traps are not delivered by this KVM: {why}. Use --trap io-patch (port I/O reaches the VMM on every KVM) or --mode paravirt")]
    TrapUnavailable { trap: &'static str, why: String },
    #[error("the payload made no paravirtual hypercall (port {port:#x}): it is not enlightened for paravirt, so this run would measure nothing of that path")]
    NoHypercalls { port: u16 },
    #[error("the payload's timed CPUID never trapped to the VMM ({exits} trap exits): trap-emulate measured nothing of its path")]
    NoTraps { exits: u64 },
    #[error(transparent)]
    Shaping(#[from] crate::shaping::ShapingError),
}

/// Answers the CPUID in `regs` (leaf in EAX, subleaf in ECX) from `table`, exactly as KVM
/// would: CPUID writes 32-bit results, which clear the upper halves in 64-bit mode.
pub fn answer_cpuid(table: &CpuidTable, regs: &mut kvm_regs) {
    let [eax, ebx, ecx, edx] = table.lookup(regs.rax as u32, regs.rcx as u32);
    regs.rax = u64::from(eax);
    regs.rbx = u64::from(ebx);
    regs.rcx = u64::from(ecx);
    regs.rdx = u64::from(edx);
}

/// The VMM side of a mode: the exits only some modes expect. `exit_tsc` is the host TSC
/// when KVM_RUN returned, for latency shaping. Each returns the kind of CPUID exit it
/// handled.
pub trait CpuidExitHandler: Send {
    /// Called once before the vCPU first runs: arm traps, patch code, open TSC moves.
    fn arm(&mut self, _vcpu: &mut dyn Vcpu) -> Result<(), ModeError> {
        Ok(())
    }

    /// A debug exit (hardware breakpoint or `int3`).
    fn on_debug(
        &mut self,
        _vcpu: &mut dyn Vcpu,
        pc: u64,
        exception: u32,
        _exit_tsc: u64,
    ) -> Result<ExitKind, ModeError> {
        Err(ModeError::UnexpectedDebugExit { rip: pc, exception })
    }

    /// An `out` to the paravirtual hypercall port.
    fn on_hypercall(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<ExitKind, ModeError> {
        Err(ModeError::UnexpectedHypercall)
    }

    /// An `out` to the io-patch trap port: a patched CPUID.
    fn on_io_trap(&mut self, vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<ExitKind, ModeError> {
        Err(ModeError::UnexpectedIoTrap {
            port: u16::from(ports::CPUID_TRAP),
            rip: vcpu.regs()?.rip,
        })
    }

    /// KVM could not emulate the instruction at the exit's RIP. An emulating KVM reports
    /// a patched `int3` this way (its emulator cannot run INT in long mode): the kind of
    /// exit if this was one of ours and has been handled as the trap, `None` otherwise.
    fn on_emulation_failure(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<Option<ExitKind>, ModeError> {
        Ok(None)
    }

    /// The shaper of a mode that shapes its exits, for what it learnt during the run.
    fn shaper(&self) -> Option<&crate::shaping::Shaper> {
        None
    }
}

/// A guest's console byte as it may reach a terminal: printable ASCII, newline and tab as
/// they are; anything else (escape sequences that set a title, write the clipboard or
/// forge lines of vmm's own output, and non-ASCII bytes) shown escaped, `\x1b`.
pub fn write_console_byte(out: &mut dyn Write, byte: u8) -> std::io::Result<()> {
    match byte {
        b'\n' | b'\t' | 0x20..=0x7e => out.write_all(&[byte]),
        other => write!(out, "\\x{other:02x}"),
    }
}

/// One exit, dispatched: the ABI's own ports (console, done) first, then the mode's.
pub fn handle_exit(
    mode: &mut dyn CpuidExitHandler,
    console: &mut Option<&mut (dyn Write + Send)>,
    vcpu: &mut dyn Vcpu,
    exit: &Exit,
    exit_tsc: u64,
) -> Result<Flow, ModeError> {
    const IO_TRAP_PORT: u16 = ports::CPUID_TRAP as u16;
    let kind = match *exit {
        Exit::Interrupted => ExitKind::Signal,
        Exit::IoOut {
            port: ports::CONSOLE,
            value,
        } => {
            if let Some(out) = console.as_mut() {
                // The console is a convenience: a closed stderr must not end the run.
                let _ = write_console_byte(&mut **out, value as u8);
            }
            ExitKind::Console
        }
        Exit::IoOut {
            port: ports::DONE,
            value,
        } => return Ok(Flow::Done { status: value }),
        Exit::IoOut {
            port: ports::HYPERCALL, ..
        } => mode.on_hypercall(vcpu, exit_tsc)?,
        Exit::IoOut { port: IO_TRAP_PORT, .. } => mode.on_io_trap(vcpu, exit_tsc)?,
        Exit::Debug { pc, exception } => mode.on_debug(vcpu, pc, exception, exit_tsc)?,
        Exit::InternalError {
            suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
        } => match mode.on_emulation_failure(vcpu, exit_tsc)? {
            Some(kind) => kind,
            None => return Ok(Flow::Fatal),
        },
        _ => return Ok(Flow::Fatal),
    };
    Ok(Flow::Continue(kind))
}

/// A mode's handler and the console, as the VM's [`ExitHandler`].
pub struct ModeExits<'m, 'c> {
    pub mode: &'m mut dyn CpuidExitHandler,
    pub console: Option<&'c mut (dyn Write + Send)>,
}

impl ExitHandler for ModeExits<'_, '_> {
    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), HandlerError> {
        Ok(self.mode.arm(vcpu)?)
    }

    fn handle(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit, exit_tsc: u64) -> Result<Flow, HandlerError> {
        Ok(handle_exit(self.mode, &mut self.console, vcpu, exit, exit_tsc)?)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn console_bytes_reach_the_terminal_escaped() {
        let mut shown = Vec::new();
        for &byte in b"ok\n\x1b]0;owned\x07\xff" {
            write_console_byte(&mut shown, byte).unwrap();
        }
        assert_eq!(String::from_utf8(shown).unwrap(), "ok\n\\x1b]0;owned\\x07\\xff");
    }

    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    #[test]
    fn every_path_has_one_spelling_that_round_trips() {
        for path in Path::ALL {
            assert_eq!(path.name().parse::<Path>(), Ok(path));
            assert_eq!(Path::new(path.mode(), path.trap().unwrap_or_default()), path);
        }
        assert_eq!("trap-emulate".parse(), Ok(Path::TrapEmulate(Trap::HwBreakpoint)));
        let error = "warp-drive".parse::<Path>().unwrap_err();
        assert!(error.contains("trap-emulate:io-patch"), "{error}");
    }

    #[test]
    fn console_done_and_unknown_exits_are_dispatched_whatever_the_mode() {
        let mut vcpu = SimVcpu::new();
        let mut mode = hw_assist::HwAssist;
        let mut written = Vec::new();
        let mut console: Option<&mut (dyn Write + Send)> = Some(&mut written);
        let mut dispatch = |exit: Exit, vcpu: &mut SimVcpu| handle_exit(&mut mode, &mut console, vcpu, &exit, 0);
        let byte = Exit::IoOut {
            port: ports::CONSOLE,
            value: u32::from(b'x'),
        };
        assert_eq!(dispatch(byte, &mut vcpu).unwrap(), Flow::Continue(ExitKind::Console));
        let done = Exit::IoOut {
            port: ports::DONE,
            value: 3,
        };
        assert_eq!(dispatch(done, &mut vcpu).unwrap(), Flow::Done { status: 3 });
        assert_eq!(
            dispatch(Exit::Interrupted, &mut vcpu).unwrap(),
            Flow::Continue(ExitKind::Signal)
        );
        for fatal in [
            Exit::Hlt,
            Exit::Shutdown,
            Exit::Mmio { addr: 1 },
            Exit::IoIn { port: 0x60 },
        ] {
            assert_eq!(dispatch(fatal, &mut vcpu).unwrap(), Flow::Fatal);
        }
        assert_eq!(written, b"x");
    }

    #[test]
    fn hw_assist_refuses_exits_only_the_vmm_paths_expect() {
        let mut vcpu = SimVcpu::new();
        let mut mode = hw_assist::HwAssist;
        let mut console = None;
        let hypercall = Exit::IoOut {
            port: ports::HYPERCALL,
            value: 0,
        };
        assert!(matches!(
            handle_exit(&mut mode, &mut console, &mut vcpu, &hypercall, 0),
            Err(ModeError::UnexpectedHypercall)
        ));
        let trap = Exit::IoOut {
            port: u16::from(ports::CPUID_TRAP),
            value: 0,
        };
        assert!(matches!(
            handle_exit(&mut mode, &mut console, &mut vcpu, &trap, 0),
            Err(ModeError::UnexpectedIoTrap { .. })
        ));
        let debug = Exit::Debug {
            pc: 0x1234,
            exception: 1,
        };
        assert!(matches!(
            handle_exit(&mut mode, &mut console, &mut vcpu, &debug, 0),
            Err(ModeError::UnexpectedDebugExit { rip: 0x1234, .. })
        ));
        let failure = Exit::InternalError {
            suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
        };
        assert_eq!(
            handle_exit(&mut mode, &mut console, &mut vcpu, &failure, 0).unwrap(),
            Flow::Fatal
        );
    }
}
