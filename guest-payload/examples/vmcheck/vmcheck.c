/* vmcheck's timing checks, our code after its logic: SamuelTulach/vmcheck at b1751e9,
 * main.c (a Windows kernel driver).
 *
 * RdtscTiming (L21-L71): the TSC over one second of KeDelayExecutionThread is the
 * calibration; then 25,000 times `rdtsc; cpuid(0); rdtsc`, the differences summed into
 * `total`; calculated = 100000 * total / calibration (L68), "fail" above 200 (L70).
 * TimestampTiming (L74-L128): the same with __readmsr(IA32_TIME_STAMP_COUNTER = 0x10) in
 * place of rdtsc, "fail" above 300 (L127). Both in unsigned 64-bit integers, as there.
 *
 * What differs here: the one-second wait is the guest's PM timer (vmm_wall_wait_ms: the
 * guest has no scheduler to sleep in; the twin sleeps), a wall clock an RDTSC trap leaves
 * alone, as the Windows timer is. A calibration of 0 (a TSC that did not move in one
 * second) divides by zero in the original (a bug check): here the check says so and
 * decides nothing. The native twin runs in user mode, where rdmsr faults: it skips
 * TimestampTiming and says so. AperfTiming (L131-L168) is not run: KVM answers APERF with
 * #GP unless it passes the counters through, and a fault ends this guest. The driver's
 * verdict is each check's own line; here the payload's verdict is virtual when either
 * fails, native when every check run passed. */
#include "vmm_sdk.h"

VMM_PAYLOAD("vmcheck rdtsc+msr timing", VMM_CAP_VERDICT);

#define LOOPS 25000
#define MSR_TSC 0x10u

static inline __attribute__((always_inline)) uint64_t read_msr(uint32_t msr) {
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}

static inline __attribute__((always_inline)) void cpuid0(void) {
    uint32_t a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
}

/* One check: 0 passed, 1 failed, -1 undecided (a calibration of 0). */
static int rdtsc_timing(uint64_t *calculated) {
    uint64_t calibration = vmm_rdtsc();
    vmm_wall_wait_ms(1000);
    calibration = vmm_rdtsc() - calibration;
    uint64_t total = 0;
    for (int i = 0; i < LOOPS; i++) {
        uint64_t start = vmm_rdtsc();
        cpuid0();
        total += vmm_rdtsc() - start;
    }
    if (calibration == 0)
        return -1;
    *calculated = 100000 * total / calibration;
    return *calculated > 200;
}

static int msr_timing(uint64_t *calculated) {
    uint64_t calibration = read_msr(MSR_TSC);
    vmm_wall_wait_ms(1000);
    uint64_t end = read_msr(MSR_TSC);
    calibration = end - calibration;
    uint64_t total = 0;
    for (int i = 0; i < LOOPS; i++) {
        uint64_t start = read_msr(MSR_TSC);
        cpuid0();
        end = read_msr(MSR_TSC);
        total += end - start;
    }
    if (calibration == 0)
        return -1;
    *calculated = 100000 * total / calibration;
    return *calculated > 300;
}

static void add_result(struct vmm_text *line, const char *name, int result, uint64_t calculated,
                       const char *limit) {
    vmm_text_add(line, name);
    if (result < 0) {
        vmm_text_add(line, " undecided (the TSC did not move in 1 s of the PM timer: the original divides by 0)");
        return;
    }
    vmm_text_add(line, " ");
    vmm_text_add_u64(line, calculated);
    vmm_text_add(line, result ? " fail (above " : " pass (at most ");
    vmm_text_add(line, limit);
    vmm_text_add(line, ")");
}

int vmm_detect(struct vmm_run *run) {
    uint64_t rdtsc_figure = 0, msr_figure = 0;
    int rdtsc = rdtsc_timing(&rdtsc_figure);
    int msr = vmm_in_guest() ? msr_timing(&msr_figure) : -2;
    struct vmm_text line = {{0}, 0};
    add_result(&line, "rdtsc", rdtsc, rdtsc_figure, "200");
    if (msr == -2)
        vmm_text_add(&line, "; msr not run (rdmsr needs ring 0: the native twin is a user process)");
    else
        add_result((vmm_text_add(&line, "; "), &line), "msr", msr, msr_figure, "300");
    enum vmm_verdict verdict = VMM_VERDICT_UNSURE;
    if (rdtsc == 1 || msr == 1)
        verdict = VMM_VERDICT_VIRTUAL;
    else if (rdtsc == 0 && msr != -1)
        verdict = VMM_VERDICT_NATIVE;
    /* The score: the RDTSC figure over its threshold, in thousandths. */
    vmm_verdict(run, verdict, (int64_t)(rdtsc_figure * 1000 / 200), line.text);
    return VMM_STATUS_OK;
}
