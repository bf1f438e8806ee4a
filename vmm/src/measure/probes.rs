//! Stage 2: what this KVM does, found by probe VMs of the embedded timing core or of a
//! few bytes of code, once per process: does it deliver the trap, run rdtscp, compute in
//! floating point, honour TSC moves.

use super::{payload_key, MeasureError, Measurer, RunSpec};
use crate::arch::x86_64::cpuid::CpuidAnswers;
use crate::modes::hw_assist::HwAssist;
use crate::modes::trap_emulate::{self, Trap, TrapDelivery};
use crate::modes::{ExitPath, ModeError, Path};
use crate::shaping::latency::{Latency, Shaping};
use crate::shaping::{Policies, ShapingError};
use crate::stats;
use crate::vm::loader::Payload;
use crate::vm::tsc::TscMethod;
use crate::vm::{GuestVm, RunError, VmError};
use guest_payload::{ports, Cycles, Probe};
use std::time::Duration;

/// Trapped CPUIDs that spend the burst of Linux's default printk rate limit (10 messages
/// per 5 s, `DEFAULT_RATELIMIT_BURST`), with room to spare.
const TRAP_LOG_BURST: u32 = 16;
/// A guest-visible TSC move this large cannot be mistaken for noise.
const PROBE_MOVE: u64 = 1 << 32;

impl Measurer {
    /// The path's probes: the trap's delivery, and where an int3 arrives as an emulation
    /// failure, the kernel log's burst spent before an unshaped run (a shaped one spends it
    /// in its calibration rounds).
    pub(super) fn probe_path(&self, spec: &RunSpec) -> Result<Option<TrapDelivery>, MeasureError> {
        self.kvm()?;
        let trap_delivery = match spec.path.trap() {
            Some(trap) => Some(self.probe_trap(spec, trap)?),
            None => None,
        };
        // An emulating KVM logs each trap of an int3 patch (an emulation failure) to the
        // kernel log, rate-limited to a burst per interval: the burst's traps cost ~10^6
        // cycles each. Calibration rounds spend it before a shaped run; an unshaped run
        // spends it here, not on its first samples (docs/trap-emulate.md).
        if trap_delivery == Some(TrapDelivery::EmulationFailure) && spec.shaping == Shaping::None {
            self.spend_trap_log_burst(spec)?;
        }
        Ok(trap_delivery)
    }

    /// Does this KVM deliver the trap at all? One CPUID of the embedded timing core,
    /// trapped, finds out (once per trap): a CPUID that is known to execute, so that a
    /// payload whose sites never run is not taken for a KVM that drops traps (its own run
    /// then says that none of its CPUIDs trapped). A failure elsewhere is itself.
    pub fn probe_trap(&self, spec: &RunSpec, trap: Trap) -> Result<TrapDelivery, MeasureError> {
        let payload = &Payload::embedded().map_err(VmError::from)?;
        let key = (payload_key(payload), trap);
        if let Some(delivery) = self.traps.borrow().get(&key) {
            return Ok(*delivery);
        }
        let probe = RunSpec {
            bare_exits: false,
            cpuid_leaf: 0,
            cpuid_subleaf: 0,
            ..spec.cpuid_only(1, 0, Shaping::None)
        };
        // At the site itself (an int3 may report the byte after it), never the instruction
        // after: `cpuid; rdtscp` failing on the rdtscp is the payload's own doing.
        let sites = &payload.cpuid_sites;
        let stops_past = if trap == Trap::Int3Patch { 1 } else { 0 };
        let at_a_site = |error: &VmError| {
            error
                .rip()
                .is_some_and(|rip| trap_emulate::site_at(sites, rip, stops_past).is_some())
        };
        let unavailable = |why: String| MeasureError::Mode(ModeError::TrapUnavailable { trap: trap.name(), why });
        const NO_TRAP: &str = "the guest's CPUID ran to completion without a single trap exit (breakpoints armed with KVM_SET_GUEST_DEBUG do not fire)";
        let delivery = match self.run_vm(payload, &probe, Latency::none(), None) {
            Ok(measured) => measured.trap_delivery.ok_or_else(|| unavailable(NO_TRAP.into()))?,
            Err(MeasureError::Mode(ModeError::NoTraps { .. })) => return Err(unavailable(NO_TRAP.into())),
            Err(MeasureError::Vm(error @ (VmError::TripleFault { .. } | VmError::InternalError { .. }))) => {
                // Blame the trap only if the trap is what broke the run: at a trapped site,
                // or (a triple fault resets RIP) where the same run without the trap
                // completes.
                let untrapped = RunSpec {
                    path: Path::HwAssist,
                    ..probe.clone()
                };
                if at_a_site(&error) || self.run_vm(payload, &untrapped, Latency::none(), None).is_ok() {
                    return Err(unavailable(format!(
                        "with the trap armed the guest stopped ({error}), and without it the same code runs"
                    )));
                }
                return Err(MeasureError::Vm(error));
            }
            Err(other) => return Err(other),
        };
        self.traps.borrow_mut().insert(key, delivery);
        Ok(delivery)
    }

