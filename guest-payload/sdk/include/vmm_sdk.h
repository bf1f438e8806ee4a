/* vmm guest SDK: write a VM detector once, run it as a vmm guest and as a native Linux
 * program from the same source, in C or C++. See docs/sdk.md.
 *
 * A detector defines `vmm_detect()` and declares itself with `VMM_PAYLOAD(...)`; the SDK
 * supplies the entry point of each build (lib/start_guest.c: the bare-metal `_start` the
 * VMM jumps to; lib/start_native.c: a `main` that reads the config from a file and writes
 * the result block to another), and these helpers. */
#ifndef VMM_SDK_H
#define VMM_SDK_H

#include "vmm_abi.h"

/* In C++ the detector's vmm_detect() and the declaration below keep their C names: the
 * SDK's library is C, and the VMM looks for the symbol `vmm_payload_info`. */
#ifdef __cplusplus
#define VMM_EXTERN_C extern "C"
extern "C" {
#else
#define VMM_EXTERN_C
#endif

/* Declares the payload to the VMM (read from the ELF before it runs): a name for reports
 * (at most 31 characters) and what it can do (VMM_CAP_* bits). Use exactly once, at file
 * scope. (In C++ a namespace-scope const has internal linkage: `extern "C"` keeps the
 * symbol global, under its C name.) */
#define VMM_PAYLOAD(name_literal, caps)                                                     \
    VMM_EXTERN_C __attribute__((used)) const struct vmm_payload_info vmm_payload_info = {  \
        VMM_PAYLOAD_INFO_MAGIC, VMM_ABI_VERSION, (uint32_t)(caps), name_literal}

/* One run, as the detector sees it. */
struct vmm_run {
    const struct vmm_config *config;
    struct vmm_result_header *result;
    /* What the payload will report: set with vmm_begin(). */
    uint32_t probes;
    uint32_t iterations;
};

/* The detector: measure, record samples, optionally report a verdict. Returns a
 * `enum vmm_status` (VMM_STATUS_OK when it measured). The SDK calls it with every
 * callee-saved register (RBX, RBP, R12-R15) saved around the call and restored after: a
 * detector whose asm clobbers registers it does not declare (pafish's `cpuid`) may
 * compute garbage, but the SDK still reports what it wrote. */
int vmm_detect(struct vmm_run *run);

/* Declares the probes (bits 1 << VMM_PROBE_*) and samples per probe the payload will
 * report; checks they fit the result area. Returns VMM_STATUS_OK or why not. In a run
 * with a counter (config.counter_addr != 0) room is always held for counter ticks after
 * the TSC samples, as many again, as the VMM counts it: vmm_ticks() says where they go. */
int vmm_begin(struct vmm_run *run, uint32_t probes, uint32_t iterations);
/* The most samples per probe that vmm_begin() accepts for `probes`. */
uint32_t vmm_samples_that_fit(const struct vmm_run *run, uint32_t probes);
/* Where the samples of `probe` go (after vmm_begin); NULL if it was not declared. */
int64_t *vmm_samples(struct vmm_run *run, unsigned probe);
/* Where the counter tick counts of `probe` go (after vmm_begin), one per sample in the
 * same order: the counter (struct vmm_counter_block at config.counter_addr) read after
 * the sample minus before. NULL if the probe was not declared or the run has no counter.
 * Calling it says the payload reports ticks (result header `ticks` = 1): the VMM then
 * reads them for every declared probe, so fill them all. */
int64_t *vmm_ticks(struct vmm_run *run, unsigned probe);
/* The payload's own verdict: enum vmm_verdict, a score in thousandths (higher: more
 * virtual; an integer, whatever the payload computed it in) and one line of why
 * (truncated to VMM_REASON_BYTES - 1). */
void vmm_verdict(struct vmm_run *run, enum vmm_verdict verdict, int64_t score_milli, const char *reason);

/* The TSC, unordered (`rdtsc`) and ordered after earlier instructions (`lfence; rdtsc`).
 * Inline, so a timed window holds the instructions and nothing else. */
static inline __attribute__((always_inline)) uint64_t vmm_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline __attribute__((always_inline)) uint64_t vmm_rdtsc_fenced(void) {
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    return ((uint64_t)hi << 32) | lo;
}
/* Does the CPU advertise RDTSCP (CPUID.80000001H:EDX[27])? A payload that executes it
 * declares VMM_CAP_RDTSCP: the VMM then probes that this KVM can run it in a guest (an
 * emulating KVM may advertise it and still fail on it) and refuses the run where not. */
int vmm_has_rdtscp(const struct vmm_run *run);
/* `rdtscp`: the TSC once earlier instructions have executed; *aux gets IA32_TSC_AUX. */
static inline __attribute__((always_inline)) uint64_t vmm_rdtscp(uint32_t *aux) {
    uint32_t lo, hi, c;
    __asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(c));
    *aux = c;
    return ((uint64_t)hi << 32) | lo;
}
/* CPUID: the instruction, or in a guest whose config asks for paravirt, the hypercall (a
 * call and a branch: a detector that times CPUID inlines its own, as the examples do). */
