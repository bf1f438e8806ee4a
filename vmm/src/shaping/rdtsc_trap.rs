//! `rdtsc-trap`: the guest's RDTSC and RDTSCP trap to this VMM, which answers each with
//! the TSC the guest would have read as the exit reached it, hiding nothing — the first
//! step of every RDTSC-trapping evader, and what pafish's `cpu_rdtsc` (two RDTSCs back to
//! back, ≥ 750 cycles apart on average) exists to catch: each read now costs an exit.

use super::policy::ExitPolicy;

/// Answers every trapped read with the truth (the policy trait's default).
pub struct RdtscTrap;

impl ExitPolicy for RdtscTrap {}
