//! The run loop: vCPU 0 (and the counter vCPU, where there is one) on threads of their
//! own, pinned and sandboxed; every exit of vCPU 0 handed to the [`ExitHandler`], its
//! cost to the VMM counted, until the guest rings "done", an exit is fatal, or the
//! watchdog fires.

use super::accounting::ExitStats;
use super::counter::{self, CounterControl};
use super::handler::{ExitHandler, ExitKind, Flow};
use super::trace::{self, ExitTrace};
use super::watchdog::{self, Watchdog};
use super::{sandbox, worker, CounterStats, GuestVm, RunStats, VmError};
use crate::host::Placement;
use guest_payload::Status;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a run ended badly: the VM's own reasons, or the exit handler's error, kept whole
/// and typed (a mode's refusal stays a refusal).
#[derive(Debug, thiserror::Error)]
pub enum RunError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Handler(E),
}

impl GuestVm {
    /// Runs the guest until it rings "done", a fatal exit, or the watchdog.
    pub fn run<H: ExitHandler>(&mut self, handler: &mut H, timeout: Duration) -> Result<RunStats, RunError<H::Error>> {
        self.run_traced(handler, timeout, &mut trace::NoTrace)
    }

    /// [`GuestVm::run`], telling `trace` about every exit.
    pub fn run_traced<H: ExitHandler, T: ExitTrace>(
        &mut self,
        handler: &mut H,
        timeout: Duration,
        trace: &mut T,
    ) -> Result<RunStats, RunError<H::Error>> {
        // The vCPUs run on threads of their own, pinned and sandboxed once the VM is set up
        // (vCPU 0 on the thread kept from the last VM where it can: `worker.rs`); the
        // caller's thread keeps its privileges (and its signals) for the rest of the work.
        watchdog::prepare().map_err(VmError::from)?;
        let placement = match self.placement {
            Some(placement) if self.counter.is_none() || placement.counter.is_some() => placement,
            asked => Placement::choose(asked.map(|p| p.timing), self.counter.is_some()).map_err(VmError::from)?,
        };
        let control = Arc::new(CounterControl::default());
        let counter_finished = AtomicBool::new(false);
        let mut counter_vcpu = self.counter.take();
        self.vcpu
            .attach_counter(counter_vcpu.as_ref().map(|_| Arc::clone(&control)));
        let (control_ref, counter_finished) = (&*control, &counter_finished);
        let this = &mut *self;
        let (result, counter_result) = std::thread::scope(|scope| {
            let counter_thread = match (counter_vcpu.as_mut(), placement.counter) {
                (Some(counter), Some(cpu)) => Some(
                    std::thread::Builder::new()
                        .name("vmm-vcpu1-counter".into())
                        .spawn_scoped(scope, move || -> Result<(), VmError> {
                            let ran = counter::pin_current_thread(cpu)
                                .map_err(VmError::from)
                                .and_then(|()| Ok(sandbox::enter(counter.raw_fd())?))
                                .and_then(|()| Ok(counter.run(control_ref)?));
                            counter_finished.store(true, Ordering::Release);
                            control_ref.mark_ended();
                            ran
                        })
                        .map_err(|e| VmError::Thread(e.to_string())),
                ),
                _ => None,
            }
            .transpose();
            let counter_thread = match counter_thread {
                Ok(thread) => thread,
                Err(error) => return (Err(RunError::Vm(error)), None),
            };
            // vCPU 0 runs on the kept vCPU thread (`worker.rs`), pinned and sandboxed.
            let ran = worker::on_vcpu_thread(placement.timing, this.vcpu.raw_fd(), || {
                this.run_on_this_thread(handler, timeout, trace)
            })
            .map_err(|e| RunError::Vm(VmError::from(e)))
            .and_then(|ran| ran);
            // vCPU 0 is done, however it ended: the counter stops with it.
            if counter_thread.is_some() {
                control_ref.stop(counter_finished);
            }
            let counter_ran = counter_thread.map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
            (ran, counter_ran)
        });
        self.vcpu.attach_counter(None);
        let mut stats = match (result, counter_result) {
            // The counter's own failure explains a guest that found its counter stalled,
            // or a pause it never acknowledged.
            (Err(RunError::Vm(VmError::GuestStatus { value })), Some(Err(counter)))
                if value == Status::CounterStalled as u32 =>
            {
                return Err(counter.into())
            }
            (Err(_), Some(Err(counter))) if control.pause_failed() => return Err(counter.into()),
            (Err(error), _) => return Err(error),
            (Ok(_), Some(Err(counter))) => return Err(counter.into()),
            (Ok(stats), _) => stats,
        };
        if let (Some(counter_cpu), true) = (placement.counter, counter_vcpu.is_some()) {
            use std::sync::atomic::Ordering::Relaxed;
            let pauses = control.pauses.load(Relaxed);
            stats.counter = Some(CounterStats {
                vcpu0_cpu: placement.timing,
                counter_cpu,
                pauses,
                shared_moves_wanted: control.shared_wanted.load(Relaxed),
                shared_moves_applied: control.shared_applied.load(Relaxed),
                pause_hold_cycles_mean: control.hold_cycles_total.load(Relaxed) / pauses.max(1),
                pause_hold_cycles_max: control.hold_cycles_max.load(Relaxed),
            });
        }
        self.counter = counter_vcpu;
        Ok(stats)
    }

