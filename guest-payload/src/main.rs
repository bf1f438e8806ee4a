//! The bare-metal guest: reads the config block, runs the timing core, writes the result
//! block and rings the "done" port.
//!
//! The VMM starts the vCPU here already in 64-bit long mode (GDT, identity-mapped page
//! tables, stack set up), with interrupts off and no IDT: any exception is a triple fault,
//! which the VMM reports. There is no firmware and no runtime, hence `no_std`/`no_main`.
#![no_std]
#![no_main]

use core::mem::size_of;
use core::ptr;
use guest_payload::timing::{self, CpuidCall, MeasureError, Request, TimerOut};
use guest_payload::{
    capabilities, PayloadInfo, ABI_VERSION, CONFIG_MAGIC, CPUID_SNAPSHOT_LEAVES, PAYLOAD_INFO_MAGIC, RESULT_MAGIC,
};
use guest_payload::{clocks, flags, layout, ports, probes_in, Config, Cycles, Probe, ResultHeader, Status};

mod baremetal;

/// What this payload declares to the VMM before it runs (read from the ELF).
#[no_mangle]
#[used]
pub static vmm_payload_info: PayloadInfo = PayloadInfo {
    magic: PAYLOAD_INFO_MAGIC,
    abi_version: ABI_VERSION,
    capabilities: capabilities::PARAVIRT_CPUID | capabilities::TIMING_CORE | capabilities::CPUID_SNAPSHOT,
    name: *b"vmm timing core\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
};

/// The entry point named in the linker script (the ELF's `e_entry`).
#[no_mangle]
pub extern "C" fn _start() -> ! {
    // SAFETY: the VMM wrote a `Config` at CONFIG_ADDR before starting the vCPU; we
    // validate its magic and version before trusting anything else in it.
    let config: Config = unsafe { ptr::read_volatile(layout::CONFIG_ADDR as *const Config) };
    let status = run(&config);
    ring_done(status)
}

