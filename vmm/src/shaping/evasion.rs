//! Evasions: what an evader does besides moving one vCPU's TSC, each a shaping option
//! (`--evade`), each refused clearly where the run or this KVM cannot do it.
//!
//! | evasion | what the VMM does | as in |
//! |---|---|---|
//! | `pause-counter` | stops the counter vCPU for the whole of each exit vCPU 0 takes to userspace | evaders pausing a detector's counter thread with IPIs |
//! | `shared-offset` | pauses it too, and makes vCPU 0's TSC moves on it (never running its clock back) | one offset for the whole VM (kvm-rdtsc-hack) |
//! | `tsc-khz:N` | sets both vCPUs' TSC rate to N kHz (KVM_SET_TSC_KHZ, where KVM_CAP_TSC_CONTROL is offered) | AutoVirt's TSC scaling |

use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvasionError {
    #[error("unknown evasion {0:?}: expected pause-counter, shared-offset or tsc-khz:N")]
    Unknown(String),
    #[error("--evade {0} acts on the counter vCPU: add --vcpus 2")]
    NeedsCounter(&'static str),
    #[error("--evade {0} acts while the VMM handles CPUID exits, and on this path it never sees them: use --mode trap-emulate or --mode paravirt")]
    NeedsVmmExits(&'static str),
    #[error(
        "--evade shared-offset shares the TSC moves of --hide, --virtual-inject-cycles or --profile, and none is given"
    )]
    NothingToShare,
    #[error("--evade tsc-khz:{0}: the rate must be between 100,000 and 10,000,000 kHz")]
    RateOutOfRange(u64),
    #[error("--evade tsc-khz needs TSC scaling, and this KVM ({flavour}) does not offer KVM_CAP_TSC_CONTROL: it cannot run here")]
    NoTscControl { flavour: &'static str },
}

/// The evasions of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Evasions {
    pub pause_counter: bool,
    pub shared_offset: bool,
    /// The guest TSC rate to set, in kHz.
    pub tsc_khz: Option<u32>,
}

impl Evasions {
    /// Parses `--evade` values (each once; later ones add to earlier ones).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, EvasionError> {
        let mut evasions = Self::default();
        for value in values {
            match value {
                "none" => {}
                "pause-counter" => evasions.pause_counter = true,
                "shared-offset" => evasions.shared_offset = true,
                other => match other.strip_prefix("tsc-khz:").map(str::parse::<u64>) {
                    Some(Ok(khz)) if (100_000..=10_000_000).contains(&khz) => evasions.tsc_khz = Some(khz as u32),
                    Some(Ok(khz)) => return Err(EvasionError::RateOutOfRange(khz)),
                    _ => return Err(EvasionError::Unknown(other.to_string())),
                },
            }
        }
        Ok(evasions)
    }

    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// The names reports give them, in a fixed order; `none` where there are none.
    pub fn name(&self) -> String {
        let mut names = Vec::new();
        if self.pause_counter {
            names.push("pause-counter".to_string());
        }
        if self.shared_offset {
            names.push("shared-offset".to_string());
        }
        if let Some(khz) = self.tsc_khz {
            names.push(format!("tsc-khz:{khz}"));
        }
        if names.is_empty() {
            "none".into()
        } else {
            names.join("+")
        }
    }

    /// Refuses what a run of this shape cannot do: `counter` (two vCPUs), whether the
    /// VMM sees CPUID exits on the path, whether the run moves the TSC, whether this KVM
    /// can scale the TSC.
    pub fn check(
        &self,
        counter: bool,
        vmm_handles_cpuid: bool,
        moves_tsc: bool,
        tsc_control: Result<(), &'static str>,
    ) -> Result<(), EvasionError> {
        for (on, name) in [
            (self.pause_counter, "pause-counter"),
            (self.shared_offset, "shared-offset"),
        ] {
            if on && !counter {
                return Err(EvasionError::NeedsCounter(name));
            }
            if on && !vmm_handles_cpuid {
                return Err(EvasionError::NeedsVmmExits(name));
            }
        }
        if self.shared_offset && !moves_tsc {
            return Err(EvasionError::NothingToShare);
        }
        if self.tsc_khz.is_some() {
            tsc_control.map_err(|flavour| EvasionError::NoTscControl { flavour })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_evasion_and_refuses_unknown_ones_and_absurd_rates() {
        let e = Evasions::parse(["pause-counter", "tsc-khz:1000000"]).unwrap();
        assert!(e.pause_counter && !e.shared_offset);
        assert_eq!(e.tsc_khz, Some(1_000_000));
        assert_eq!(e.name(), "pause-counter+tsc-khz:1000000");
        assert_eq!(Evasions::parse(["none"]).unwrap().name(), "none");
        assert_eq!(
            Evasions::parse(["teleport"]),
            Err(EvasionError::Unknown("teleport".into()))
        );
        assert_eq!(Evasions::parse(["tsc-khz:5"]), Err(EvasionError::RateOutOfRange(5)));
        assert!(matches!(Evasions::parse(["tsc-khz:"]), Err(EvasionError::Unknown(_))));
        assert!(matches!(
            Evasions::parse(["tsc-khz:99999999999999999999999"]),
            Err(EvasionError::Unknown(_))
        ));
    }

    #[test]
    fn each_evasion_is_refused_where_it_cannot_act() {
        let pause = Evasions::parse(["pause-counter"]).unwrap();
        assert_eq!(
            pause.check(false, true, false, Ok(())),
            Err(EvasionError::NeedsCounter("pause-counter"))
        );
        assert_eq!(
            pause.check(true, false, false, Ok(())),
            Err(EvasionError::NeedsVmmExits("pause-counter"))
        );
        assert_eq!(pause.check(true, true, false, Ok(())), Ok(()));
        let shared = Evasions::parse(["shared-offset"]).unwrap();
        assert_eq!(
            shared.check(true, true, false, Ok(())),
            Err(EvasionError::NothingToShare)
        );
        assert_eq!(shared.check(true, true, true, Ok(())), Ok(()));
        let scale = Evasions::parse(["tsc-khz:1000000"]).unwrap();
        assert_eq!(
            scale.check(false, false, false, Err("kvm_pvm")),
            Err(EvasionError::NoTscControl { flavour: "kvm_pvm" })
        );
        assert_eq!(scale.check(false, false, false, Ok(())), Ok(()));
    }
}
