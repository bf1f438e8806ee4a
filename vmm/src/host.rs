//! What this host is: its CPU, its TSC, and which kind of KVM serves `/dev/kvm`.
//! Everything here is detected at run time, never assumed. [`HostInfo`] is the one
//! description of a host that run reports, calibrations and validation reports keep.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// Which implementation answers `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmFlavour {
    /// kvm_intel: VT-x.
    HardwareVtX,
    /// kvm_amd: AMD-V (SVM).
    HardwareAmdV,
    /// A KVM with no hardware virtualisation under it (kvm_pvm and the like): guest
    /// instructions are emulated or paravirtualised, timings are not those of real VMs.
    Software,
    /// No KVM module found.
    Unknown,
}

impl KvmFlavour {
    /// Its name as reports spell it (the JSON's spelling).
    pub fn name(self) -> &'static str {
        match self {
            KvmFlavour::HardwareVtX => "hardware-vt-x",
            KvmFlavour::HardwareAmdV => "hardware-amd-v",
            KvmFlavour::Software => "software",
            KvmFlavour::Unknown => "unknown",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            KvmFlavour::HardwareVtX => "hardware VT-x (kvm_intel)",
            KvmFlavour::HardwareAmdV => "hardware AMD-V (kvm_amd)",
            KvmFlavour::Software => "software/emulated (no VT-x/AMD-V)",
            KvmFlavour::Unknown => "unknown (no KVM module found)",
        }
    }
}

/// The loaded KVM vendor module decides the flavour; a software KVM (kvm_pvm) is
/// recognised by name, or by a KVM with neither vendor module loaded.
pub fn kvm_flavour() -> (KvmFlavour, Option<&'static str>) {
    kvm_flavour_from(|module| Path::new("/sys/module").join(module).exists())
}

fn kvm_flavour_from(loaded: impl Fn(&str) -> bool) -> (KvmFlavour, Option<&'static str>) {
    for (module, flavour) in [
        ("kvm_intel", KvmFlavour::HardwareVtX),
        ("kvm_amd", KvmFlavour::HardwareAmdV),
        ("kvm_pvm", KvmFlavour::Software),
    ] {
        if loaded(module) {
            return (flavour, Some(module));
        }
    }
    if loaded("kvm") {
        return (KvmFlavour::Software, Some("kvm"));
    }
    (KvmFlavour::Unknown, None)
}

/// The host CPU as /proc/cpuinfo and CPUID describe it.
#[derive(Clone, Debug, Serialize)]
pub struct CpuInfo {
    pub model: String,
    pub vmx: bool,
    pub svm: bool,
    /// CPUID.1:ECX[31]: the host itself runs under a hypervisor.
    #[serde(rename = "is_vm")]
    pub host_is_vm: bool,
    /// The TSC ticks at a constant rate through P- and C-states.
    pub invariant_tsc: bool,
    /// The microcode revision /proc/cpuinfo reports, where it does.
    pub microcode: Option<String>,
    /// The running kernel's release.
    pub kernel: Option<String>,
}

pub fn cpu_info() -> CpuInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    };
    let flags = field("flags").unwrap_or_default();
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    let leaf1 = std::arch::x86_64::__cpuid(1);
    let max_extended = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    let invariant_cpuid = max_extended >= 0x8000_0007 && std::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0;
    CpuInfo {
        model: field("model name").unwrap_or_else(|| "unknown".into()),
        vmx: has("vmx"),
        svm: has("svm"),
        host_is_vm: leaf1.ecx & crate::arch::x86_64::cpuid::HYPERVISOR_BIT != 0,
        invariant_tsc: invariant_cpuid || (has("constant_tsc") && has("nonstop_tsc")),
        microcode: field("microcode"),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|r| r.trim().to_owned()),
    }
}

/// The TSC frequency, and how it was found.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TscFrequency {
    pub khz: u32,
    pub source: TscSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TscSource {
    /// KVM_GET_TSC_KHZ on a vCPU: the rate the guest's TSC ticks at.
    Kvm,
    /// CPUID leaf 0x15 (crystal ratio) on the host.
    CpuidLeaf15,
    /// Counted against CLOCK_MONOTONIC for a few milliseconds.
    Measured,
}

impl TscSource {
    pub fn describe(self) -> &'static str {
        match self {
            TscSource::Kvm => "KVM_GET_TSC_KHZ",
            TscSource::CpuidLeaf15 => "CPUID leaf 0x15",
            TscSource::Measured => "measured against CLOCK_MONOTONIC",
        }
    }
}

/// KVM's figure when there is one, else the host's own.
pub fn tsc_frequency(kvm_khz: Option<u32>) -> TscFrequency {
    if let Some(khz) = kvm_khz.filter(|&k| k > 0) {
        return TscFrequency {
            khz,
            source: TscSource::Kvm,
        };
    }
    if let Some(khz) = tsc_khz_from_cpuid() {
        return TscFrequency {
            khz,
            source: TscSource::CpuidLeaf15,
        };
    }
    TscFrequency {
        khz: measure_tsc_khz(Duration::from_millis(50)),
        source: TscSource::Measured,
    }
}

