/* vmm guest ABI for C and C++. Generated from guest-payload/src/abi.rs by guest-payload/src/sdk.rs:
 * do not edit; regenerate with `VMM_SDK_BLESS=1 cargo test -p guest-payload sdk`.
 * docs/sdk.md says what the VMM demands of a payload, in order. */
#ifndef VMM_ABI_H
#define VMM_ABI_H

#include <stddef.h>
#include <stdint.h>

/* Every struct's size and field offsets are checked against the Rust ABI at compile time. */
#ifdef __cplusplus
#define VMM_STATIC_ASSERT(condition, what) static_assert(condition, what)
#else
#define VMM_STATIC_ASSERT(condition, what) _Static_assert(condition, what)
#endif

/* Bumped whenever a layout or meaning changes. */
#define VMM_ABI_VERSION 0x8u

/* Guest physical memory map (identity-mapped: virtual == physical). */
/* The config block the VMM writes before the first instruction. */
#define VMM_CONFIG_ADDR 0x5000ull
/* Lowest address of the guest stack. */
#define VMM_STACK_BOTTOM 0x10000ull
/* The initial stack pointer. */
#define VMM_STACK_TOP 0x80000ull
/* Where loadable segments may start. */
#define VMM_PAYLOAD_START 0x100000ull
/* Loadable segments must end below this. */
#define VMM_PAYLOAD_END 0x400000ull
/* The counter block of a run with a counter vCPU (config.counter_addr says). */
#define VMM_COUNTER_BLOCK_ADDR 0x6000ull
/* The guest's kvmclock page (32 bytes), where the timing core asks KVM for it. */
#define VMM_KVMCLOCK_ADDR 0x6800ull
/* Reserved: the counter vCPU's code. */
#define VMM_COUNTER_CODE_ADDR 0x7000ull
/* The result header, followed by the samples. */
#define VMM_RESULT_ADDR 0x400000ull

/* I/O ports. */
/* One byte of console output per `out`. */
#define VMM_PORT_CONSOLE 0x3f8u
/* A 32-bit status (enum vmm_status) when done. */
#define VMM_PORT_DONE 0xf4u
/* Paravirtual CPUID: `out dx, eax`, leaf in EAX, subleaf in ECX; answer in EAX-EDX. */
#define VMM_PORT_HYPERCALL 0xf6u
/* Reserved for the VMM's io-patch trap: do not use. */
#define VMM_PORT_CPUID_TRAP 0xf7u
/* An ACPI PM timer: `in eax, dx` reads a 32-bit count at VMM_PM_TIMER_HZ (a VM's only). */
#define VMM_PORT_PM_TIMER 0x608u
/* The PM timer's rate, 3.579545 MHz. */
#define VMM_PM_TIMER_HZ 0x369e99ull

/* Magics (little-endian ASCII). */
/* "VMMCONF1" */
#define VMM_CONFIG_MAGIC 0x31464e4f434d4d56ull
/* "VMMRSLT1" */
#define VMM_RESULT_MAGIC 0x31544c53524d4d56ull
/* "VMMINFO1" */
#define VMM_PAYLOAD_INFO_MAGIC 0x314f464e494d4d56ull

/* Config flags. */
/* Ask for CPUID by hypercall instead of executing it. */
#define VMM_FLAG_PARAVIRT_CPUID 0x1u
/* Spin forever (tests the VMM's watchdog). */
#define VMM_FLAG_HANG 0x2u
/* Fault on purpose (tests the VMM's fault handling). */
#define VMM_FLAG_FAULT 0x4u
/* Read memory no RAM backs (tests the VMM's refusal of stray MMIO). */
#define VMM_FLAG_STRAY_MMIO 0x40u
/* Write to a port with no device (tests the VMM's refusal of stray port I/O). */
#define VMM_FLAG_STRAY_PORT 0x80u
/* Fill the CPUID snapshot and the site bytes. */
#define VMM_FLAG_CPUID_SNAPSHOT 0x8u

