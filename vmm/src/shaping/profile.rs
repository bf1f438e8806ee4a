//! Latency profiles: a target distribution of guest-visible CPUID cost, drawn per exit
//! from a seeded generator so that a run can be reproduced exactly.

use crate::stats::SplitMix64;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("no profile named `{name}` (known: {known}); or give a path to a profile JSON file")]
    Unknown { name: String, known: String },
    #[error("cannot read the profile {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the profile {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("the profile {path} is not usable: {why}")]
    Invalid { path: PathBuf, why: &'static str },
}

/// A profile file (see `configs/profiles/README.md`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Where the figures come from.
    pub sources: Vec<String>,
    pub distribution: Distribution,
    /// `host` where the profile stages a real host whose CPUID exits anyway (a Hyper-V
    /// root partition): `validate` then counts its cells as native, so a rule that calls
    /// them virtual has a false positive. Absent: a VM, as every shaped cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ground_truth: Option<GroundTruth>,
}

/// What a profile's runs truly are, where that is not "a VM".
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroundTruth {
    Host,
}

/// Guest-visible CPUID cost, in TSC cycles.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Distribution {
    Fixed { cycles: u64 },
    Normal { mean: f64, sd: f64 },
    Empirical { cycles: Vec<u64> },
}

impl Distribution {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Distribution::Normal { mean, sd }
                if !(mean.is_finite() && sd.is_finite() && *mean >= 0.0 && *sd >= 0.0) =>
            {
                Err("a normal distribution needs a finite, non-negative mean and sd")
            }
            Distribution::Empirical { cycles } if cycles.is_empty() => {
                Err("an empirical distribution needs at least one value")
            }
            Distribution::Normal { mean, sd } if mean + 6.0 * sd > crate::limits::MAX_SHAPING_CYCLES as f64 => {
                Err("a normal distribution's draws must stay under 10,000,000,000 cycles")
            }
            Distribution::Empirical { cycles } if cycles.iter().any(|&c| c > crate::limits::MAX_SHAPING_CYCLES) => {
                Err("an empirical value is over 10,000,000,000 cycles")
            }
            Distribution::Fixed { cycles } if *cycles > crate::limits::MAX_SHAPING_CYCLES => {
                Err("a fixed value is over 10,000,000,000 cycles")
            }
            _ => Ok(()),
        }
    }

    /// One draw; never negative.
    pub fn sample(&self, rng: &mut SplitMix64) -> u64 {
        match self {
            Distribution::Fixed { cycles } => *cycles,
            Distribution::Normal { mean, sd } => (mean + sd * rng.standard_normal())
                .clamp(0.0, crate::limits::MAX_SHAPING_CYCLES as f64)
                .round() as u64,
            Distribution::Empirical { cycles } => cycles[(rng.next_u64() % cycles.len() as u64) as usize],
        }
    }

    /// The distribution's median, what a run's guest-seen median should come close to.
    pub fn median(&self) -> u64 {
        match self {
            Distribution::Fixed { cycles } => *cycles,
            Distribution::Normal { mean, .. } => mean.round() as u64,
            Distribution::Empirical { cycles } => crate::stats::median(cycles),
        }
    }
}

/// The profiles shipped in `configs/profiles/`, built in so `--profile NAME` works
/// from anywhere.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "vtx-hw-assist",
        include_str!("../../../configs/profiles/vtx-hw-assist.json"),
    ),
    (
        "kvm-userspace-exit-2012",
        include_str!("../../../configs/profiles/kvm-userspace-exit-2012.json"),
    ),
    (
        "paravirt-hypercall",
        include_str!("../../../configs/profiles/paravirt-hypercall.json"),
    ),
    (
        "trap-heavy-nested",
        include_str!("../../../configs/profiles/trap-heavy-nested.json"),
    ),
    (
        "nested-kvm-on-hyperv",
        include_str!("../../../configs/profiles/nested-kvm-on-hyperv.json"),
    ),
    (
        "nested-kvm-on-hyperv-evmcs",
        include_str!("../../../configs/profiles/nested-kvm-on-hyperv-evmcs.json"),
    ),
    (
        "hyperv-root",
        include_str!("../../../configs/profiles/hyperv-root.json"),
    ),
    (
        "emulator-qemu-tcg",
        include_str!("../../../configs/profiles/emulator-qemu-tcg.json"),
    ),
    (
        "emulator-kvm-pvm",
        include_str!("../../../configs/profiles/emulator-kvm-pvm.json"),
    ),
];

pub fn built_in_names() -> Vec<&'static str> {
    BUILT_IN.iter().map(|(name, _)| *name).collect()
}

