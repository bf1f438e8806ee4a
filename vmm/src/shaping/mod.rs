//! What an exit costs the guest: the per-vCPU policy of a hypervisor that wants to look
//! like something it is not.
//!
//! An [`ExitPolicy`] is told of each exit vCPU 0 takes to this VMM — as it begins, once a
//! CPUID was answered, as it ends — and may move the clocks the guest can read: the vCPU's
//! TSC offset, the counter vCPU (pause it, share a TSC move with it), the whole VM's TSC
//! rate before the run. Modes decide who answers CPUID (`crate::modes`); policies decide
//! what that costs, and nothing else does. Every policy runs on the `Vcpu` trait, so each
//! is unit-tested on `SimVcpu` with a simulated clock.
//!
//! The policies:
//! - [`latency::Latency`]: inject, virtual inject, hide, profiles (`--inject-*`, `--hide`,
//!   `--profile`);
//! - the building blocks of [`registry::EVASIONS`] (`--evade NAME`), one file each:
//!   [`pause_counter`], [`shared_offset`], [`tsc_khz`];
//! - the clocks an evader file ([`evader`], `--evade FILE` or a zoo member's name)
//!   answers the guest's TSC reads from ([`ExitPolicy::tsc_read`]) or moves its offset
//!   with, each faithful to the project it is named after: [`rdtsc_trap`], [`hide_exits`],
//!   [`bettertiming`], [`rdtsc_kvm_handler`], [`rdtsc_shield`], [`ophion`],
//!   [`offset_clock`], [`phantom`], [`fixed_step`].
//!
//! Adding an evader is a file in `configs/evaders/`; adding a clock is a file here and a
//! variant of [`evader::Clock`]. What a run's shaping was compared with ([`outcome`]) is data; the
//! calibration runs that produce it are `measure`'s, and what a report says of it is
//! `crate::report::shaping`'s.

pub mod bettertiming;
pub mod evader;
pub mod evasion;
pub mod fixed_step;
pub mod hide_exits;
pub mod latency;
pub mod offset_clock;
pub mod ophion;
pub mod outcome;
pub mod pause_counter;
pub mod phantom;
pub mod plan;
pub mod policy;
pub mod profile;
pub mod rdtsc_kvm_handler;
pub mod rdtsc_shield;
pub mod rdtsc_trap;
pub mod registry;
pub mod shared_offset;
pub mod tsc_khz;

pub use policy::{ExitPolicy, Policies, PolicyRecord, ShapedExits, ShapingError, TscRead};