/* The counter vCPU (struct vmm_counter_block). */
/* Write to stamp_request: the counter vCPU stores its TSC in stamp, then zero in stamp_request. */
#define VMM_COUNTER_STAMP_REQUESTED 0x1ull
/* Write to stamp_request: the loop returns (native twins' counter threads). */
#define VMM_COUNTER_STOP 0x2ull
/* Polls of the counter before a guest gives up (VMM_STATUS_COUNTER_STALLED). */
#define VMM_COUNTER_MAX_POLLS 0x1000000ull
/* Iterations of the dependent XOR chain per xor-loop sample. */
#define VMM_XOR_ITERATIONS 0x100ull

/* Native twins. */
/* A native twin exits with this plus its status when the detector stops with one other than ok. */
#define VMM_NATIVE_TWIN_STATUS_BASE 0xau

/* Payload capabilities (struct vmm_payload_info.capabilities). */
/* Honours VMM_FLAG_PARAVIRT_CPUID. */
#define VMM_CAP_PARAVIRT_CPUID 0x1u
/* Reports its own verdict. */
#define VMM_CAP_VERDICT 0x2u
/* Honours config.probes and config.iterations. */
#define VMM_CAP_TIMING_CORE 0x4u
/* Honours VMM_FLAG_CPUID_SNAPSHOT. */
#define VMM_CAP_CPUID_SNAPSHOT 0x8u
/* Executes rdtscp: the VMM probes that this KVM can run it in a guest, and refuses the run where not. */
#define VMM_CAP_RDTSCP 0x10u
/* Reads the counter vCPU's clock (config.counter_addr): the VMM refuses to run it without --vcpus 2. */
#define VMM_CAP_COUNTER 0x20u

/* Probes: bit (1 << probe) in config.probes; samples laid out in VMM_PROBE_ORDER. */
/* cpuid-unfenced */
#define VMM_PROBE_CPUID_UNFENCED 0x4u
/* cpuid */
#define VMM_PROBE_CPUID 0x0u
/* nop */
#define VMM_PROBE_NOP 0x1u
/* rdtsc */
#define VMM_PROBE_RDTSC 0x2u
/* lfence8 */
#define VMM_PROBE_LFENCE8 0x3u
/* timer-cpuid */
#define VMM_PROBE_TIMER_CPUID 0x5u
/* timer-lfence8 */
#define VMM_PROBE_TIMER_LFENCE8 0x6u
/* cross-tsc */
#define VMM_PROBE_CROSS_TSC 0x7u
/* xor-loop */
#define VMM_PROBE_XOR_LOOP 0x8u
/* msr-cpuid */
#define VMM_PROBE_MSR_CPUID 0x9u
/* The order samples follow in the result block. */
#define VMM_PROBE_ORDER { 4, 0, 1, 2, 3, 5, 6, 7, 8, 9 }
#define VMM_PROBE_COUNT 10u

/* What the payload rings on VMM_PORT_DONE. */
enum vmm_status {
    VMM_STATUS_OK = 0, /* measurements complete */
    VMM_STATUS_BAD_CONFIG_MAGIC = 1, /* the config block has no valid magic */
    VMM_STATUS_ABI_MISMATCH = 2, /* the config block was written for another ABI version */
    VMM_STATUS_RESULT_AREA_TOO_SMALL = 3, /* the samples asked for do not fit the result area */
    VMM_STATUS_BAD_CONFIG = 4, /* the config asks for no iterations or no probe */
    VMM_STATUS_NO_COUNTER = 5, /* a probe needs the counter vCPU, and the run has none (--vcpus 2) */
    VMM_STATUS_COUNTER_STALLED = 6, /* the counter vCPU stopped counting: the guest gave up waiting for it */
};

/* A payload's own verdict (result header .verdict). */
enum vmm_verdict {
    VMM_VERDICT_NONE = 0,
    VMM_VERDICT_VIRTUAL = 1,
    VMM_VERDICT_NATIVE = 2,
    VMM_VERDICT_UNSURE = 3,
};

#define VMM_REASON_BYTES 120u
#define VMM_SNAPSHOT_LEAVES 9u