/// Whether this CPU has RDTSCP (CPUID 80000001H:EDX[27]; AMD APM vol. 3, Intel SDM vol. 2).
pub fn has_rdtscp() -> bool {
    std::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
        && std::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 27) != 0
}

fn tsc_khz_from_cpuid() -> Option<u32> {
    let max_basic = std::arch::x86_64::__cpuid(0).eax;
    if max_basic < 0x15 {
        return None;
    }
    let leaf = std::arch::x86_64::__cpuid(0x15);
    if leaf.eax == 0 || leaf.ebx == 0 || leaf.ecx == 0 {
        return None;
    }
    u32::try_from(u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax) / 1000).ok()
}

fn measure_tsc_khz(window: Duration) -> u32 {
    let start = Instant::now();
    let tsc_start = guest_payload::timing::read_tsc();
    while start.elapsed() < window {
        std::hint::spin_loop();
    }
    let cycles = guest_payload::timing::read_tsc() - tsc_start;
    (cycles as f64 / start.elapsed().as_secs_f64() / 1000.0) as u32
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size matches the set.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return vec![0];
    }
    // SAFETY: CPU_ISSET reads within the set for indices below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu` (one of [`allowed_cpus`]).
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as in `allowed_cpus`; CPU_SET writes within the set (cpu < CPU_SETSIZE is
    // guaranteed by the caller, which took it from the allowed list).
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where a run's threads go: the timing CPU (vCPU 0, or the native measuring thread) and,
/// for a run with a counter, another CPU for the counter. Chosen here for every back end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub timing: usize,
    pub counter: Option<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AffinityError {
    #[error("CPU {cpu} is not one this process may run on (allowed: {allowed:?})")]
    CpuNotAllowed { cpu: usize, allowed: Vec<usize> },
    #[error("a run with a counter needs a second CPU for it, and this process may run on CPU {cpu} only")]
    NoCounterCpu { cpu: usize },
}

impl Placement {
    /// The timing CPU asked for if this process may use it, else the last one allowed
    /// (away from CPU 0's interrupt load); with a counter, the first other allowed CPU.
    pub fn choose(asked: Option<usize>, counter: bool) -> Result<Self, AffinityError> {
        Self::choose_among(&allowed_cpus(), asked, counter)
    }

    fn choose_among(allowed: &[usize], asked: Option<usize>, counter: bool) -> Result<Self, AffinityError> {
        let timing = match asked {
            Some(cpu) if !allowed.contains(&cpu) => {
                return Err(AffinityError::CpuNotAllowed {
                    cpu,
                    allowed: allowed.to_vec(),
                })
            }
            Some(cpu) => cpu,
            None => *allowed.last().unwrap_or(&0),
        };
        let counter = match counter {
            false => None,
            true => Some(
                allowed
                    .iter()
                    .copied()
                    .find(|&c| c != timing)
                    .ok_or(AffinityError::NoCounterCpu { cpu: timing })?,
            ),
        };
        Ok(Self { timing, counter })
    }
}

/// The host as reports and calibrations record it: what makes two hosts' figures differ.
/// The JSON field names are those run reports have always had.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpu_model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microcode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// CPUID.1:ECX[31]: the host itself runs under a hypervisor, so its native runs are
    /// virtual ground truth.
    #[serde(rename = "is_vm")]
    pub host_is_vm: bool,
    #[serde(default)]
    pub invariant_tsc: bool,
    pub tsc_khz: u32,
    pub tsc_khz_source: TscSource,
    pub kvm: KvmInfo,
}

/// The KVM serving `/dev/kvm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvmInfo {
    pub flavour: KvmFlavour,
    /// The vendor module that decided the flavour.
    pub module: Option<String>,
    /// KVM_GET_API_VERSION, where /dev/kvm opened.
    pub api_version: Option<i32>,
}

impl HostInfo {
    /// This host: its CPU, its TSC rate (`tsc`) and its KVM (`api_version` where
    /// /dev/kvm opened).
    pub fn new(cpu: &CpuInfo, tsc: TscFrequency, api_version: Option<i32>) -> Self {
        let (flavour, module) = kvm_flavour();
        Self {
            cpu_model: cpu.model.clone(),
            microcode: cpu.microcode.clone(),
            kernel: cpu.kernel.clone(),
            host_is_vm: cpu.host_is_vm,
            invariant_tsc: cpu.invariant_tsc,
            tsc_khz: tsc.khz,
            tsc_khz_source: tsc.source,
            kvm: KvmInfo {
                flavour,
                module: module.map(str::to_owned),
                api_version,
            },
        }
    }