impl Profile {
    /// A built-in profile by name, or a JSON file by path.
    pub fn load(name_or_path: &str) -> Result<Self, ProfileError> {
        if let Some((name, text)) = BUILT_IN.iter().find(|(name, _)| *name == name_or_path) {
            return Self::parse(text, Path::new(&format!("configs/profiles/{name}.json")));
        }
        let path = Path::new(name_or_path);
        if !path.exists() && !name_or_path.contains(['/', '.']) {
            return Err(ProfileError::Unknown {
                name: name_or_path.to_owned(),
                known: built_in_names().join(", "),
            });
        }
        let text = crate::input::read_text_capped(path, crate::input::MAX_CONFIG_BYTES).map_err(|source| {
            ProfileError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::parse(&text, path)
    }

    /// A profile from its text (`path` names it in messages), checked.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ProfileError> {
        let profile: Profile = serde_json::from_str(text).map_err(|source| ProfileError::Parse {
            path: path.to_owned(),
            source,
        })?;
        profile.distribution.validate().map_err(|why| ProfileError::Invalid {
            path: path.to_owned(),
            why,
        })?;
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_loads() {
        for name in built_in_names() {
            let profile = Profile::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!profile.sources.is_empty(), "{name} cites no source");
            // Each source is one a reader can look up (a commit, a mailing-list message, an
            // issue, or this tool's own command), with its figure; or it says it found none.
            for source in &profile.sources {
                let traceable = [
                    "commit",
                    "Message-ID",
                    "issue #",
                    "Measured by this tool",
                    "measured by this tool",
                ]
                .iter()
                .any(|mark| source.contains(mark));
                let untraced = source.contains("No published");
                assert!(traceable || untraced, "{name}: {source}");
                assert!(
                    source.chars().any(|c| c.is_ascii_digit()),
                    "{name}: no figure in {source}"
                );
            }
        }
        // Every profile shipped in configs/profiles is built in.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/profiles");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
                assert!(built_in_names().contains(&stem.as_str()), "{stem} is not built in");
            }
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_targets() {
        let d = Distribution::Normal {
            mean: 1_500.0,
            sd: 200.0,
        };
        let draw = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..100).map(|_| d.sample(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn normal_draws_have_the_asked_mean_and_spread() {
        let d = Distribution::Normal {
            mean: 10_000.0,
            sd: 1_000.0,
        };
        let mut rng = SplitMix64::new(1);
        let draws: Vec<f64> = (0..20_000).map(|_| d.sample(&mut rng) as f64).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let sd = (draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / draws.len() as f64).sqrt();
        assert!((mean - 10_000.0).abs() < 50.0, "mean {mean}");
        assert!((sd - 1_000.0).abs() < 50.0, "sd {sd}");
    }

    #[test]
    fn values_past_the_shaping_limit_are_refused() {
        for text in [
            r#"{"name":"x","description":"d","sources":["s 1"],"distribution":{"kind":"fixed","cycles":18446744073709551615}}"#,
            r#"{"name":"x","description":"d","sources":["s 1"],"distribution":{"kind":"empirical","cycles":[1, 9223372036854775808]}}"#,
            r#"{"name":"x","description":"d","sources":["s 1"],"distribution":{"kind":"normal","mean":1e19,"sd":1}}"#,
        ] {
            assert!(Profile::parse(text, Path::new("p.json")).is_err(), "{text}");
        }
    }

    #[test]
    fn empirical_and_fixed_draw_only_their_values() {
        let mut rng = SplitMix64::new(3);
        let d = Distribution::Empirical { cycles: vec![5, 7, 9] };
        assert!((0..200).all(|_| [5, 7, 9].contains(&d.sample(&mut rng))));
        assert_eq!(Distribution::Fixed { cycles: 42 }.sample(&mut rng), 42);
        assert_eq!(d.median(), 7);
        assert_eq!(
            Distribution::Normal { mean: -5.0, sd: 0.0 }.sample(&mut rng),
            0,
            "never negative"
        );
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let bad = Profile::parse(
            r#"{"name":"x","description":"","sources":[],"distribution":{"kind":"empirical","cycles":[]}}"#,
            Path::new("x.json"),
        );
        assert!(matches!(bad, Err(ProfileError::Invalid { .. })));
        let typo = Profile::parse(
            r#"{"name":"x","description":"","sources":[],"distribution":{"kind":"gamma"}}"#,
            Path::new("x.json"),
        );
        assert!(matches!(typo, Err(ProfileError::Parse { .. })));
        assert!(matches!(
            Profile::load("no-such-profile"),
            Err(ProfileError::Unknown { .. })
        ));
    }
}
