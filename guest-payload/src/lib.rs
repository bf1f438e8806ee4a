//! The guest/host ABI of `vmm` and the CPUID/NOP timing core.
//!
//! Everything the guest and the VMM must agree on is defined here, once: the guest
//! physical memory map, the I/O ports, the config block the VMM writes before the vCPU
//! starts and the result block the guest writes back. The timing core lives here too, so
//! that the bare-metal guest (`src/main.rs`) and the VMM's native runner execute the very
//! same instructions.
//!
//! `no_std`: the guest has no operating system under it.
#![no_std]

#[cfg(not(target_arch = "x86_64"))]
compile_error!("guest-payload measures x86-64 instructions (CPUID, RDTSC): build it for x86_64");

#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod abi;
/// The generated C header and linker script of the guest SDK (needs `std`).
#[cfg(any(test, feature = "std"))]
pub mod sdk;
pub mod timing;

pub use abi::*;
