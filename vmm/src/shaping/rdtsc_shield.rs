//! `rdtsc-shield:N`: zhaodice/KVM-RDTSC-SHIELD's clock, as its code reads at
//! d5bc5c5f0a2917aec5abad045928fa5cffc77ba2. RDTSC exits (the VMX-only
//! `0008-rdtsc-hook-point.patch`) and reads of MSR_IA32_TSC (`rdtsc.c` L225-L233) both
//! answer `blue_pill()` (L182-L201): `start + (real - start) / tsc_scale`, where `start`
//! moves up to the real TSC only once more than `tsc_reset` µs have passed both since the
//! vCPU's last CPUID leaf 0 (L204-L212 record when) and since `start`. Near a CPUID(0) —
//! where a detector times — the guest's clock runs `tsc_scale` times slow; elsewhere it
//! crawls for at most `tsc_reset` µs and then jumps to the truth. Defaults (`main.c` L4-L5):
//! `tsc_scale` 10 (N here), `tsc_reset` 500 µs, its ticks per µs measured by sleeping
//! (L264-L269; here 20 ms instead of one second).
//!
//! Not reproduced: `start` is one global for every VM and vCPU there (here: vCPU 0's own),
//! and the answer is in the host TSC's domain (here: the guest's, which differ by the
//! vCPU's TSC offset); the per-vCPU time of the last CPUID(0) starts uninitialised there
//! (here: never); RDTSCP is not the module's (its patch answers the raw TSC: the real one
//! here); a CPUID(0) only counts where it reaches the VMM (trap-emulate, paravirt).

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::vcpu::Vcpu;
use crate::vm::VmSetup;

/// `tsc_reset`'s default, in µs.
pub const RESET_US: u64 = 500;

/// One vCPU's `blue_pill` state.
#[derive(Debug)]
pub struct RdtscShield {
    scale: u64,
    /// `tsc_reset` in µs, and in TSC cycles once measured (`prepare`) or given.
    reset_us: u64,
    reset: Option<u64>,
    start: Option<u64>,
    /// When (in the guest's TSC) the last CPUID leaf 0 reached the VMM.
    last_leaf0: Option<u64>,
    /// EAX as the exit under way began: a CPUID's leaf.
    leaf: u64,
    exit_tsc: u64,
    /// The guest's TSC minus the host's, read once before the run (`arm`): a CPUID(0)'s
    /// time in the guest's TSC, which the reads are in.
    offset: i64,
}

impl RdtscShield {
    /// `reset_us`: `tsc_reset`, its TSC ticks measured before the run.
    pub fn new(scale: u64, reset_us: u64) -> Self {
        Self {
            scale: scale.max(1),
            reset_us,
            reset: None,
            start: None,
            last_leaf0: None,
            leaf: u64::MAX,
            exit_tsc: 0,
            offset: 0,
        }
    }

    fn blue_pill(&mut self, real: u64) -> u64 {
        let reset = self.reset.unwrap_or(0);
        let start = *self.start.get_or_insert(real);
        let mut diff = real.saturating_sub(start);
        let since_leaf0 = self.last_leaf0.map_or(u64::MAX, |at| real.saturating_sub(at));
        if since_leaf0 > reset && diff > reset {
            self.start = Some(real);
            diff = 0;
        }
        self.start.unwrap_or(real) + diff / self.scale
    }
}

impl ExitPolicy for RdtscShield {
    /// The original's calibration: TSC ticks over a sleep, scaled to `tsc_reset`.
    fn prepare(&mut self, _vm: &mut dyn VmSetup) -> Result<(), ShapingError> {
        if self.reset.is_none() {
            let nap = std::time::Duration::from_millis(20);
            let before = guest_payload::timing::read_tsc();
            std::thread::sleep(nap);
            let ticks = guest_payload::timing::read_tsc().saturating_sub(before);
            self.reset = Some(ticks / nap.as_micros() as u64 * self.reset_us);
        }
        Ok(())
    }

    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        self.offset = vcpu.tsc_offset()?;
        Ok(())
    }

    fn exit_began(&mut self, vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        self.leaf = vcpu.regs()?.rax & 0xffff_ffff;
        self.exit_tsc = exit_tsc;
        Ok(())
    }

    fn cpuid_answered(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        if self.leaf == 0 {
            self.last_leaf0 = Some(self.exit_tsc.wrapping_add(self.offset as u64));
        }
        Ok(())
    }

    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, instruction: TscRead) -> Result<u64, ShapingError> {
        let _ = instruction;
        Ok(self.blue_pill(read))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    fn cpuid_leaf0(vcpu: &mut SimVcpu, clock: &mut RdtscShield, at: u64) {
        vcpu.regs.rax = 0;
        clock.exit_began(vcpu, at).unwrap();
        clock.cpuid_answered(vcpu, at).unwrap();
    }

    #[test]
    fn near_a_cpuid_leaf0_the_clock_runs_slow_and_elsewhere_it_catches_up() {
        let mut vcpu = SimVcpu::new();
        let reset = 1_000_000;
        let mut clock = RdtscShield::new(10, 500);
        clock.reset = Some(reset);
        let read =
            |clock: &mut RdtscShield, vcpu: &mut SimVcpu, real| clock.tsc_read(vcpu, real, TscRead::Rdtsc).unwrap();
        assert_eq!(
            read(&mut clock, &mut vcpu, 5_000_000),
            5_000_000,
            "start is the first read"
        );
        cpuid_leaf0(&mut vcpu, &mut clock, 5_100_000);
        // Within reset of the CPUID(0): a tenth of the real progress.
        assert_eq!(read(&mut clock, &mut vcpu, 5_500_000), 5_050_000);
        assert_eq!(read(&mut clock, &mut vcpu, 6_000_000), 5_100_000);
        // Past reset since the CPUID(0) and since start: start jumps to the truth.
        assert_eq!(read(&mut clock, &mut vcpu, 6_200_000), 6_200_000);
        assert_eq!(
            read(&mut clock, &mut vcpu, 6_300_000),
            6_210_000,
            "slow again until reset passes"
        );
        // MSR 0x10 reads the same clock.
        assert_eq!(clock.tsc_read(&mut vcpu, 6_400_000, TscRead::Msr).unwrap(), 6_220_000);
    }
}
