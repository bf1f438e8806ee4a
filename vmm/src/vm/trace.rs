//! Tracing exits, for `vmm trace`: when each KVM_RUN began and returned, what KVM said,
//! and every call the exit handler made on the vCPU with its cost. The run loop is generic
//! over [`ExitTrace`]: ordinary runs use [`NoTrace`], which compiles to nothing, so the
//! lean exit path stays as it is.

use super::exit::Exit;
use super::handler::ExitKind;
use super::tsc::TscMethod;
use super::vcpu::{Vcpu, VcpuError};
use guest_payload::timing::read_tsc;
use kvm_bindings::{kvm_guest_debug, kvm_regs};
use vm_memory::GuestMemoryMmap;

/// What the run loop tells a tracer. A tracer reads the host TSC itself, so that an
/// untraced run pays for no clock read it does not use.
pub trait ExitTrace: Send {
    /// KVM_RUN is about to be entered.
    fn entering(&mut self) {}
    /// KVM_RUN returned with `exit` at host TSC `tsc`.
    fn exited(&mut self, _exit: &Exit, _tsc: u64) {}
    /// Runs the exit handler, on `vcpu` or on a wrapper of it that records each call.
    fn handle<R>(&mut self, vcpu: &mut dyn Vcpu, handler: impl FnOnce(&mut dyn Vcpu) -> R) -> R {
        handler(vcpu)
    }
    /// The handler returned; the registers are about to be written back.
    fn flushing(&mut self) {}
    /// The registers were written back; the exit was handled as `kind`.
    fn handled(&mut self, _kind: Option<ExitKind>) {}
    /// The run is over, its vCPU still there.
    fn finished(&mut self, _vm: &super::GuestVm) {}
}

/// No tracing: every hook is empty and inlined away.
pub struct NoTrace;

impl ExitTrace for NoTrace {}

/// One call the handler made on the vCPU: host TSC when it began and ended.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuCall {
    pub what: String,
    pub start: u64,
    pub end: u64,
}

/// One exit, as the VMM lived it. Times are host TSC.
#[derive(Clone, Debug)]
pub struct TracedExit {
    /// When KVM_RUN was entered for the stretch of guest execution this exit ended.
    pub entered: u64,
    /// When KVM_RUN returned.
    pub exited: u64,
    /// The exit as KVM reported it.
    pub exit: Exit,
    /// How the VMM classed it, once handled.
    pub kind: Option<ExitKind>,
    pub calls: Vec<VcpuCall>,
    /// The registers the handler read first, and the last it wrote.
    pub regs_in: Option<kvm_regs>,
    pub regs_out: Option<kvm_regs>,
    /// TSC moves the handler made (cycles; negative: back).
    pub tsc_moves: Vec<i64>,
    /// Cycles spent writing registers back (KVM_SET_REGS; 0 with sync regs), by the
    /// handler before it let the exit end and by the run loop after it.
    pub flush_cycles: u64,
    /// When the handler and the write-back were done.
    pub handled: u64,
    /// The guest's code around the RIP the handler first read, from `code_addr`: two bytes
    /// before it (a port-I/O exit reports RIP already past its `out`) and the instruction at it.
    pub code: Vec<u8>,
    pub code_addr: u64,
}

/// Records every exit of a run.
#[derive(Default)]
pub struct Recorder {
    pub exits: Vec<TracedExit>,
    /// The guest TSC minus the host's after the run, and the uncertainty of that reading.
    pub offset_after: Option<(i64, u64)>,
    entering: u64,
    flushing: u64,
}

impl ExitTrace for Recorder {
    fn entering(&mut self) {
        self.entering = read_tsc();
    }

    fn exited(&mut self, exit: &Exit, tsc: u64) {
        self.exits.push(TracedExit {
            entered: self.entering,
            exited: tsc,
            exit: exit.clone(),
            kind: None,
            calls: Vec::new(),
            regs_in: None,
            regs_out: None,
            tsc_moves: Vec::new(),
            flush_cycles: 0,
            handled: 0,
            code: Vec::new(),
            code_addr: 0,
        });
    }