    /// Does this KVM deliver the breakpoints `--tsc-trap hw-breakpoint` sets? The same
    /// debug exits as `--trap hw-breakpoint`'s, probed the same way (once per process).
    pub(super) fn probe_tsc_breakpoints(&self, spec: &RunSpec) -> Result<(), MeasureError> {
        let cpuid_trap = RunSpec {
            path: Path::TrapEmulate(Trap::HwBreakpoint),
            evasions: Default::default(),
            tsc_trap: Default::default(),
            counter: false,
            probes: guest_payload::Probe::Cpuid.bit(),
            ..spec.clone()
        };
        match self.probe_trap(&cpuid_trap, Trap::HwBreakpoint) {
            Ok(_) => Ok(()),
            Err(MeasureError::Mode(ModeError::TrapUnavailable { why, .. })) => {
                Err(ModeError::TscBreakpointsUnavailable { why }.into())
            }
            Err(other) => Err(other),
        }
    }

    /// Can a guest run `rdtscp` on this KVM? A VM of `rdtscp; out done` finds out, once
    /// per process: `Ok(Err(why))` when the guest stopped at the rdtscp (an emulating KVM
    /// may advertise RDTSCP in CPUID and still fail on it), `Err` when the probe itself
    /// could not run (that is not remembered: it says nothing of rdtscp).
    pub fn rdtscp_in_guest(&self) -> Result<Result<(), String>, MeasureError> {
        if let Some(known) = self.rdtscp.borrow().as_ref() {
            return Ok(known.clone());
        }
        // rdtscp; xor eax, eax; out 0xf4, eax (done, status ok); hlt
        const CODE: [u8; 8] = [0x0f, 0x01, 0xf9, 0x31, 0xc0, 0xe7, ports::DONE as u8, 0xf4];
        let outcome = self.runs_in_guest("rdtscp probe", &CODE)?;
        *self.rdtscp.borrow_mut() = Some(outcome.clone());
        Ok(outcome)
    }

    /// Can a guest execute `vmcall` (KVM's hypercall instruction) here? A VM of `mov eax,
    /// ~0; vmcall; out done` (an unknown hypercall: KVM answers -KVM_ENOSYS in RAX; on AMD
    /// it rewrites the instruction to `vmmcall` first).
    pub fn vmcall_in_guest(&self) -> Result<Result<(), String>, MeasureError> {
        // mov eax, 0xffffffff; vmcall; xor eax, eax; out 0xf4, eax; hlt
        const CODE: [u8; 13] = [
            0xb8,
            0xff,
            0xff,
            0xff,
            0xff,
            0x0f,
            0x01,
            0xc1,
            0x31,
            0xc0,
            0xe7,
            ports::DONE as u8,
            0xf4,
        ];
        self.runs_in_guest("vmcall probe", &CODE)
    }

    /// Does this KVM take a guest's kvmclock MSR write (`MSR_KVM_SYSTEM_TIME_NEW`)? A VM
    /// of `wrmsr; out done` finds out, once per process; a run that could not start
    /// says nothing of kvmclock and is taken as no.
    pub fn kvmclock_in_guest(&self) -> bool {
        if let Some(known) = *self.kvmclock.borrow() {
            return known;
        }
        let msr = guest_payload::clocks::MSR_KVM_SYSTEM_TIME_NEW.to_le_bytes();
        let page = (guest_payload::layout::KVMCLOCK_ADDR as u32 | 1).to_le_bytes();
        // mov ecx, msr; mov eax, page | 1; xor edx, edx; wrmsr; xor eax, eax; out 0xf4, eax; hlt
        let code = [
            0xb9,
            msr[0],
            msr[1],
            msr[2],
            msr[3],
            0xb8,
            page[0],
            page[1],
            page[2],
            page[3],
            0x31,
            0xd2,
            0x0f,
            0x30,
            0x31,
            0xc0,
            0xe7,
            ports::DONE as u8,
            0xf4,
        ];
        let takes = matches!(self.runs_in_guest("kvmclock probe", &code), Ok(Ok(())));
        *self.kvmclock.borrow_mut() = Some(takes);
        takes
    }