    fn run_on_this_thread<H: ExitHandler, T: ExitTrace>(
        &mut self,
        handler: &mut H,
        timeout: Duration,
        trace: &mut T,
    ) -> Result<RunStats, RunError<H::Error>> {
        handler.arm(&mut self.vcpu).map_err(RunError::Handler)?;
        // Sized before the run: no reallocation inside an exit.
        let expected_cpuid_exits = usize::try_from(self.config.timing_core_cpuids()).unwrap_or(usize::MAX);
        let mut stats = RunStats {
            exits: ExitStats::with_expected_cpuid_exits(expected_cpuid_exits),
            ..Default::default()
        };
        let watchdog = Watchdog::arm(timeout).map_err(VmError::from)?;
        self.vcpu.watch_deadline(watchdog.fired_flag());
        stats.setup = self.created.elapsed();
        let started = Instant::now();
        let result = self.run_loop(handler, &watchdog, &mut stats, trace);
        stats.run = started.elapsed();
        trace.finished(self);
        result.map(|()| stats)
    }

    /// KVM_RUN, the handler, the write-back, the accounting: the whole of an exit.
    fn run_loop<H: ExitHandler, T: ExitTrace>(
        &mut self,
        handler: &mut H,
        watchdog: &Watchdog,
        stats: &mut RunStats,
        trace: &mut T,
    ) -> Result<(), RunError<H::Error>> {
        loop {
            if watchdog.fired() {
                return Err(VmError::GuestHung {
                    timeout: watchdog.timeout,
                    rip: self.rip(),
                    place: None,
                }
                .into());
            }
            trace.entering();
            let exit = self.vcpu.run().map_err(VmError::from)?;
            let exit_tsc = guest_payload::timing::read_tsc();
            trace.exited(&exit, exit_tsc);
            let flow = trace.handle(&mut self.vcpu, |vcpu| handler.handle(vcpu, &exit, exit_tsc));
            trace.flushing();
            let flushed = crate::vm::vcpu::Vcpu::flush(&mut self.vcpu);
            let flow = flow.map_err(RunError::Handler)?;
            flushed.map_err(VmError::from)?;
            trace.handled(match flow {
                Flow::Continue(kind) => Some(kind),
                Flow::Done { .. } => Some(ExitKind::Done),
                Flow::Fatal => None,
            });
            let handled = || guest_payload::timing::read_tsc().saturating_sub(exit_tsc);
            match flow {
                Flow::Continue(kind) => stats.exits.record(kind, handled()),
                Flow::Done { status } => {
                    stats.exits.record(ExitKind::Done, handled());
                    return match Status::from_u32(status) {
                        Some(Status::Ok) => Ok(()),
                        _ => Err(VmError::GuestStatus { value: status }.into()),
                    };
                }
                Flow::Fatal => return Err(self.fatal(exit).into()),
            }
        }
    }
}