void vmm_cpuid(const struct vmm_run *run, uint32_t leaf, uint32_t subleaf, uint32_t regs[4]);
/* Spins for `ms` milliseconds of TSC time (config.tsc_khz); returns 0 if the rate is unknown. */
int vmm_spin_ms(const struct vmm_run *run, uint32_t ms);
/* Sleeps as a detector's Sleep(ms) does: the native twin gives up the CPU (nanosleep); the
 * guest, which has no OS to sleep in, spins (vmm_spin_ms). Returns 0 if it could not. */
int vmm_sleep_ms(const struct vmm_run *run, uint32_t ms);
/* A wall clock the hypervisor cannot hide behind an RDTSC trap: the guest's ACPI PM timer
 * (VMM_PORT_PM_TIMER, a 32-bit count at VMM_PM_TIMER_HZ, served from the host's monotonic
 * clock); the native twin's CLOCK_MONOTONIC in the same ticks. An evader could fake it too. */
uint32_t vmm_pm_timer(void);
/* Waits `ms` milliseconds of that wall clock (a detector's KeDelayExecutionThread: not the
 * TSC, which the hypervisor may own); the guest spins on the port, the twin sleeps. */
void vmm_wall_wait_ms(uint32_t ms);
/* The counter loop, abi::counter::LOOP_CODE byte for byte: `counter` + 1 per iteration,
 * TSC stamps on request, returns on VMM_COUNTER_STOP in `stamp_request`. The VMM runs
 * those bytes on a guest's counter vCPU; the native twin (lib/start_native.c) runs this
 * on a thread of its own on another CPU. A payload never calls it. */
void vmm_counter_loop(struct vmm_counter_block *block);

#ifdef VMM_GUEST
/* The guest's own exception handlers: points IDT vector `vector` (0-31) at `entry`, a
 * 64-bit interrupt gate (ring 0, the guest's code segment), and loads the SDK's IDT (the
 * guest starts with none: any exception is a triple fault). `entry` is assembly that
 * ends in `iretq`, dropping the error code first for the vectors that push one (8,
 * 10-14, 17, 21). Guest build only: the native twin catches signals instead. */
void vmm_idt_set(unsigned vector, void (*entry)(void));
#endif

/* One line of text: the guest's serial console, or the native twin's stderr. A newline
 * is added unless the text ends with one (so it never runs into what follows). */
void vmm_print(const char *text);
/* 1 in the guest build, 0 in the native twin. */
int vmm_in_guest(void);

/* Used by the SDK's entry points: runs vmm_detect() and fills the result header around
 * it (status, what was reported, TSC at start and end; the magic last, on success). */
int vmm_run_detector(struct vmm_run *run);

/* Sorts `n` values ascending in place (insertion sort: for the few hundred or thousand
 * samples a check keeps; no libc qsort in the guest). */
void vmm_sort_u64(uint64_t *values, unsigned n);
/* The mean of the middle half of `n` values (sorted in place), rounded half up: index
 * n/4 up to (3n)/4, the median where that is empty, the value itself for one (VMAware
 * 2.8's calculate_latency, src/vmaware.hpp v2.8.1 L3778-3803, which its TIMER and #DB
 * checks use). 0 for none. */
uint64_t vmm_interquartile_mean(uint64_t *values, unsigned n);
/* MurmurHash3's 64-bit finalizer (fmix64): a seed or a draw from a timestamp. */
uint64_t vmm_mix64(uint64_t x);

/* Small string helpers (no libc in the guest). */
void vmm_format_u64(char *out, uint64_t value);
/* A reason line built piece by piece, never past VMM_REASON_BYTES - 1 characters. */
struct vmm_text {
    char text[VMM_REASON_BYTES];
    unsigned length;
};
void vmm_text_add(struct vmm_text *line, const char *piece);
void vmm_text_add_u64(struct vmm_text *line, uint64_t value);

#ifdef __cplusplus
}
#endif

#endif /* VMM_SDK_H */