fn run(config: &Config) -> Status {
    if config.magic != CONFIG_MAGIC {
        return Status::BadConfigMagic;
    }
    if config.abi_version != ABI_VERSION {
        return Status::AbiMismatch;
    }
    if config.flags & flags::HANG != 0 {
        console("guest: hanging on purpose\n");
        loop {
            core::hint::spin_loop();
        }
    }
    if config.flags & flags::FAULT != 0 {
        console("guest: faulting on purpose\n");
        // SAFETY: deliberately raises #UD; with no IDT this becomes a triple fault.
        unsafe { core::arch::asm!("ud2", options(noreturn)) }
    }
    if config.flags & flags::STRAY_MMIO != 0 {
        console("guest: reading memory no RAM backs\n");
        // SAFETY: the address is identity-mapped; the read exits to the VMM, which stops
        // the guest (it never returns here with a value).
        unsafe { ptr::read_volatile(layout::STRAY_MMIO_ADDR as *const u32) };
        return Status::BadConfig;
    }
    if config.flags & flags::STRAY_PORT != 0 {
        console("guest: writing to a port with no device\n");
        // SAFETY: a port write has no effect on guest memory; the VMM stops the guest.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") ports::STRAY, in("al") 0u8, options(nostack));
        }
        return Status::BadConfig;
    }
    if config.iterations == 0 || config.probes == 0 {
        return Status::BadConfig;
    }
    if config.result_bytes_needed() > config.result_capacity {
        return Status::ResultAreaTooSmall;
    }
    if config.counter_addr == 0 && probes_in(config.probes).any(Probe::needs_counter) {
        return Status::NoCounter;
    }
    console("guest: measuring\n");

    let cpuid_call = if config.flags & flags::PARAVIRT_CPUID != 0 {
        CpuidCall::Hypercall
    } else {
        CpuidCall::Instruction
    };
    let request = Request {
        cpuid_leaf: config.cpuid_leaf,
        cpuid_subleaf: config.cpuid_subleaf,
        warmup: config.warmup,
        cpuid_call,
        counter_addr: config.counter_addr,
    };
    let mut header = ResultHeader {
        abi_version: ABI_VERSION,
        status: Status::Ok as u32,
        iterations: config.iterations,
        probes: config.probes,
        ticks: u32::from(config.counter_addr != 0),
        tsc_start: timing::read_tsc(),
        ..Default::default()
    };

    let iterations = config.iterations as usize;
    let samples_base = config.result_addr + size_of::<ResultHeader>() as u64;
    let area = (iterations * size_of::<Cycles>()) as u64;
    let ticks_base = samples_base + u64::from(config.probes.count_ones()) * area;
    let slot = |base: u64, probe: Probe| -> &'static mut [Cycles] {
        let index = probes_in(config.probes).take_while(|p| *p != probe).count() as u64;
        // SAFETY: the area [result_addr, result_addr + result_capacity) is guest RAM the
        // VMM reserved for us and nothing else aliases it; its size was checked above,
        // and each probe's slot (TSC, then ticks) is a disjoint part of it.
        unsafe { core::slice::from_raw_parts_mut((base + index * area) as *mut Cycles, iterations) }
    };
    let with_ticks = config.counter_addr != 0;
    if with_ticks {
        match timing::measure_counter_rate(&request, timing::read_pm_timer) {
            Ok((cycles, ticks)) => (header.rate_cycles, header.rate_ticks) = (cycles, ticks),
            Err(_) => return Status::CounterStalled,
        }
    }
    let with_clocks = config.flags & flags::CLOCKS != 0;
    let kvmclock = with_clocks
        && config.flags & flags::KVMCLOCK != 0
        && match timing::enable_kvmclock() {
            Some(khz) => {
                header.kvmclock_tsc_khz = khz;
                true
            }
            None => false,
        };
    if with_clocks {
        let also = |flag: u32, bit: u32| if config.flags & flag != 0 { bit } else { 0 };
        header.clocks = clocks::TSC
            | clocks::MSR_TSC
            | clocks::PM_TIMER
            | if kvmclock { clocks::KVMCLOCK } else { 0 }
            | also(flags::RDTSCP_CLOCK, clocks::RDTSCP)
            | also(flags::APERF_MPERF, clocks::APERF_MPERF);
        let which = header.clocks;
        header.quiet = timing::quiet_span(|end| timing::read_vm_clocks(which, end), timing::read_pm_timer);
        header.span[0] = timing::read_vm_clocks(which, false);
    }
    let timer_pair = Probe::TimerCpuid.bit() | Probe::TimerLfence8.bit();
    for probe in probes_in(config.probes) {
        let measured = if probe == Probe::TimerLfence8 && config.probes & timer_pair == timer_pair {
            // Measured with TimerCpuid, pair by pair.
            Ok(())
        } else if probe == Probe::TimerCpuid && config.probes & timer_pair == timer_pair {
            timing::measure_timer_pairs(
                &request,
                TimerOut {
                    cpuid_tsc: slot(samples_base, Probe::TimerCpuid),
                    cpuid_ticks: slot(ticks_base, Probe::TimerCpuid),
                    lfence_tsc: slot(samples_base, Probe::TimerLfence8),
                    lfence_ticks: slot(ticks_base, Probe::TimerLfence8),
                },
            )
        } else {
            let ticks = with_ticks.then(|| slot(ticks_base, probe));
            timing::measure(probe, &request, slot(samples_base, probe), ticks)
        };
        match measured {
            Ok(()) => {}
            Err(MeasureError::NoCounter) => return Status::NoCounter,
            Err(MeasureError::CounterStalled) => return Status::CounterStalled,
        }
    }

    if with_clocks {
        header.span[1] = timing::read_vm_clocks(header.clocks, true);
    }

    if config.flags & flags::CPUID_SNAPSHOT != 0 {
        for (record, &(leaf, subleaf)) in header.cpuid.iter_mut().zip(CPUID_SNAPSHOT_LEAVES.iter()) {
            *record = timing::query_cpuid(cpuid_call, leaf, subleaf);
        }
        header.cpuid_count = CPUID_SNAPSHOT_LEAVES.len() as u32;
        let sites = timing::cpuid_site_bytes();
        header.site_bytes[..sites.len()].copy_from_slice(&sites);
        header.site_bytes_valid = 1;
    }

    header.tsc_end = timing::read_tsc();
    // The magic goes in last, so a VMM never takes a half-written block for a whole one.
    header.magic = RESULT_MAGIC;
    // SAFETY: see above: the result area is ours and large enough for the header.
    unsafe { ptr::write_volatile(config.result_addr as *mut ResultHeader, header) };
    console("guest: done\n");
    Status::Ok
}

fn console(text: &str) {
    for byte in text.bytes() {
        // SAFETY: port output to the VMM's console; no memory is touched.
        unsafe { core::arch::asm!("out dx, al", in("dx") ports::CONSOLE, in("al") byte, options(nomem, nostack)) };
    }
}

fn ring_done(status: Status) -> ! {
    loop {
        // SAFETY: port output to the VMM's done port. The VMM stops the vCPU here; if it
        // ever resumes us, we ring again.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") ports::DONE, in("eax") status as u32, options(nomem, nostack));
            core::arch::asm!("hlt", options(nomem, nostack));
        }
    }
}
