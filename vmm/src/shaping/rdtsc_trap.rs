//! `rdtsc-trap`: the guest's RDTSC and RDTSCP trap to this VMM, which answers each with
//! the TSC the guest would have read as the exit reached it, hiding nothing — the first
//! step of every RDTSC-trapping evader, and what pafish's `cpu_rdtsc` (two RDTSCs back to
//! back, ≥ 750 cycles apart on average) exists to catch: each read now costs an exit.

use super::evasion::{EvasionKind, Needs};
use super::policy::ExitPolicy;

pub const KIND: EvasionKind = EvasionKind {
    name: "rdtsc-trap",
    argument: None,
    does: "traps every RDTSC/RDTSCP and answers with the real TSC as the exit reached the VMM, hiding nothing",
    as_in: "the RDTSC exiting every TSC-trapping evader starts from, before any clock of its own",
    needs: Needs {
        tsc_trap: true,
        ..Needs::NONE
    },
    check: |_| Ok(()),
    build: |_| Box::new(RdtscTrap),
};

/// Answers every trapped read with the truth (the policy trait's default).
pub struct RdtscTrap;

impl ExitPolicy for RdtscTrap {}