    fn handle<R>(&mut self, vcpu: &mut dyn Vcpu, handler: impl FnOnce(&mut dyn Vcpu) -> R) -> R {
        let Some(exit) = self.exits.last_mut() else {
            return handler(vcpu);
        };
        let result = handler(&mut TracingVcpu {
            inner: &mut *vcpu,
            exit,
        });
        if let Some(regs) = exit.regs_in {
            let mut code = [0u8; crate::arch::x86_64::decode::MAX_INSTRUCTION_BYTES + 2];
            let from = regs.rip.saturating_sub(2);
            use vm_memory::Bytes;
            if vcpu
                .memory()
                .read_slice(&mut code, vm_memory::GuestAddress(from))
                .is_ok()
            {
                exit.code = code.to_vec();
                exit.code_addr = from;
            }
        }
        result
    }

    fn finished(&mut self, vm: &super::GuestVm) {
        self.offset_after = vm.guest_tsc_offset().ok();
    }

    fn flushing(&mut self) {
        self.flushing = read_tsc();
    }

    fn handled(&mut self, kind: Option<ExitKind>) {
        let now = read_tsc();
        if let Some(exit) = self.exits.last_mut() {
            exit.kind = kind;
            exit.flush_cycles += now.saturating_sub(self.flushing);
            exit.handled = now;
        }
    }
}

/// A vCPU that records each call made on it into the exit being handled.
struct TracingVcpu<'v, 'e> {
    inner: &'v mut dyn Vcpu,
    exit: &'e mut TracedExit,
}

impl TracingVcpu<'_, '_> {
    fn timed<R>(&mut self, what: impl Into<String>, call: impl FnOnce(&mut dyn Vcpu) -> R) -> R {
        let start = read_tsc();
        let result = call(self.inner);
        let end = read_tsc();
        self.exit.calls.push(VcpuCall {
            what: what.into(),
            start,
            end,
        });
        result
    }
}

impl Vcpu for TracingVcpu<'_, '_> {
    fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
        let regs = self.timed("read the registers", |v| v.regs())?;
        self.exit.regs_in.get_or_insert(regs);
        Ok(regs)
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.timed("write the registers", |v| v.set_regs(regs))?;
        self.exit.regs_out = Some(*regs);
        Ok(())
    }

    fn memory(&self) -> &GuestMemoryMmap {
        self.inner.memory()
    }

    fn set_guest_debug(&mut self, debug: &kvm_guest_debug) -> Result<(), VcpuError> {
        self.timed("KVM_SET_GUEST_DEBUG", |v| v.set_guest_debug(debug))
    }

    fn enable_tsc_moves(&mut self) -> Result<TscMethod, VcpuError> {
        self.timed("enable TSC moves", |v| v.enable_tsc_moves())
    }

    fn move_tsc(&mut self, delta: i64) -> Result<(), VcpuError> {
        self.timed(format!("move the guest TSC by {delta:+} cycles"), |v| v.move_tsc(delta))?;
        self.exit.tsc_moves.push(delta);
        Ok(())
    }

    fn now(&self) -> u64 {
        self.inner.now()
    }

    fn take_moved(&mut self) -> i64 {
        self.inner.take_moved()
    }

    fn tsc_offset(&mut self) -> Result<i64, VcpuError> {
        self.inner.tsc_offset()
    }

    fn cpl(&mut self) -> Result<u8, VcpuError> {
        self.inner.cpl()
    }

    fn inject_exception(&mut self, vector: u8) -> Result<(), VcpuError> {
        self.timed(
            format!("give exception {vector} back to the guest (KVM_SET_VCPU_EVENTS)"),
            |v| v.inject_exception(vector),
        )
    }

    fn reply_msr(&mut self, data: u64) -> Result<(), VcpuError> {
        self.inner.reply_msr(data)
    }

    fn reply_port(&mut self, data: u32) -> Result<(), VcpuError> {
        self.inner.reply_port(data)
    }

    /// Counted as the write-back it is, not as a call of the handler's.
    fn flush(&mut self) -> Result<(), VcpuError> {
        let start = read_tsc();
        let flushed = self.inner.flush();
        self.exit.flush_cycles += read_tsc().saturating_sub(start);
        flushed
    }

    fn counter(&self) -> Option<&dyn crate::vm::counter::Counter> {
        self.inner.counter()
    }

    fn past_deadline(&self) -> bool {
        self.inner.past_deadline()
    }
}