/* Written by the VMM at VMM_CONFIG_ADDR before the first instruction. */
struct vmm_config {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t flags;
    uint32_t iterations;
    uint32_t warmup;
    uint32_t probes;
    uint32_t cpuid_leaf;
    uint32_t cpuid_subleaf;
    uint32_t tsc_khz;
    uint64_t result_addr;
    uint64_t result_capacity;
    uint64_t counter_addr;
};
VMM_STATIC_ASSERT(sizeof(struct vmm_config) == 64, "vmm_config size");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, magic) == 0, "vmm_config.magic");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, abi_version) == 8, "vmm_config.abi_version");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, flags) == 12, "vmm_config.flags");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, iterations) == 16, "vmm_config.iterations");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, warmup) == 20, "vmm_config.warmup");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, probes) == 24, "vmm_config.probes");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, cpuid_leaf) == 28, "vmm_config.cpuid_leaf");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, cpuid_subleaf) == 32, "vmm_config.cpuid_subleaf");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, tsc_khz) == 36, "vmm_config.tsc_khz");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, result_addr) == 40, "vmm_config.result_addr");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, result_capacity) == 48, "vmm_config.result_capacity");
VMM_STATIC_ASSERT(offsetof(struct vmm_config, counter_addr) == 56, "vmm_config.counter_addr");

/* One CPUID answer as the guest saw it. */
struct vmm_cpuid_record {
    uint32_t leaf;
    uint32_t subleaf;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
};
VMM_STATIC_ASSERT(sizeof(struct vmm_cpuid_record) == 24, "vmm_cpuid_record size");
VMM_STATIC_ASSERT(offsetof(struct vmm_cpuid_record, leaf) == 0, "vmm_cpuid_record.leaf");
VMM_STATIC_ASSERT(offsetof(struct vmm_cpuid_record, subleaf) == 4, "vmm_cpuid_record.subleaf");
VMM_STATIC_ASSERT(offsetof(struct vmm_cpuid_record, eax) == 8, "vmm_cpuid_record.eax");
VMM_STATIC_ASSERT(offsetof(struct vmm_cpuid_record, ebx) == 12, "vmm_cpuid_record.ebx");
VMM_STATIC_ASSERT(offsetof(struct vmm_cpuid_record, ecx) == 16, "vmm_cpuid_record.ecx");
VMM_STATIC_ASSERT(offsetof(struct vmm_cpuid_record, edx) == 20, "vmm_cpuid_record.edx");

/* Every clock read back to back; zero where `clocks` says it was not read. */
struct vmm_clock_readings {
    uint64_t tsc;
    uint64_t msr_tsc;
    uint64_t pm_timer;
    uint64_t kvmclock_ns;
    uint64_t rdtscp;
    uint64_t aperf;
    uint64_t mperf;
};
VMM_STATIC_ASSERT(sizeof(struct vmm_clock_readings) == 56, "vmm_clock_readings size");
VMM_STATIC_ASSERT(offsetof(struct vmm_clock_readings, tsc) == 0, "vmm_clock_readings.tsc");
VMM_STATIC_ASSERT(offsetof(struct vmm_clock_readings, msr_tsc) == 8, "vmm_clock_readings.msr_tsc");
VMM_STATIC_ASSERT(offsetof(struct vmm_clock_readings, pm_timer) == 16, "vmm_clock_readings.pm_timer");
VMM_STATIC_ASSERT(offsetof(struct vmm_clock_readings, kvmclock_ns) == 24, "vmm_clock_readings.kvmclock_ns");
VMM_STATIC_ASSERT(offsetof(struct vmm_clock_readings, rdtscp) == 32, "vmm_clock_readings.rdtscp");
VMM_STATIC_ASSERT(offsetof(struct vmm_clock_readings, aperf) == 40, "vmm_clock_readings.aperf");
VMM_STATIC_ASSERT(offsetof(struct vmm_clock_readings, mperf) == 48, "vmm_clock_readings.mperf");

