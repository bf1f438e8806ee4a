//! Who answers CPUID (`--mode`), and the exit path that puts an answer and its cost
//! together.
//!
//! | mode | on `cpuid` | answered by |
//! |---|---|---|
//! | `native` | executes on the host CPU | hardware |
//! | `hw-assist` | VM exit, emulated inside KVM | KVM (userspace never sees it) |
//! | `trap-emulate` | traps to this VMM, emulated from its CPUID table | the VMM (`trap_emulate.rs`) |
//! | `paravirt` | the guest asks the VMM by hypercall instead | the VMM (`paravirt.rs`) |
//!
//! The route of a trapped CPUID, in four files that never climb back up:
//! `vm/run.rs` (KVM_RUN returns; the exit is handed over) → [`ExitPath::handle`] here (the
//! ABI's own ports; the exit policy told the exit began) → the mode's
//! [`Answerer::answer`] (`trap_emulate.rs`: registers answered, RIP stepped) → the
//! policy's `cpuid_answered` (`crate::shaping`: what the exit costs the guest) → back
//! here, registers written back, the policy told the exit ended → `vm/run.rs` re-enters.
//! Modes only answer; what an exit costs is decided in one place, the policy. Every step
//! runs on the [`Vcpu`] trait, so each is unit-tested with made-up exits on `SimVcpu`.

use crate::shaping::ExitPolicy;
use crate::vm::exit::Exit;
use crate::vm::handler::{ExitHandler, ExitKind, Flow};
use crate::vm::vcpu::Vcpu;
use guest_payload::ports;
use std::io::Write;
use std::str::FromStr;

pub mod answer;
pub mod hw_assist;
pub mod paravirt;
pub mod trap_emulate;
pub mod tsc_trap;

pub use answer::{answer_cpuid, Answered, Answerer, ModeError};
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

/// A guest's console byte as it may reach a terminal: printable ASCII, newline and tab as
/// they are; anything else (escape sequences that set a title, write the clipboard or
/// forge lines of vmm's own output, and non-ASCII bytes) shown escaped, `\x1b`.
pub fn write_console_byte(out: &mut dyn Write, byte: u8) -> std::io::Result<()> {
    match byte {
        b'\n' | b'\t' | 0x20..=0x7e => out.write_all(&[byte]),
        other => write!(out, "\\x{other:02x}"),
    }
}

/// The exit path of one run: the ABI's own ports, the mode that answers CPUID, and the
/// policy that decides what each exit costs the guest. The VM's [`ExitHandler`].
pub struct ExitPath<'a, 'c> {
    pub answerer: &'a mut dyn Answerer,
    pub policy: &'a mut dyn ExitPolicy,
    /// The guest's RDTSCs trapped, where an evasion answers them.
    pub tsc_trap: Option<&'a mut tsc_trap::TscTrap>,
    pub console: Option<&'c mut (dyn Write + Send)>,
}

impl ExitPath<'_, '_> {
    /// One exit, answered: the kind to count it as.
    fn dispatch(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit, exit_tsc: u64) -> Result<Flow, ModeError> {
        let mut cpuid = false;
        let kind = match *exit {
            Exit::Interrupted => ExitKind::Signal,
            Exit::IoOut {
                port: ports::CONSOLE,
                value,
            } => {
                if let Some(out) = self.console.as_mut() {
                    // The console is a convenience: a closed stderr must not end the run.
                    let _ = write_console_byte(&mut **out, value as u8);
                }
                ExitKind::Console
            }
            Exit::IoIn { port: ports::PM_TIMER } => {
                vcpu.reply_port(crate::vm::pm_timer::count())?;
                ExitKind::PmTimer
            }
            _ => match self.answer_tsc(vcpu, exit, exit_tsc)? {
                Some(kind) => kind,
                None => match self.answerer.answer(vcpu, exit)? {
                    Some(answered) => {
                        if answered.shaped {
                            self.policy.cpuid_answered(vcpu, exit_tsc)?;
                        }
                        cpuid = answered.shaped;
                        answered.kind
                    }
                    None => return refuse(vcpu, exit),
                },
            },
        };
        if let Some(trap) = self.tsc_trap.as_mut() {
            let read = matches!(kind, ExitKind::TscTrap | ExitKind::MsrTrap);
            trap.exit_handled(vcpu, cpuid, read)?;
        }
        Ok(Flow::Continue(kind))
    }

    /// A trapped TSC read answered through the policy: the kind to count it as, if `exit`
    /// was one.
    fn answer_tsc(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit, exit_tsc: u64) -> Result<Option<ExitKind>, ModeError> {
        match self.tsc_trap.as_mut() {
            Some(trap) => trap.answer(vcpu, exit, exit_tsc, &mut *self.policy),
            None => Ok(None),
        }
    }
}

