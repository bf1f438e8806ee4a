//! x86-64 guest setup: what a CPU needs to run 64-bit code from its first instruction.
//!
//! Like Firecracker's `arch/x86_64`, one file per concern: the GDT, a catch-all IDT, the identity page
//! tables, the control and segment registers, the CPUID table, instruction decoding.

pub mod cpuid;
pub mod decode;
pub mod gdt;
pub mod idt;
pub mod paging;
pub mod regs;