    /// Runs the embedded core on `spec`'s path for [`TRAP_LOG_BURST`] trapped CPUIDs and
    /// more, so that the kernel's rate-limited log of emulation failures has spent its
    /// burst before the measured run begins.
    fn spend_trap_log_burst(&self, spec: &RunSpec) -> Result<(), MeasureError> {
        let payload = Payload::embedded().map_err(VmError::from)?;
        let warm = RunSpec {
            bare_exits: false,
            ..spec.cpuid_only(TRAP_LOG_BURST, 0, Shaping::None)
        };
        self.run_vm(&payload, &warm, Latency::none(), None).map(drop)
    }

    /// Can a guest compute in floating point here (SSE arithmetic, what a compiler emits
    /// for `double`)? An emulating KVM runs SSE moves but no SSE or x87 arithmetic.
    pub fn float_in_guest(&self) -> Result<Result<(), String>, MeasureError> {
        // cvtsi2sd xmm0, eax; divsd xmm0, xmm0; xor eax, eax; out 0xf4, eax; hlt
        const CODE: [u8; 14] = [
            0xf2,
            0x0f,
            0x2a,
            0xc0,
            0xf2,
            0x0f,
            0x5e,
            0xc0,
            0x31,
            0xc0,
            0xe7,
            ports::DONE as u8,
            0xf4,
            0xf4,
        ];
        self.runs_in_guest("floating-point probe", &CODE)
    }

    /// Runs `code` as a guest (hw-assist): `Err(why)` where KVM could not run one of its
    /// instructions; any other failure is the probe's own.
    fn runs_in_guest(&self, what: &'static str, code: &[u8]) -> Result<Result<(), String>, MeasureError> {
        let probe = Payload::generated(what, code).map_err(VmError::from)?;
        let config = self.with_tsc_rate(
            RunSpec::new(Path::HwAssist)
                .cpuid_only(1, 0, Shaping::None)
                .guest_config(),
        );
        let mut vm = GuestVm::create(self.kvm()?, &probe, &config, CpuidAnswers::KVM)?;
        let handler = &mut ExitPath {
            answerer: &mut HwAssist,
            policy: &mut Policies::none(),
            tsc_trap: None,
            console: None,
        };
        let end = probe.entry + code.len() as u64;
        match vm.run(handler, Duration::from_secs(5)) {
            Ok(_) => Ok(Ok(())),
            Err(RunError::Vm(error @ (VmError::InternalError { .. } | VmError::TripleFault { .. })))
                if error.rip().is_some_and(|rip| (probe.entry..end).contains(&rip)) =>
            {
                Ok(Err(error.to_string()))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Do TSC moves reach the guest? Moves the TSC during a few CPUID exits and asks the
    /// guest what it saw. Returns the method that worked; remembered per path.
    pub fn probe_tsc_moves(&self, spec: &RunSpec) -> Result<TscMethod, MeasureError> {
        let payload = &super::calibration::core()?;
        if let Some(method) = self.known_tsc_method(payload, spec.path) {
            return Ok(method);
        }
        let probe = spec.cpuid_only(16, 2, Shaping::VirtualInject { cycles: PROBE_MOVE });
        let latency = Latency::new(probe.shaping.clone(), 0, 0);
        let measured = self.run_vm(payload, &probe, latency, None)?;
        let seen = measured
            .results
            .samples
            .get(&Probe::Cpuid)
            .map_or(0, |s| stats::median(s));
        let method = measured.tsc_method.ok_or(MeasureError::Vm(VmError::Results(
            crate::results::ResultsError::Invalid("the TSC probe moved no TSC"),
        )))?;
        if seen >= (PROBE_MOVE / 2) as Cycles {
            self.remember_tsc_method(payload, spec.path, method);
            return Ok(method);
        }
        Err(ShapingError::NotHonoured {
            flavour: crate::host::kvm_flavour().0.describe(),
            method,
            requested: PROBE_MOVE,
            seen,
        }
        .into())
    }

    /// The TSC move method already found to work for this payload and path.
    fn known_tsc_method(&self, payload: &Payload, path: Path) -> Option<TscMethod> {
        self.tsc_moves.borrow().get(&(payload_key(payload), path)).copied()
    }

    fn remember_tsc_method(&self, payload: &Payload, path: Path, method: TscMethod) {
        self.tsc_moves.borrow_mut().insert((payload_key(payload), path), method);
    }
}