/// An exit no mode took: the ABI's ports by name, anything else fatal to the run.
fn refuse(vcpu: &mut dyn Vcpu, exit: &Exit) -> Result<Flow, ModeError> {
    const IO_TRAP_PORT: u16 = ports::CPUID_TRAP as u16;
    match *exit {
        Exit::IoOut {
            port: ports::HYPERCALL, ..
        } => Err(ModeError::UnexpectedHypercall),
        Exit::IoOut { port: IO_TRAP_PORT, .. } => Err(ModeError::UnexpectedIoTrap {
            port: IO_TRAP_PORT,
            rip: vcpu.regs()?.rip,
        }),
        Exit::Debug { pc, exception } => Err(ModeError::UnexpectedDebugExit { rip: pc, exception }),
        _ => Ok(Flow::Fatal),
    }
}

impl ExitHandler for ExitPath<'_, '_> {
    type Error = ModeError;

    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ModeError> {
        self.answerer.arm(vcpu)?;
        if let Some(trap) = self.tsc_trap.as_mut() {
            trap.arm(vcpu, self.answerer.guest_debug())?;
        }
        Ok(self.policy.arm(vcpu)?)
    }

    fn handle(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit, exit_tsc: u64) -> Result<Flow, ModeError> {
        if let Exit::IoOut {
            port: ports::DONE,
            value,
        } = *exit
        {
            return Ok(Flow::Done { status: value });
        }
        // The watchdog's own kick is no exit to act on: the run loop reports the hang.
        if vcpu.past_deadline() {
            return self.dispatch(vcpu, exit, exit_tsc);
        }
        self.policy.exit_began(vcpu, exit_tsc)?;
        let flow = self.dispatch(vcpu, exit, exit_tsc);
        // The registers go back before the exit ends for the policy (a paused counter
        // then resumes only once nothing of the exit is left).
        let flushed = vcpu.flush();
        let ended = self.policy.exit_ended(vcpu);
        let flow = flow?;
        flushed?;
        ended?;
        Ok(flow)
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
    use crate::arch::x86_64::cpuid::CpuidTable;
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

    use crate::shaping::Policies;

    /// One exit through the whole exit path, with no policy.
    fn handle_exit(
        answerer: &mut dyn Answerer,
        console: &mut Option<&mut (dyn Write + Send)>,
        vcpu: &mut SimVcpu,
        exit: &Exit,
        exit_tsc: u64,
    ) -> Result<Flow, ModeError> {
        ExitPath {
            answerer,
            policy: &mut Policies::none(),
            tsc_trap: None,
            console: console.as_mut().map(|c| &mut **c as &mut (dyn Write + Send)),
        }
        .handle(vcpu, exit, exit_tsc)
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
    fn the_policy_brackets_every_exit_but_the_last_and_shapes_only_answered_cpuids() {
        use crate::shaping::latency::{Latency, Shaping};
        use crate::shaping::pause_counter::PauseCounter;
        use crate::vm::vcpu::sim::SimCounter;
        let mut vcpu = SimVcpu::new();
        vcpu.counter = Some(SimCounter::default());
        vm_memory::Bytes::write_slice(
            &vcpu.memory,
            &guest_payload::timing::CPUID_OPCODE,
            vm_memory::GuestAddress(0x10_0100),
        )
        .unwrap();
        let mut mode = trap_emulate::TrapEmulate::new(Trap::IoPatch, vec![0x10_0100], None, CpuidTable::new(vec![]));
        let mut policy = Policies::new(vec![
            Box::new(Latency::new(Shaping::VirtualInject { cycles: 7 }, 0, 0)),
            Box::new(PauseCounter),
        ]);
        let mut path = ExitPath {
            answerer: &mut mode,
            policy: &mut policy,
            tsc_trap: None,
            console: None,
        };
        path.arm(&mut vcpu).unwrap();
        vcpu.regs.rip = 0x10_0102;
        let trap = Exit::IoOut {
            port: u16::from(ports::CPUID_TRAP),
            value: 0,
        };
        let console = Exit::IoOut {
            port: ports::CONSOLE,
            value: u32::from(b'x'),
        };
        let done = Exit::IoOut {
            port: ports::DONE,
            value: 0,
        };
        for exit in [&trap, &console, &trap, &done] {
            path.handle(&mut vcpu, exit, 0).unwrap();
        }
        let counter = vcpu.counter.as_ref().unwrap();
        assert_eq!(counter.pauses.get(), 3, "each exit but done paused the counter");
        assert_eq!(counter.depth.get(), 0, "and let it go");
        assert_eq!(vcpu.tsc_offset, 14, "two answered CPUIDs shaped, the console not");
        assert_eq!(policy.recorded().shaped.count(), 2);
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
