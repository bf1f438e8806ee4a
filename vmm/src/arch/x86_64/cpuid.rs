//! The guest's CPUID table, and CPUID answered from it the way KVM answers it.
//!
//! The table starts from `KVM_GET_SUPPORTED_CPUID`, is normalised for a single vCPU and
//! given to KVM with `KVM_SET_CPUID2`. When the VMM itself emulates CPUID (trap-and-emulate,
//! paravirt) it answers from the table KVM holds for the vCPU (read back with
//! `KVM_GET_CPUID2`, so runtime bits such as OSXSAVE agree), with KVM's lookup rules
//! (`kvm_cpuid()` in `arch/x86/kvm/cpuid.c`): same registers, whoever answers.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// A snapshot of a vCPU's CPUID entries.
#[derive(Clone, Debug)]
pub struct CpuidTable {
    entries: Vec<kvm_cpuid_entry2>,
}

/// CPUID.1:ECX bit 31, "running under a hypervisor".
pub const HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, "more than one logical processor per package" (HTT).
pub const HTT_BIT: u32 = 1 << 28;
/// The hypervisor leaves' range, where KVM puts its signature (`KVMKVMKVM`) and features.
pub const HYPERVISOR_LEAVES: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00ff;

/// CPUID.80000001H:EDX bit 27, RDTSCP.
pub const RDTSCP_BIT: u32 = 1 << 27;

/// Whether the guest's CPUID shows a thing as KVM describes it, or hides it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Visibility {
    #[default]
    Shown,
    Hidden,
}

/// What an evader makes the guest's CPUID say, on every VM path (KVM's table, and the
/// VMM's answers read back from it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidAnswers {
    /// Hidden: CPUID.1:ECX[31] clear and no entries in 0x40000000-0x400000FF (read there
    /// as a CPU without a hypervisor reads them).
    #[serde(default)]
    pub hypervisor: Visibility,
    /// Hidden: CPUID.80000001H:EDX[27] clear, as libvirt's `rdtscp` feature disabled
    /// makes it (SVM's KVM then intercepts RDTSCP to raise #UD: an evader may answer it).
    #[serde(default)]
    pub rdtscp: Visibility,
}

impl CpuidAnswers {
    /// KVM's own answers.
    pub const KVM: CpuidAnswers = CpuidAnswers {
        hypervisor: Visibility::Shown,
        rdtscp: Visibility::Shown,
    };
    /// How many distinct answers there are, and this one's place among them.
    pub const COUNT: usize = 4;
    pub fn index(self) -> usize {
        usize::from(self.hypervisor == Visibility::Hidden) | usize::from(self.rdtscp == Visibility::Hidden) << 1
    }
}

impl CpuidTable {
    pub fn new(entries: Vec<kvm_cpuid_entry2>) -> Self {
        Self { entries }
    }

    pub fn from_kvm(cpuid: &CpuId) -> Self {
        Self::new(cpuid.as_slice().to_vec())
    }

    pub fn entries(&self) -> &[kvm_cpuid_entry2] {
        &self.entries
    }

    /// Makes the table describe vCPU `apic_id` of a machine of `vcpus` logical CPUs in
    /// one package (what KVM reports is the host's view): its initial APIC ID and the
    /// package's logical processor count in leaf 1, HTT set where there are several, and
    /// its x2APIC ID in leaves 0xB and 0x1F.
    pub fn set_topology(&mut self, apic_id: u32, vcpus: u32) {
        for entry in &mut self.entries {
            match entry.function {
                1 => {
                    // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                    entry.ebx &= 0x0000_ffff;
                    entry.ebx |= (apic_id & 0xff) << 24 | (vcpus & 0xff) << 16;
                    if vcpus > 1 {
                        entry.edx |= HTT_BIT;
                    }
                }
                0xb | 0x1f => entry.edx = apic_id,
                _ => {}
            }
        }
    }

    /// Makes the table say what `hypervisor` asks of it.
    pub fn set_answers(&mut self, answers: CpuidAnswers) {
        if answers.hypervisor == Visibility::Hidden {
            self.entries.retain(|e| !HYPERVISOR_LEAVES.contains(&e.function));
            for entry in self.entries.iter_mut().filter(|e| e.function == 1) {
                entry.ecx &= !HYPERVISOR_BIT;
            }
        }
        if answers.rdtscp == Visibility::Hidden {
            for entry in self.entries.iter_mut().filter(|e| e.function == 0x8000_0001) {
                entry.edx &= !RDTSCP_BIT;
            }
        }
    }

