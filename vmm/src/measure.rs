//! One measurement: the timing core run once in one mode, natively or in a fresh VM.

use crate::modes::{hw_assist::HwAssist, CpuidExitHandler, Mode};
use crate::native::{self, NativeError};
use crate::vm::exits::ExitStats;
use crate::vm::loader::Payload;
use crate::vm::{GuestVm, VmError};
use guest_payload::{Config, CpuidRecord, Probe, ABI_VERSION, CONFIG_MAGIC};
use kvm_ioctls::Kvm;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

/// The most iterations a run may ask for: beyond this the samples alone outgrow the
/// guest's mapped gigabyte, and the run would take hours on an emulating KVM.
pub const MAX_ITERATIONS: u32 = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot open /dev/kvm: {0}{hint}", hint = kvm_open_hint(.0))]
    OpenKvm(kvm_ioctls::Error),
    #[error("iterations must be between 1 and {MAX_ITERATIONS}, not {0}")]
    Iterations(u64),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Native(#[from] NativeError),
}

fn kvm_open_hint(error: &kvm_ioctls::Error) -> &'static str {
    match error.errno() {
        libc::ENOENT => " (no /dev/kvm: load the kvm module for your CPU, kvm_intel or kvm_amd, and enable VT-x/AMD-V in the firmware)",
        libc::EACCES | libc::EPERM => " (permission denied: add yourself to the group that owns /dev/kvm, e.g. `sudo usermod -aG kvm $USER`, then log in again)",
        _ => "",
    }
}

/// Opens /dev/kvm with a message that says what to do when it fails.
pub fn open_kvm() -> Result<Kvm, MeasureError> {
    Kvm::new().map_err(MeasureError::OpenKvm)
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub mode: Mode,
    pub iterations: u32,
    pub warmup: u32,
    pub cpuid_leaf: u32,
    pub cpuid_subleaf: u32,
    /// Bits of `Probe::bit`.
    pub probes: u32,
    /// Extra bits of `guest_payload::flags` (a deliberate hang or fault, a CPUID snapshot).
    pub guest_flags: u32,
    pub timeout: Duration,
    /// Host CPU for the native runner.
    pub cpu: Option<usize>,
}

impl RunSpec {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            iterations: 10_000,
            warmup: 100,
            cpuid_leaf: 0,
            cpuid_subleaf: 0,
            probes: Probe::ALL.iter().map(|p| p.bit()).sum(),
            guest_flags: 0,
            timeout: Duration::from_secs(60),
            cpu: None,
        }
    }

    /// The config block this spec becomes.
    pub fn guest_config(&self) -> Config {
        Config {
            magic: CONFIG_MAGIC,
            abi_version: ABI_VERSION,
            flags: self.guest_flags,
            iterations: self.iterations,
            warmup: self.warmup,
            probes: self.probes,
            cpuid_leaf: self.cpuid_leaf,
            cpuid_subleaf: self.cpuid_subleaf,
            ..Default::default()
        }
    }
}

/// What one run measured, whatever the mode.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    pub samples: BTreeMap<Probe, Vec<u64>>,
    pub cpuid: Vec<CpuidRecord>,
    pub exits: ExitStats,
    /// VM creation to the first KVM_RUN (VM modes only).
    pub setup: Option<Duration>,
    pub run: Duration,
    /// The guest TSC rate KVM reported (VM modes only).
    pub kvm_tsc_khz: Option<u32>,
    pub console: String,
    /// The host CPU the native runner was pinned to.
    pub native_cpu: Option<usize>,
}

/// Runs `spec` once. `kvm` is needed for the VM modes only.
pub fn measure(
    kvm: Option<&Kvm>,
    payload: &Payload,
    spec: &RunSpec,
    console: Option<&mut dyn Write>,
) -> Result<Measurement, MeasureError> {
    if spec.iterations == 0 || spec.iterations > MAX_ITERATIONS {
        return Err(MeasureError::Iterations(u64::from(spec.iterations)));
    }
    let config = spec.guest_config();
    let mut handler: Box<dyn CpuidExitHandler> = match spec.mode {
        Mode::Native => {
            let run = native::run(&config, spec.cpu)?;
            return Ok(Measurement {
                samples: run.samples,
                cpuid: run.cpuid,
                run: run.run,
                native_cpu: Some(run.cpu),
                ..Default::default()
            });
        }
        Mode::HwAssist => Box::new(HwAssist),
    };
    let owned_kvm;
    let kvm = match kvm {
        Some(kvm) => kvm,
        None => {
            owned_kvm = open_kvm()?;
            &owned_kvm
        }
    };
    let mut vm = GuestVm::create(kvm, payload, &config)?;
    let (setup, stats) = vm.run(handler.as_mut(), spec.timeout, console)?;
    let results = vm.results()?;
    Ok(Measurement {
        samples: results.samples,
        cpuid: results.cpuid,
        exits: stats.exits,
        setup: Some(setup),
        run: stats.run,
        kvm_tsc_khz: vm.tsc_khz,
        console: stats.console,
        native_cpu: None,
    })
}

/// Asks KVM for its TSC rate without running anything (for native runs' reports).
pub fn kvm_tsc_khz(kvm: &Kvm) -> Option<u32> {
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().filter(|&k| k > 0)
}
