//! Control, segment and general registers for a vCPU that starts in 64-bit long mode.

use super::{gdt, paging};
use guest_payload::layout::{GDT_ADDR, STACK_TOP};
use kvm_bindings::{kvm_regs, kvm_sregs};

/// CR0: protection, monitor coprocessor, extension type, numeric errors, write protect, paging.
pub const CR0_LONG_MODE: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: physical address extension, and SSE enabled (the compiler emits SSE moves).
pub const CR4_LONG_MODE: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: long mode enabled and active.
pub const EFER_LONG_MODE: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: only the always-one bit; interrupts stay disabled (there is no IDT).
pub const RFLAGS_INITIAL: u64 = 1 << 1;

/// Puts `sregs` in long mode with our GDT, page tables and flat segments.
pub fn setup_long_mode(sregs: &mut kvm_sregs) {
    let table = gdt::table();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;

    sregs.cs = gdt::segment(&table, gdt::CODE_INDEX);
    let data = gdt::segment(&table, gdt::DATA_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;

    sregs.cr3 = paging::root();
    sregs.cr4 = CR4_LONG_MODE;
    sregs.cr0 = CR0_LONG_MODE;
    sregs.efer = EFER_LONG_MODE;
}

/// General registers at the payload's entry: RIP, a 16-byte-aligned stack as after a
/// `call` (RSP + 8 aligned, as the System V ABI expects at a function's entry).
pub fn entry_registers(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP - 8,
        rbp: 0,
        rflags: RFLAGS_INITIAL,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_registers_are_consistent() {
        let mut sregs = kvm_sregs::default();
        setup_long_mode(&mut sregs);
        assert_eq!(sregs.cs.l, 1, "64-bit code segment");
        assert_ne!(sregs.cr0 & (1 << 31), 0, "paging on");
        assert_ne!(sregs.cr4 & (1 << 5), 0, "PAE on");
        assert_eq!(sregs.efer & EFER_LONG_MODE, EFER_LONG_MODE);
        assert_eq!(sregs.gdt.limit, 23);
        let regs = entry_registers(0x10_0000);
        assert_eq!((regs.rsp + 8) % 16, 0);
    }
}
