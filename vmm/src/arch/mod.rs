//! Architecture-specific guest setup. Only x86-64 is supported: the whole tool is about
//! x86's CPUID and TSC.

pub mod x86_64;
