//! The guest SDK's generated files: the C header with the ABI and the linker script.
//!
//! The ABI is defined once, in Rust (`abi.rs`). The C header in `sdk/include/vmm_abi.h`
//! and the linker script in `sdk/payload.ld` are *generated* from it here, with a static
//! assertion on the size of every struct and the offset of every field (`_Static_assert`
//! in C, `static_assert` in C++: the header is valid in both), so a compiler rejects a
//! header that drifted from the Rust layout; and the test below fails
//! when a checked-in file differs from what this generator prints. To regenerate after
//! an ABI change: `VMM_SDK_BLESS=1 cargo test -p guest-payload sdk`.

use crate::abi::*;
use core::fmt::Write;
use core::mem::{offset_of, size_of};
use std::string::String;
use std::{format, vec};

/// The linker script of every payload: loadable segments from the ABI's payload window.
/// C++ payloads may have static constructors: `.init_array` is kept, between
/// `__init_array_start` and `__init_array_end`, and the guest's `_start` runs them.
pub fn linker_script() -> String {
    let start = layout::PAYLOAD_START;
    let end = layout::PAYLOAD_END;
    format!(
        "/* Generated from guest_payload::layout by guest-payload/src/sdk.rs: do not edit. */
/* Payload segments must lie in [{start:#x}, {end:#x}) of guest RAM. */
ENTRY(_start)
SECTIONS
{{
    . = {start:#x};
    .text : {{ *(.text._start) *(.text .text.*) }}
    .rodata : ALIGN(4096) {{ *(.rodata .rodata.*) }}
    .data : ALIGN(4096) {{ *(.data .data.*) }}
    .init_array : ALIGN(8) {{
        __init_array_start = .;
        KEEP(*(SORT_BY_INIT_PRIORITY(.init_array.*)))
        KEEP(*(.init_array))
        __init_array_end = .;
    }}
    .bss : ALIGN(16) {{ *(.bss .bss.*) *(COMMON) }}
    /DISCARD/ : {{ *(.eh_frame*) *(.note*) *(.comment) }}
}}
"
    )
}

fn define(out: &mut String, name: &str, value: impl core::fmt::LowerHex, comment: &str) {
    let _ = writeln!(out, "/* {comment} */\n#define {name} {value:#x}u");
}

fn define_u64(out: &mut String, name: &str, value: u64, comment: &str) {
    let _ = writeln!(out, "/* {comment} */\n#define {name} {value:#x}ull");
}

/// One struct: its C fields, in order, with their Rust offsets, and its Rust size.
struct CStruct {
    name: &'static str,
    comment: &'static str,
    size: usize,
    fields: &'static [(&'static str, &'static str, usize)],
}

fn emit(out: &mut String, s: &CStruct) {
    let _ = writeln!(out, "/* {} */\nstruct {} {{", s.comment, s.name);
    for (decl, name, _) in s.fields {
        let _ = writeln!(out, "    {decl};", decl = decl.replace("{}", name));
    }
    let _ = writeln!(out, "}};");
    let _ = writeln!(
        out,
        "VMM_STATIC_ASSERT(sizeof(struct {}) == {}, \"{} size\");",
        s.name, s.size, s.name
    );
    for (_, name, offset) in s.fields {
        let _ = writeln!(
            out,
            "VMM_STATIC_ASSERT(offsetof(struct {}, {name}) == {offset}, \"{}.{name}\");",
            s.name, s.name
        );
    }
    out.push('\n');
}

/// `sdk/include/vmm_abi.h`: the guest/host ABI for C.
pub fn c_header() -> String {
    let mut out = String::new();
    out.push_str(
        "/* vmm guest ABI for C and C++. Generated from guest-payload/src/abi.rs by guest-payload/src/sdk.rs:\n \
         * do not edit; regenerate with `VMM_SDK_BLESS=1 cargo test -p guest-payload sdk`.\n \
         * docs/sdk.md says what the VMM demands of a payload, in order. */\n\
         #ifndef VMM_ABI_H\n#define VMM_ABI_H\n\n#include <stddef.h>\n#include <stdint.h>\n\n\
         /* Every struct's size and field offsets are checked against the Rust ABI at compile time. */\n\
         #ifdef __cplusplus\n#define VMM_STATIC_ASSERT(condition, what) static_assert(condition, what)\n\
         #else\n#define VMM_STATIC_ASSERT(condition, what) _Static_assert(condition, what)\n#endif\n\n",
    );
    define(
        &mut out,
        "VMM_ABI_VERSION",
        ABI_VERSION,
        "Bumped whenever a layout or meaning changes.",
    );
    out.push_str("\n/* Guest physical memory map (identity-mapped: virtual == physical). */\n");
    for (name, value, comment) in [
        (
            "VMM_CONFIG_ADDR",
            layout::CONFIG_ADDR,
            "The config block the VMM writes before the first instruction.",
        ),
        (
            "VMM_STACK_BOTTOM",
            layout::STACK_BOTTOM,
            "Lowest address of the guest stack.",
        ),
        ("VMM_STACK_TOP", layout::STACK_TOP, "The initial stack pointer."),
        (
            "VMM_PAYLOAD_START",
            layout::PAYLOAD_START,
            "Where loadable segments may start.",
        ),
        (
            "VMM_PAYLOAD_END",
            layout::PAYLOAD_END,
            "Loadable segments must end below this.",
        ),
        (
            "VMM_COUNTER_BLOCK_ADDR",
            layout::COUNTER_BLOCK_ADDR,
            "The counter block of a run with a counter vCPU (config.counter_addr says).",
        ),
        (
            "VMM_KVMCLOCK_ADDR",
            layout::KVMCLOCK_ADDR,
            "The guest's kvmclock page (32 bytes), where the timing core asks KVM for it.",
        ),
        (
            "VMM_COUNTER_CODE_ADDR",
            layout::COUNTER_CODE_ADDR,
            "Reserved: the counter vCPU's code.",
        ),
        (
            "VMM_RESULT_ADDR",
            layout::RESULT_ADDR,
            "The result header, followed by the samples.",
        ),
    ] {
        define_u64(&mut out, name, value, comment);
    }
    out.push_str("\n/* I/O ports. */\n");
    define(
        &mut out,
        "VMM_PORT_CONSOLE",
        ports::CONSOLE,
        "One byte of console output per `out`.",
    );
    define(
        &mut out,
        "VMM_PORT_DONE",
        ports::DONE,
        "A 32-bit status (enum vmm_status) when done.",
    );
    define(
        &mut out,
        "VMM_PORT_HYPERCALL",
        ports::HYPERCALL,
        "Paravirtual CPUID: `out dx, eax`, leaf in EAX, subleaf in ECX; answer in EAX-EDX.",
    );
    define(
        &mut out,
        "VMM_PORT_CPUID_TRAP",
        ports::CPUID_TRAP,
        "Reserved for the VMM's io-patch trap: do not use.",
    );
    define(
        &mut out,
        "VMM_PORT_PM_TIMER",
        ports::PM_TIMER,
        "An ACPI PM timer: `in eax, dx` reads a 32-bit count at VMM_PM_TIMER_HZ (a VM's only).",
    );
    define_u64(
        &mut out,
        "VMM_PM_TIMER_HZ",
        crate::abi::clocks::PM_TIMER_HZ,
        "The PM timer's rate, 3.579545 MHz.",
    );
    out.push_str("\n/* Magics (little-endian ASCII). */\n");
    define_u64(&mut out, "VMM_CONFIG_MAGIC", CONFIG_MAGIC, "\"VMMCONF1\"");
    define_u64(&mut out, "VMM_RESULT_MAGIC", RESULT_MAGIC, "\"VMMRSLT1\"");
    define_u64(&mut out, "VMM_PAYLOAD_INFO_MAGIC", PAYLOAD_INFO_MAGIC, "\"VMMINFO1\"");
    out.push_str("\n/* Config flags. */\n");
    define(
        &mut out,
        "VMM_FLAG_PARAVIRT_CPUID",
        flags::PARAVIRT_CPUID,
        "Ask for CPUID by hypercall instead of executing it.",
    );
    define(
        &mut out,
        "VMM_FLAG_HANG",
        flags::HANG,
        "Spin forever (tests the VMM's watchdog).",
    );
    define(
        &mut out,
        "VMM_FLAG_FAULT",
        flags::FAULT,
        "Fault on purpose (tests the VMM's fault handling).",
    );
    define(
        &mut out,
        "VMM_FLAG_STRAY_MMIO",
        flags::STRAY_MMIO,
        "Read memory no RAM backs (tests the VMM's refusal of stray MMIO).",
    );
    define(
        &mut out,
        "VMM_FLAG_STRAY_PORT",
        flags::STRAY_PORT,
        "Write to a port with no device (tests the VMM's refusal of stray port I/O).",
    );
    define(
        &mut out,
        "VMM_FLAG_CPUID_SNAPSHOT",
        flags::CPUID_SNAPSHOT,
        "Fill the CPUID snapshot and the site bytes.",
    );
    out.push_str("\n/* The counter vCPU (struct vmm_counter_block). */\n");
    define_u64(
        &mut out,
        "VMM_COUNTER_STAMP_REQUESTED",
        counter::STAMP_REQUESTED,
        "Write to stamp_request: the counter vCPU stores its TSC in stamp, then zero in stamp_request.",
    );
    define_u64(
        &mut out,
        "VMM_COUNTER_STOP",
        counter::STOP,
        "Write to stamp_request: the loop returns (native twins' counter threads).",
    );
    define_u64(
        &mut out,
        "VMM_COUNTER_MAX_POLLS",
        counter::MAX_POLLS,
        "Polls of the counter before a guest gives up (VMM_STATUS_COUNTER_STALLED).",
    );
    define_u64(
        &mut out,
        "VMM_XOR_ITERATIONS",
        counter::XOR_ITERATIONS,
        "Iterations of the dependent XOR chain per xor-loop sample.",
    );
    out.push_str("\n/* Native twins. */\n");
    define(
        &mut out,
        "VMM_NATIVE_TWIN_STATUS_BASE",
        NATIVE_TWIN_STATUS_BASE,
        "A native twin exits with this plus its status when the detector stops with one other than ok.",
    );
    out.push_str("\n/* Payload capabilities (struct vmm_payload_info.capabilities). */\n");
    define(
        &mut out,
        "VMM_CAP_PARAVIRT_CPUID",
        capabilities::PARAVIRT_CPUID,
        "Honours VMM_FLAG_PARAVIRT_CPUID.",
    );
    define(
        &mut out,
        "VMM_CAP_VERDICT",
        capabilities::VERDICT,
        "Reports its own verdict.",
    );
    define(
        &mut out,
        "VMM_CAP_TIMING_CORE",
        capabilities::TIMING_CORE,
        "Honours config.probes and config.iterations.",
    );
    define(
        &mut out,
        "VMM_CAP_CPUID_SNAPSHOT",
        capabilities::CPUID_SNAPSHOT,
        "Honours VMM_FLAG_CPUID_SNAPSHOT.",
    );
    define(
        &mut out,
        "VMM_CAP_RDTSCP",
        capabilities::RDTSCP,
        "Executes rdtscp: the VMM probes that this KVM can run it in a guest, and refuses the run where not.",
    );
    define(
        &mut out,
        "VMM_CAP_COUNTER",
        capabilities::COUNTER,
        "Reads the counter vCPU's clock (config.counter_addr): the VMM refuses to run it without --vcpus 2.",
    );
    out.push_str("\n/* Probes: bit (1 << probe) in config.probes; samples laid out in VMM_PROBE_ORDER. */\n");
    for probe in Probe::ALL {
        let name = probe.name().to_uppercase().replace('-', "_");
        define(&mut out, &format!("VMM_PROBE_{name}"), probe as u32, probe.name());
    }
    let order: std::vec::Vec<std::string::String> = Probe::ALL.iter().map(|p| format!("{}", *p as u32)).collect();
    let _ = writeln!(
        out,
        "/* The order samples follow in the result block. */\n#define VMM_PROBE_ORDER {{ {} }}",
        order.join(", ")
    );
    let _ = writeln!(out, "#define VMM_PROBE_COUNT {}u", Probe::ALL.len());
    out.push_str("\n/* What the payload rings on VMM_PORT_DONE. */\nenum vmm_status {\n");
    for status in [
        Status::Ok,
        Status::BadConfigMagic,
        Status::AbiMismatch,
        Status::ResultAreaTooSmall,
        Status::BadConfig,
        Status::NoCounter,
        Status::CounterStalled,
    ] {
        let name = format!("{status:?}");
        let upper: String = name
            .chars()
            .flat_map(|c| {
                if c.is_uppercase() {
                    vec!['_', c]
                } else {
                    vec![c.to_ascii_uppercase()]
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "    VMM_STATUS{upper} = {}, /* {} */",
            status as u32,
            status.describe()
        );
    }
    out.push_str("};\n\n/* A payload's own verdict (result header .verdict). */\nenum vmm_verdict {\n");
    for (name, v) in [
        ("NONE", PayloadVerdict::None),
        ("VIRTUAL", PayloadVerdict::Virtual),
        ("NATIVE", PayloadVerdict::Native),
        ("UNSURE", PayloadVerdict::Unsure),
    ] {
        let _ = writeln!(out, "    VMM_VERDICT_{name} = {},", v as u32);
    }
    out.push_str("};\n\n");
    let _ = writeln!(out, "#define VMM_REASON_BYTES {REASON_BYTES}u");
    let _ = writeln!(out, "#define VMM_SNAPSHOT_LEAVES {}u\n", CPUID_SNAPSHOT_LEAVES.len());

    emit(
        &mut out,
        &CStruct {
            name: "vmm_config",
            comment: "Written by the VMM at VMM_CONFIG_ADDR before the first instruction.",
            size: size_of::<Config>(),
            fields: &[
                ("uint64_t {}", "magic", offset_of!(Config, magic)),
                ("uint32_t {}", "abi_version", offset_of!(Config, abi_version)),
                ("uint32_t {}", "flags", offset_of!(Config, flags)),
                ("uint32_t {}", "iterations", offset_of!(Config, iterations)),
                ("uint32_t {}", "warmup", offset_of!(Config, warmup)),
                ("uint32_t {}", "probes", offset_of!(Config, probes)),
                ("uint32_t {}", "cpuid_leaf", offset_of!(Config, cpuid_leaf)),
                ("uint32_t {}", "cpuid_subleaf", offset_of!(Config, cpuid_subleaf)),
                ("uint32_t {}", "tsc_khz", offset_of!(Config, tsc_khz)),
                ("uint64_t {}", "result_addr", offset_of!(Config, result_addr)),
                ("uint64_t {}", "result_capacity", offset_of!(Config, result_capacity)),
                ("uint64_t {}", "counter_addr", offset_of!(Config, counter_addr)),
            ],
        },
    );
    emit(
        &mut out,
        &CStruct {
            name: "vmm_cpuid_record",
            comment: "One CPUID answer as the guest saw it.",
            size: size_of::<CpuidRecord>(),
            fields: &[
                ("uint32_t {}", "leaf", offset_of!(CpuidRecord, leaf)),
                ("uint32_t {}", "subleaf", offset_of!(CpuidRecord, subleaf)),
                ("uint32_t {}", "eax", offset_of!(CpuidRecord, eax)),
                ("uint32_t {}", "ebx", offset_of!(CpuidRecord, ebx)),
                ("uint32_t {}", "ecx", offset_of!(CpuidRecord, ecx)),
                ("uint32_t {}", "edx", offset_of!(CpuidRecord, edx)),
            ],
        },
    );
    emit(
        &mut out,
        &CStruct {
            name: "vmm_clock_readings",
            comment: "Every clock read back to back; zero where `clocks` says it was not read.",
            size: size_of::<crate::abi::ClockReadings>(),
            fields: &[
                ("uint64_t {}", "tsc", offset_of!(crate::abi::ClockReadings, tsc)),
                ("uint64_t {}", "msr_tsc", offset_of!(crate::abi::ClockReadings, msr_tsc)),
                (
                    "uint64_t {}",
                    "pm_timer",
                    offset_of!(crate::abi::ClockReadings, pm_timer),
                ),
                (
                    "uint64_t {}",
                    "kvmclock_ns",
                    offset_of!(crate::abi::ClockReadings, kvmclock_ns),
                ),
                ("uint64_t {}", "rdtscp", offset_of!(crate::abi::ClockReadings, rdtscp)),
                ("uint64_t {}", "aperf", offset_of!(crate::abi::ClockReadings, aperf)),
                ("uint64_t {}", "mperf", offset_of!(crate::abi::ClockReadings, mperf)),
            ],
        },
    );
    emit(
        &mut out,
        &CStruct {
            name: "vmm_result_header",
            comment: "Written by the payload at config.result_addr; int64_t samples follow it \
                      (signed: negative when the TSC ran backwards), `iterations` per probe in \
                      `probes`, in VMM_PROBE_ORDER; then, where `ticks` is non-zero, as many \
                      int64_t counter tick counts in the same order. Write `magic` last.",
            size: size_of::<ResultHeader>(),
            fields: &[
                ("uint64_t {}", "magic", offset_of!(ResultHeader, magic)),
                ("uint32_t {}", "abi_version", offset_of!(ResultHeader, abi_version)),
                ("uint32_t {}", "status", offset_of!(ResultHeader, status)),
                ("uint32_t {}", "iterations", offset_of!(ResultHeader, iterations)),
                ("uint32_t {}", "probes", offset_of!(ResultHeader, probes)),
                ("uint64_t {}", "tsc_start", offset_of!(ResultHeader, tsc_start)),
                ("uint64_t {}", "tsc_end", offset_of!(ResultHeader, tsc_end)),
                ("uint32_t {}", "cpuid_count", offset_of!(ResultHeader, cpuid_count)),
                (
                    "uint32_t {}",
                    "site_bytes_valid",
                    offset_of!(ResultHeader, site_bytes_valid),
                ),
                ("uint8_t {}[4][2]", "site_bytes", offset_of!(ResultHeader, site_bytes)),
                (
                    "struct vmm_cpuid_record {}[VMM_SNAPSHOT_LEAVES]",
                    "cpuid",
                    offset_of!(ResultHeader, cpuid),
                ),
                ("uint32_t {}", "verdict", offset_of!(ResultHeader, verdict)),
                ("uint32_t {}", "ticks", offset_of!(ResultHeader, ticks)),
                ("int64_t {}", "score_milli", offset_of!(ResultHeader, score_milli)),
                ("char {}[VMM_REASON_BYTES]", "reason", offset_of!(ResultHeader, reason)),
                ("uint64_t {}", "rate_cycles", offset_of!(ResultHeader, rate_cycles)),
                ("uint64_t {}", "rate_ticks", offset_of!(ResultHeader, rate_ticks)),
                ("uint32_t {}", "clocks", offset_of!(ResultHeader, clocks)),
                (
                    "uint32_t {}",
                    "kvmclock_tsc_khz",
                    offset_of!(ResultHeader, kvmclock_tsc_khz),
                ),
                (
                    "struct vmm_clock_readings {}[2]",
                    "quiet",
                    offset_of!(ResultHeader, quiet),
                ),
                (
                    "struct vmm_clock_readings {}[2]",
                    "span",
                    offset_of!(ResultHeader, span),
                ),
            ],
        },
    );
    emit(
        &mut out,
        &CStruct {
            name: "vmm_counter_block",
            comment: "At config.counter_addr when the run has a counter vCPU: `counter` goes up by \
                      one per loop iteration on another vCPU (natively, another CPU). Volatile.",
            size: size_of::<CounterBlock>(),
            fields: &[
                ("uint64_t {}", "counter", offset_of!(CounterBlock, counter)),
                ("uint64_t {}[7]", "pad0", offset_of!(CounterBlock, pad0)),
                ("uint64_t {}", "stamp_request", offset_of!(CounterBlock, stamp_request)),
                ("uint64_t {}[7]", "pad1", offset_of!(CounterBlock, pad1)),
                ("uint64_t {}", "stamp", offset_of!(CounterBlock, stamp)),
                ("uint64_t {}[7]", "pad2", offset_of!(CounterBlock, pad2)),
            ],
        },
    );
    emit(
        &mut out,
        &CStruct {
            name: "vmm_payload_info",
            comment: "What a payload declares, at the global symbol `vmm_payload_info`.",
            size: size_of::<PayloadInfo>(),
            fields: &[
                ("uint64_t {}", "magic", offset_of!(PayloadInfo, magic)),
                ("uint32_t {}", "abi_version", offset_of!(PayloadInfo, abi_version)),
                ("uint32_t {}", "capabilities", offset_of!(PayloadInfo, capabilities)),
                ("char {}[32]", "name", offset_of!(PayloadInfo, name)),
            ],
        },
    );
    out.push_str("#endif /* VMM_ABI_H */\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in SDK files must be exactly what the Rust ABI generates: change a field
    /// in `abi.rs` without regenerating and this fails.
    #[test]
    fn sdk_files_match_the_rust_abi() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk");
        for (path, generated) in [
            (root.join("include/vmm_abi.h"), c_header()),
            (root.join("payload.ld"), linker_script()),
        ] {
            if std::env::var_os("VMM_SDK_BLESS").is_some() {
                std::fs::write(&path, &generated).expect("write the generated SDK file");
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == generated,
                "{} differs from the Rust ABI: regenerate with VMM_SDK_BLESS=1 cargo test -p guest-payload sdk",
                path.display()
            );
        }
    }

    #[test]
    fn the_header_asserts_every_field_of_every_struct() {
        let header = c_header();
        for field in [
            "vmm_config, result_capacity",
            "vmm_result_header, reason",
            "vmm_payload_info, name",
        ] {
            assert!(header.contains(&format!("offsetof(struct {field})")), "{field}");
        }
        assert!(header.contains(&format!("#define VMM_ABI_VERSION {ABI_VERSION:#x}u")));
    }
}
