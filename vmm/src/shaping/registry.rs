//! Every evasion a run can stage besides latency shaping (`--evade NAME[:ARG]`, joined with
//! `+` in matrices), in one list, and the evasions chosen for one run. Each is refused
//! clearly where the run or this KVM cannot do it.

use super::evasion::{EvasionError, EvasionKind};
use super::policy::ExitPolicy;

/// Every evasion, in the order reports name them.
pub const EVASIONS: [&EvasionKind; 8] = [
    &super::pause_counter::KIND,
    &super::shared_offset::KIND,
    &super::tsc_khz::KIND,
    &super::rdtsc_trap::KIND,
    &super::hide_exits::KIND,
    &super::bettertiming::KIND,
    &super::rdtsc_kvm_handler::KIND,
    &super::rdtsc_shield::KIND,
];

fn known_spellings() -> String {
    EVASIONS
        .iter()
        .map(|kind| match kind.argument {
            Some(_) => format!("{}:N", kind.name),
            None => kind.name.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `--evade`'s help, from the registry: each spelling and what it does.
pub fn help() -> String {
    let each: Vec<String> = EVASIONS
        .iter()
        .map(|kind| match kind.argument {
            Some(argument) => format!("{}:N ({}; N: {argument})", kind.name, kind.does),
            None => format!("{} ({})", kind.name, kind.does),
        })
        .collect();
    format!(
        "Evasions beyond the TSC offset, comma-separated (docs/evaders.md): {}",
        each.join("; ")
    )
}

/// One evasion chosen for a run, with its argument.
#[derive(Clone, Copy, Debug)]
pub struct Evasion {
    pub kind: &'static EvasionKind,
    pub argument: Option<u64>,
}

impl PartialEq for Evasion {
    fn eq(&self, other: &Self) -> bool {
        self.kind.name == other.kind.name && self.argument == other.argument
    }
}

impl Eq for Evasion {}

impl Evasion {
    /// `NAME` or `NAME:ARG`, as it was spelt.
    pub fn name(&self) -> String {
        match self.argument {
            Some(value) => format!("{}:{value}", self.kind.name),
            None => self.kind.name.to_owned(),
        }
    }
}

/// The evasions of one run, each at most once, in registry order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evasions(Vec<Evasion>);

impl Evasions {
    /// Parses `--evade` values (`none` adds nothing; a later value of an evasion replaces
    /// an earlier one).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, EvasionError> {
        let mut chosen: Vec<Evasion> = Vec::new();
        for value in values {
            if value == "none" {
                continue;
            }
            let (name, argument) = match value.split_once(':') {
                Some((name, argument)) => (name, Some(argument)),
                None => (value, None),
            };
            let unknown = || EvasionError::Unknown {
                given: value.to_owned(),
                expected: known_spellings(),
            };
            let kind = EVASIONS.iter().copied().find(|k| k.name == name).ok_or_else(unknown)?;
            let argument = match (kind.argument, argument) {
                (None, None) => None,
                (Some(_), Some(text)) => {
                    let value = text.parse::<u64>().map_err(|_| unknown())?;
                    (kind.check)(value).map_err(|why| EvasionError::Argument {
                        name: kind.name,
                        value,
                        why,
                    })?;
                    Some(value)
                }
                _ => return Err(unknown()),
            };
            chosen.retain(|e| e.kind.name != kind.name);
            chosen.push(Evasion { kind, argument });
        }
        chosen.sort_by_key(|e| EVASIONS.iter().position(|k| k.name == e.kind.name));
        Ok(Self(chosen))
    }

    pub fn is_none(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Evasion> {
        self.0.iter()
    }

    /// Whether `name` is among them.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|e| e.kind.name == name)
    }

    /// The names reports give them, joined with `+`; `none` where there are none.
    pub fn name(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0.iter().map(Evasion::name).collect::<Vec<_>>().join("+")
    }

    /// Refuses what a run of this shape cannot do: `vm` (not a native run), `counter`
    /// (two vCPUs), whether the VMM sees CPUID exits on the path, whether the run moves the
    /// TSC, whether this KVM can scale the TSC (`Err`: its flavour).
    pub fn check(
        &self,
        vm: bool,
        counter: bool,
        vmm_handles_cpuid: bool,
        moves_tsc: bool,
        tsc_control: Result<(), &'static str>,
    ) -> Result<(), EvasionError> {
        for evasion in &self.0 {
            let (name, needs) = (evasion.kind.name, evasion.kind.needs);
            if needs.counter && !counter {
                return Err(EvasionError::NeedsCounter(name));
            }
            if needs.vmm_exits && !vmm_handles_cpuid {
                return Err(EvasionError::NeedsVmmExits(name));
            }
            if needs.tsc_moves && !moves_tsc {
                return Err(EvasionError::NothingToShare(name));
            }
            if needs.tsc_trap && !vm {
                return Err(EvasionError::NeedsGuest(name));
            }
            if needs.tsc_trap && moves_tsc {
                return Err(EvasionError::ClockAndOffset(name));
            }
            if needs.tsc_control {
                tsc_control.map_err(|flavour| EvasionError::NoTscControl { name, flavour })?;
            }
        }
        Ok(())
    }

    /// Whether every one of them acts on a path: one that traps the guest's TSC reads on
    /// any VM path (`vm`), the others where the VMM handles CPUID.
    pub fn act_on(&self, vm: bool, vmm_handles_cpuid: bool) -> bool {
        self.0
            .iter()
            .all(|e| if e.kind.needs.tsc_trap { vm } else { vmm_handles_cpuid })
    }

    /// Whether one of them traps the guest's TSC reads.
    pub fn traps_tsc(&self) -> bool {
        self.0.iter().any(|e| e.kind.needs.tsc_trap)
    }

    /// Whether one of them intercepts reads of IA32_TSC (MSR 0x10).
    pub fn traps_msr_tsc(&self) -> bool {
        self.0.iter().any(|e| e.kind.needs.msr_tsc)
    }

    /// The policies they become, in registry order.
    pub fn policies(&self) -> Vec<Box<dyn ExitPolicy>> {
        self.0.iter().map(|e| (e.kind.build)(e.argument)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_evasion_and_refuses_unknown_ones_and_absurd_rates() {
        let e = Evasions::parse(["tsc-khz:1000000", "pause-counter"]).unwrap();
        assert!(e.has("pause-counter") && !e.has("shared-offset"));
        assert_eq!(e.name(), "pause-counter+tsc-khz:1000000", "registry order");
        assert_eq!(e.policies().len(), 2);
        assert_eq!(Evasions::parse(["none"]).unwrap().name(), "none");
        let unknown = Evasions::parse(["teleport"]).unwrap_err();
        assert!(matches!(&unknown, EvasionError::Unknown { given, .. } if given == "teleport"));
        assert!(
            unknown.to_string().contains(
                "pause-counter, shared-offset, tsc-khz:N, rdtsc-trap, hide-exits, bettertiming, rdtsc-kvm-handler:N"
            ),
            "{unknown}"
        );
        let slow = Evasions::parse(["tsc-khz:5"]).unwrap_err();
        assert!(matches!(slow, EvasionError::Argument { value: 5, .. }));
        assert!(slow.to_string().contains("between 100,000 and 10,000,000"), "{slow}");
        for bad in [
            "tsc-khz:",
            "tsc-khz",
            "pause-counter:3",
            "tsc-khz:99999999999999999999999",
        ] {
            assert!(
                matches!(Evasions::parse([bad]), Err(EvasionError::Unknown { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_help_names_every_evasion() {
        let help = help();
        for kind in EVASIONS {
            assert!(help.contains(kind.name) && help.contains(kind.does), "{}", kind.name);
        }
    }

    #[test]
    fn each_evasion_is_refused_where_it_cannot_act() {
        let pause = Evasions::parse(["pause-counter"]).unwrap();
        assert_eq!(
            pause.check(true, false, true, false, Ok(())),
            Err(EvasionError::NeedsCounter("pause-counter"))
        );
        assert_eq!(
            pause.check(true, true, false, false, Ok(())),
            Err(EvasionError::NeedsVmmExits("pause-counter"))
        );
        assert_eq!(pause.check(true, true, true, false, Ok(())), Ok(()));
        let shared = Evasions::parse(["shared-offset"]).unwrap();
        assert_eq!(
            shared.check(true, true, true, false, Ok(())),
            Err(EvasionError::NothingToShare("shared-offset"))
        );
        assert_eq!(shared.check(true, true, true, true, Ok(())), Ok(()));
        let scale = Evasions::parse(["tsc-khz:1000000"]).unwrap();
        assert_eq!(
            scale.check(true, false, false, false, Err("kvm_pvm")),
            Err(EvasionError::NoTscControl {
                name: "tsc-khz",
                flavour: "kvm_pvm"
            })
        );
        assert_eq!(scale.check(true, false, false, false, Ok(())), Ok(()));
        let clock = Evasions::parse(["hide-exits"]).unwrap();
        assert!(clock.traps_tsc() && !scale.traps_tsc());
        assert!(
            clock.act_on(true, false) && !clock.act_on(false, false),
            "hw-assist yes, native no"
        );
        assert!(!pause.act_on(true, false) && pause.act_on(true, true));
        assert_eq!(
            clock.check(false, false, false, false, Err("native: no KVM")),
            Err(EvasionError::NeedsGuest("hide-exits"))
        );
        assert_eq!(
            clock.check(true, false, false, false, Err("kvm_pvm")),
            Ok(()),
            "any VM path, any KVM"
        );
        assert_eq!(
            clock.check(true, false, true, true, Ok(())),
            Err(EvasionError::ClockAndOffset("hide-exits"))
        );
        let slow = Evasions::parse(["rdtsc-kvm-handler:0"]).unwrap_err();
        assert!(matches!(slow, EvasionError::Argument { value: 0, .. }), "{slow}");
    }
}
