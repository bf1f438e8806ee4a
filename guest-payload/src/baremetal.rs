//! What a freestanding binary must supply itself: the panic handler, and the memory
//! routines the compiler emits calls to (no libc here). `rep movsb`/`rep stosb` are short
//! and fast enough on every x86-64 CPU with ERMSB, and trivially correct.

use core::arch::asm;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No console formatting here: a panic is a bug in the payload. Stop the vCPU with a
    // triple fault, which the VMM reports with the RIP.
    // SAFETY: deliberately raises #UD; with no IDT this becomes a triple fault.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// # Safety
/// The C contract: `dest` and `src` valid for `n` bytes and not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller promises `dest`/`src` valid for `n` bytes and apart; DF is clear
    // (the ABI's default), so `rep movsb` copies forwards exactly `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The C contract: `dest` and `src` valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: the caller's contract, and a forward copy is correct when `dest` lies
        // below `src` or past the end of the source.
        return unsafe { memcpy(dest, src, n) };
    }
    // Overlapping with dest above src: copy backwards.
    // SAFETY: here `dest > src` and they overlap, so `n >= 1` and both `p + n - 1` lie in
    // the caller's valid ranges; DF is set for the copy and cleared again after it.
    unsafe {
        asm!(
            "std", "rep movsb", "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dest
}

/// # Safety
/// The C contract: `dest` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller promises `dest` valid for `n` bytes; DF is clear (the ABI's default).
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The C contract: `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n` and the caller promises both valid for `n` bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// The C contract: `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract as `memcmp`'s, passed on unchanged.
    unsafe { memcmp(a, b, n) }
}