    /// How `other` differs from this host, in words; `None` if it is the same host (CPU
    /// model, KVM flavour, kernel, TSC rate within 1%). `other` is described "there", this
    /// host "here".
    pub fn differences_from(&self, other: &HostInfo) -> Option<String> {
        // Quoted as JSON, as the calibration file has them.
        let shown = |text: Option<&str>| text.map_or("null".to_owned(), |t| serde_json::Value::from(t).to_string());
        let mut differences = Vec::new();
        for (name, then, now) in [
            ("CPU", Some(other.cpu_model.as_str()), Some(self.cpu_model.as_str())),
            ("KVM", Some(other.kvm.flavour.name()), Some(self.kvm.flavour.name())),
            ("kernel", other.kernel.as_deref(), self.kernel.as_deref()),
        ] {
            if then != now {
                differences.push(format!("{name} {} there, {} here", shown(then), shown(now)));
            }
        }
        let (then, now) = (f64::from(other.tsc_khz), f64::from(self.tsc_khz));
        if (then - now).abs() > now.abs() * 0.01 {
            differences.push(format!("TSC {then} kHz there, {now} kHz here"));
        }
        (!differences.is_empty()).then(|| differences.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_takes_the_cpu_asked_or_the_last_and_gives_the_counter_another() {
        let allowed = [0, 1, 3];
        assert_eq!(
            Placement::choose_among(&allowed, None, true),
            Ok(Placement {
                timing: 3,
                counter: Some(0)
            })
        );
        assert_eq!(
            Placement::choose_among(&allowed, Some(0), true),
            Ok(Placement {
                timing: 0,
                counter: Some(1)
            })
        );
        assert!(matches!(
            Placement::choose_among(&allowed, Some(2), false),
            Err(AffinityError::CpuNotAllowed { cpu: 2, .. })
        ));
        assert_eq!(
            Placement::choose_among(&[5], None, true),
            Err(AffinityError::NoCounterCpu { cpu: 5 })
        );
        assert_eq!(Placement::choose_among(&[5], None, false).map(|p| p.counter), Ok(None));
    }

    #[test]
    fn flavour_follows_the_loaded_vendor_module() {
        let only = |names: &'static [&'static str]| move |m: &str| names.contains(&m);
        assert_eq!(kvm_flavour_from(only(&["kvm", "kvm_intel"])).0, KvmFlavour::HardwareVtX);
        assert_eq!(kvm_flavour_from(only(&["kvm", "kvm_amd"])).0, KvmFlavour::HardwareAmdV);
        assert_eq!(
            kvm_flavour_from(only(&["kvm", "kvm_pvm"])),
            (KvmFlavour::Software, Some("kvm_pvm"))
        );
        assert_eq!(kvm_flavour_from(only(&["kvm"])).0, KvmFlavour::Software);
        assert_eq!(kvm_flavour_from(only(&[])).0, KvmFlavour::Unknown);
    }

    #[test]
    fn kvm_frequency_wins_and_a_measured_one_is_plausible() {
        assert_eq!(
            tsc_frequency(Some(2_000_000)),
            TscFrequency {
                khz: 2_000_000,
                source: TscSource::Kvm
            }
        );
        let measured = measure_tsc_khz(Duration::from_millis(20));
        assert!((100_000..10_000_000).contains(&measured), "{measured} kHz");
    }

    fn host() -> HostInfo {
        HostInfo {
            cpu_model: "AMD EPYC".into(),
            microcode: None,
            kernel: Some("6.8.0".into()),
            host_is_vm: true,
            invariant_tsc: true,
            tsc_khz: 2_000_000,
            tsc_khz_source: TscSource::Kvm,
            kvm: KvmInfo {
                flavour: KvmFlavour::HardwareAmdV,
                module: Some("kvm_amd".into()),
                api_version: Some(12),
            },
        }
    }

    #[test]
    fn host_info_keeps_the_run_reports_json_and_reads_it_back() {
        let json = serde_json::to_value(host()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cpu_model": "AMD EPYC", "kernel": "6.8.0", "is_vm": true,
                "invariant_tsc": true, "tsc_khz": 2_000_000, "tsc_khz_source": "kvm",
                "kvm": {"flavour": "hardware-amd-v", "module": "kvm_amd", "api_version": 12}})
        );
        assert_eq!(serde_json::from_value::<HostInfo>(json).unwrap(), host());
        for flavour in [
            KvmFlavour::HardwareVtX,
            KvmFlavour::HardwareAmdV,
            KvmFlavour::Software,
            KvmFlavour::Unknown,
        ] {
            assert_eq!(serde_json::to_value(flavour).unwrap(), flavour.name());
        }
    }

    #[test]
    fn another_host_is_told_by_its_cpu_kvm_kernel_and_tsc_rate() {
        let here = host();
        assert_eq!(here.differences_from(&host()), None);
        let mut there = host();
        there.tsc_khz = 2_010_000; // within 1%
        there.microcode = Some("0x1".into()); // not what figures depend on
        assert_eq!(here.differences_from(&there), None);
        there.cpu_model = "Intel(R) Core(TM) i9-13900K".into();
        there.kernel = None;
        there.tsc_khz = 3_000_000;
        assert_eq!(
            here.differences_from(&there).unwrap(),
            "CPU \"Intel(R) Core(TM) i9-13900K\" there, \"AMD EPYC\" here; kernel null there, \"6.8.0\" here; \
             TSC 3000000 kHz there, 2000000 kHz here"
        );
    }
}