/* Written by the payload at config.result_addr; int64_t samples follow it (signed: negative when the TSC ran backwards), `iterations` per probe in `probes`, in VMM_PROBE_ORDER; then, where `ticks` is non-zero, as many int64_t counter tick counts in the same order. Write `magic` last. */
struct vmm_result_header {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t status;
    uint32_t iterations;
    uint32_t probes;
    uint64_t tsc_start;
    uint64_t tsc_end;
    uint32_t cpuid_count;
    uint32_t site_bytes_valid;
    uint8_t site_bytes[4][2];
    struct vmm_cpuid_record cpuid[VMM_SNAPSHOT_LEAVES];
    uint32_t verdict;
    uint32_t ticks;
    int64_t score_milli;
    char reason[VMM_REASON_BYTES];
    uint64_t rate_cycles;
    uint64_t rate_ticks;
    uint32_t clocks;
    uint32_t kvmclock_tsc_khz;
    struct vmm_clock_readings quiet[2];
    struct vmm_clock_readings span[2];
};
VMM_STATIC_ASSERT(sizeof(struct vmm_result_header) == 656, "vmm_result_header size");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, magic) == 0, "vmm_result_header.magic");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, abi_version) == 8, "vmm_result_header.abi_version");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, status) == 12, "vmm_result_header.status");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, iterations) == 16, "vmm_result_header.iterations");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, probes) == 20, "vmm_result_header.probes");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, tsc_start) == 24, "vmm_result_header.tsc_start");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, tsc_end) == 32, "vmm_result_header.tsc_end");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, cpuid_count) == 40, "vmm_result_header.cpuid_count");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, site_bytes_valid) == 44, "vmm_result_header.site_bytes_valid");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, site_bytes) == 48, "vmm_result_header.site_bytes");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, cpuid) == 56, "vmm_result_header.cpuid");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, verdict) == 272, "vmm_result_header.verdict");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, ticks) == 276, "vmm_result_header.ticks");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, score_milli) == 280, "vmm_result_header.score_milli");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, reason) == 288, "vmm_result_header.reason");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, rate_cycles) == 408, "vmm_result_header.rate_cycles");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, rate_ticks) == 416, "vmm_result_header.rate_ticks");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, clocks) == 424, "vmm_result_header.clocks");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, kvmclock_tsc_khz) == 428, "vmm_result_header.kvmclock_tsc_khz");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, quiet) == 432, "vmm_result_header.quiet");
VMM_STATIC_ASSERT(offsetof(struct vmm_result_header, span) == 544, "vmm_result_header.span");

/* At config.counter_addr when the run has a counter vCPU: `counter` goes up by one per loop iteration on another vCPU (natively, another CPU). Volatile. */
struct vmm_counter_block {
    uint64_t counter;
    uint64_t pad0[7];
    uint64_t stamp_request;
    uint64_t pad1[7];
    uint64_t stamp;
    uint64_t pad2[7];
};
VMM_STATIC_ASSERT(sizeof(struct vmm_counter_block) == 192, "vmm_counter_block size");
VMM_STATIC_ASSERT(offsetof(struct vmm_counter_block, counter) == 0, "vmm_counter_block.counter");
VMM_STATIC_ASSERT(offsetof(struct vmm_counter_block, pad0) == 8, "vmm_counter_block.pad0");
VMM_STATIC_ASSERT(offsetof(struct vmm_counter_block, stamp_request) == 64, "vmm_counter_block.stamp_request");
VMM_STATIC_ASSERT(offsetof(struct vmm_counter_block, pad1) == 72, "vmm_counter_block.pad1");
VMM_STATIC_ASSERT(offsetof(struct vmm_counter_block, stamp) == 128, "vmm_counter_block.stamp");
VMM_STATIC_ASSERT(offsetof(struct vmm_counter_block, pad2) == 136, "vmm_counter_block.pad2");

/* What a payload declares, at the global symbol `vmm_payload_info`. */
struct vmm_payload_info {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t capabilities;
    char name[32];
};
VMM_STATIC_ASSERT(sizeof(struct vmm_payload_info) == 48, "vmm_payload_info size");
VMM_STATIC_ASSERT(offsetof(struct vmm_payload_info, magic) == 0, "vmm_payload_info.magic");
VMM_STATIC_ASSERT(offsetof(struct vmm_payload_info, abi_version) == 8, "vmm_payload_info.abi_version");
VMM_STATIC_ASSERT(offsetof(struct vmm_payload_info, capabilities) == 12, "vmm_payload_info.capabilities");
VMM_STATIC_ASSERT(offsetof(struct vmm_payload_info, name) == 16, "vmm_payload_info.name");

#endif /* VMM_ABI_H */
