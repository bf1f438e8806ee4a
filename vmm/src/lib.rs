//! `vmm`: a KVM testbed that boots a tiny guest timing CPUID against NOP, and decides how
//! CPUID reaches the VMM and what it appears to cost, so VM-detection timing can be
//! validated against controlled hypervisor behaviour.
//!
//! Architecture, one concern per module:
//! - [`arch::x86_64`]: GDT, page tables, long-mode registers, the CPUID table;
//! - [`vm`]: a VM with the measuring vCPU and, with `--vcpus 2`, a counter vCPU beside it —
//!   memory, ELF loading, the run loop, exits, watchdog;
//! - [`modes`]: the exit handling of each `--mode`;
//! - [`shaping`]: what a CPUID exit appears to cost (inject, hide, profiles);
//! - [`native`]: the same timing core in a pinned host thread;
//! - [`measure`]: one run in one mode; [`experiment`]: runs measured, judged and reported;
//! - [`detector`]: the rules that judge a run virtual or native;
//! - [`stats`], [`report`]: statistics and the table/JSON/CSV outputs;
//! - [`host`], [`doctor`]: what this host and its KVM are and can do;
//! - [`validation`]: the experiment matrix and the rules' confusion matrices;
//! - [`cli`], [`commands`]: the command line and what each subcommand does.
//!
//! The guest ABI and the timing core are in the `guest-payload` crate, shared by both sides.

pub mod arch;
pub mod busy;
pub mod cli;
pub mod commands;
pub mod console;
pub mod cpu_lock;
pub mod detector;
pub mod doctor;
pub mod escape;
pub mod experiment;
pub mod host;
pub mod input;
pub mod interrupt;
pub mod limits;
pub mod measure;
pub mod modes;
pub mod native;
pub mod output;
pub mod remedy;
pub mod report;
pub mod results;
pub mod shaping;
pub mod stats;
pub mod validation;
pub mod vm;
