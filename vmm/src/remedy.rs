//! What a refused run needs, named once and spelt where the run was asked for. A low
//! layer says what is missing ([`Remedy`]); its message does not name a flag, because the
//! same refusal reaches `vmm run` (flags) and `vmm validate` (a JSON matrix). The command
//! layer adds the spelling: [`Remedy::flag`] or [`Remedy::matrix`].

/// One thing a run can be given so that it is not refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remedy {
    /// A second vCPU, the counter.
    TwoVcpus,
    /// A path on which this VMM handles the CPUID exits.
    VmmPath,
    /// The `cpuid` probe among the probes.
    CpuidProbe,
    /// Latency shaping that moves the TSC.
    TscShaping,
    /// A trap that patches code (any number of sites).
    PatchingTrap,
    /// The trap every KVM delivers, or no trap at all.
    PortIoTrap,
    /// A longer deadline.
    LongerTimeout,
}

impl Remedy {
    /// As `vmm run` (and `compare`, `trace`) take it.
    pub const fn flag(self) -> &'static str {
        match self {
            Remedy::TwoVcpus => "add --vcpus 2",
            Remedy::VmmPath => "use --mode trap-emulate or --mode paravirt",
            Remedy::CpuidProbe => "add cpuid to --probes",
            Remedy::TscShaping => "add --hide, --virtual-inject-cycles or --profile",
            Remedy::PatchingTrap => "use --trap int3-patch or io-patch, which trap any number",
            Remedy::PortIoTrap => "use --trap io-patch (port I/O reaches the VMM on every KVM) or --mode paravirt",
            Remedy::LongerTimeout => "raise --timeout if the run is just long",
        }
    }

    /// As a `vmm validate` matrix takes it (`None`: validate sets it itself).
    pub const fn matrix(self) -> Option<&'static str> {
        match self {
            Remedy::TwoVcpus => Some("set \"vcpus\": 2 in the matrix"),
            Remedy::VmmPath => Some("pair it with the modes \"trap-emulate:…\" or \"paravirt\" only"),
            Remedy::CpuidProbe | Remedy::LongerTimeout => None,
            Remedy::TscShaping => Some("pair it with a \"hide\", \"virtual-inject\" or \"profile:…\" shaping"),
            Remedy::PatchingTrap => Some("use the mode \"trap-emulate:int3-patch\" or \"trap-emulate:io-patch\""),
            Remedy::PortIoTrap => Some("use the mode \"trap-emulate:io-patch\" or \"paravirt\""),
        }
    }
}

/// `message`, followed by the remedy as `spell` writes it, where there is one.
pub fn with_remedy(message: String, remedy: Option<Remedy>, spell: fn(Remedy) -> Option<&'static str>) -> String {
    match remedy.and_then(spell) {
        Some(text) => format!("{message}: {text}"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_remedy_has_a_flag_and_the_message_keeps_its_words() {
        let all = [
            Remedy::TwoVcpus,
            Remedy::VmmPath,
            Remedy::CpuidProbe,
            Remedy::TscShaping,
            Remedy::PatchingTrap,
            Remedy::PortIoTrap,
            Remedy::LongerTimeout,
        ];
        assert!(all.iter().all(|r| r.flag().contains("--")));
        assert!(all.iter().filter_map(|r| r.matrix()).all(|m| !m.contains("--")));
        let cli = with_remedy("x".into(), Some(Remedy::TwoVcpus), |r| Some(r.flag()));
        assert_eq!(cli, "x: add --vcpus 2");
        assert_eq!(with_remedy("x".into(), Some(Remedy::CpuidProbe), Remedy::matrix), "x");
    }
}