    /// The entry for exactly this leaf and subleaf (the subleaf only where it matters).
    fn find(&self, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
        self.entries
            .iter()
            .find(|e| e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf))
    }

    /// True for AMD and Hygon vendor strings: KVM answers out-of-range leaves with zeros
    /// for these, and with the highest basic leaf for everyone else (Intel's behaviour).
    fn amd_compatible(&self) -> bool {
        self.find(0, 0).is_some_and(|e| {
            let vendor = [e.ebx, e.edx, e.ecx];
            vendor == [0x6874_7541, 0x6974_6e65, 0x444d_4163] // "AuthenticAMD"
                || vendor == [0x6f67_7948, 0x6e65_476e, 0x656e_6975] // "HygonGenuine"
        })
    }

    /// What CPUID(leaf, subleaf) returns in EAX, EBX, ECX, EDX.
    pub fn lookup(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let regs = |e: &kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
        if let Some(entry) = self.find(leaf, subleaf) {
            return regs(entry);
        }
        if let Some(entry) = self.out_of_range_entry(leaf, subleaf) {
            return regs(entry);
        }
        // Leaves 0xB and 0x1F pass ECX[7:0] through and report the x2APIC ID in EDX even
        // for subleaves the table lacks.
        if leaf == 0xb || leaf == 0x1f {
            if let Some(entry) = self.find(leaf, 1) {
                return [0, 0, subleaf & 0xff, entry.edx];
            }
        }
        [0; 4]
    }

    /// Intel semantics: a leaf above its class's maximum reads as the highest basic leaf.
    fn out_of_range_entry(&self, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
        if self.amd_compatible() {
            return None;
        }
        let basic = self.find(0, 0)?;
        let class_base = match leaf {
            0x4000_0000..=0x4fff_ffff => leaf & 0xffff_ff00,
            0xc000_0000.. => 0xc000_0000,
            _ => leaf & 0x8000_0000,
        };
        if self.find(class_base, 0).is_some_and(|class| leaf <= class.eax) {
            return None;
        }
        self.find(basic.eax, subleaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, significant: bool, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if significant {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    const INTEL: [u32; 3] = [0x756e_6547, 0x6c65_746e, 0x4965_6e69]; // ebx, ecx, edx of "GenuineIntel"
    const AMD: [u32; 3] = [0x6874_7541, 0x444d_4163, 0x6974_6e65];

    fn table(vendor: [u32; 3]) -> CpuidTable {
        CpuidTable::new(vec![
            entry(0, 0, false, [0xd, vendor[0], vendor[1], vendor[2]]),
            entry(1, 0, false, [0x806f8, 0x0a10_0800, 0x8000_0001, 2]),
            entry(0xd, 0, true, [7, 576, 576, 0]),
            entry(0xd, 1, true, [0xf, 0, 0, 0]),
            entry(0x8000_0000, 0, false, [0x8000_0008, 0, 0, 0]),
        ])
    }

    #[test]
    fn exact_and_indexed_leaves_come_from_their_entries() {
        let t = table(INTEL);
        assert_eq!(
            t.lookup(1, 99),
            [0x806f8, 0x0a10_0800, 0x8000_0001, 2],
            "subleaf ignored for leaf 1"
        );
        assert_eq!(t.lookup(0xd, 1), [0xf, 0, 0, 0]);
        assert_eq!(
            t.lookup(0xd, 5),
            [0; 4],
            "missing subleaf of an in-range leaf reads zero"
        );
    }

    #[test]
    fn intel_out_of_range_leaf_reads_the_highest_basic_leaf() {
        let t = table(INTEL);
        assert_eq!(t.lookup(0x20, 0), t.lookup(0xd, 0));
        assert_eq!(t.lookup(0x8000_0009, 1), t.lookup(0xd, 1));
        assert_eq!(t.lookup(0x5, 0), [0; 4], "in range but absent");
    }

    #[test]
    fn amd_out_of_range_leaf_reads_zero() {
        assert_eq!(table(AMD).lookup(0x20, 0), [0; 4]);
    }

    #[test]
    fn the_topology_gives_each_vcpu_its_apic_id_and_counts_the_package() {
        let mut one = table(INTEL);
        one.set_topology(0, 1);
        assert_eq!(one.lookup(1, 0)[1], 0x0001_0800, "APIC ID 0, one logical CPU");
        assert_eq!(one.lookup(1, 0)[3], 2, "HTT left as KVM gives it");
        let mut second = table(INTEL);
        second.set_topology(1, 2);
        assert_eq!(second.lookup(1, 0)[1], 0x0102_0800, "APIC ID 1 of two");
        assert_eq!(second.lookup(1, 0)[3] & HTT_BIT, HTT_BIT);
    }

    #[test]
    fn a_hidden_hypervisor_clears_the_bit_and_its_leaves_and_nothing_else() {
        let mut table = CpuidTable::new(vec![
            entry(0, 0, false, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, false, [0x806f8, 0, HYPERVISOR_BIT | 1, 0]),
            entry(0xd, 0, true, [7, 0, 0, 0]),
            entry(0x4000_0000, 0, false, [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]),
            entry(0x4000_0001, 0, false, [1, 0, 0, 0]),
        ]);
        let shown = table.clone();
        table.set_answers(CpuidAnswers::KVM);
        assert_eq!(table.lookup(1, 0), shown.lookup(1, 0));
        table.set_answers(CpuidAnswers {
            hypervisor: Visibility::Hidden,
            ..CpuidAnswers::KVM
        });
        assert_eq!(table.lookup(1, 0), [0x806f8, 0, 1, 0], "only the bit goes");
        assert_eq!(table.lookup(0, 0), shown.lookup(0, 0));
        // Intel semantics: an absent class reads as the highest basic leaf, 0xd here.
        assert_eq!(table.lookup(0x4000_0000, 0), [7, 0, 0, 0]);
        assert_eq!(table.entries().len(), 3);
    }

    #[test]
    fn a_hidden_rdtscp_clears_its_bit_alone() {
        let mut table = CpuidTable::new(vec![
            entry(0x8000_0000, 0, false, [0x8000_0001, 0, 0, 0]),
            entry(0x8000_0001, 0, false, [0, 0, 0x21, RDTSCP_BIT | 0x2000_0800]),
        ]);
        table.set_answers(CpuidAnswers {
            rdtscp: Visibility::Hidden,
            ..CpuidAnswers::KVM
        });
        assert_eq!(table.lookup(0x8000_0001, 0), [0, 0, 0x21, 0x2000_0800]);
        let indices: std::collections::HashSet<usize> = [Visibility::Shown, Visibility::Hidden]
            .into_iter()
            .flat_map(|h| {
                [Visibility::Shown, Visibility::Hidden].map(|r| CpuidAnswers {
                    hypervisor: h,
                    rdtscp: r,
                })
            })
            .map(CpuidAnswers::index)
            .collect();
        assert_eq!(indices.len(), CpuidAnswers::COUNT);
        assert!(indices.iter().all(|&i| i < CpuidAnswers::COUNT));
    }
}

/// Fields of a CPUID answer that legitimately differ between two correct answers for the
/// same vCPU: (leaf, register index 0..4 for EAX..EDX, mask of the bits, why).
pub const VARIABLE_FIELDS: &[(u32, usize, u32, &str)] = &[
    (
        0x1,
        1,
        0xff00_0000,
        "EBX[31:24]: initial APIC ID of the CPU that ran it",
    ),
    (0xb, 3, 0xffff_ffff, "EDX: x2APIC ID of the CPU that ran it"),
    (0x1f, 3, 0xffff_ffff, "EDX: x2APIC ID of the CPU that ran it"),
];

/// The registers of an answer with the [`VARIABLE_FIELDS`] of its leaf cleared.
pub fn masked(leaf: u32, regs: [u32; 4]) -> [u32; 4] {
    let mut regs = regs;
    for &(field_leaf, register, mask, _) in VARIABLE_FIELDS {
        if field_leaf == leaf {
            regs[register] &= !mask;
        }
    }
    regs
}

#[cfg(test)]
mod masking_tests {
    use super::*;

    #[test]
    fn only_the_apic_id_is_masked_from_leaf_one() {
        assert_eq!(masked(1, [1, 0x0a10_0800, 3, 4]), [1, 0x0010_0800, 3, 4]);
        assert_eq!(masked(0, [1, 0xffff_ffff, 3, 4]), [1, 0xffff_ffff, 3, 4]);
    }
}
