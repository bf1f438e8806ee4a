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
 * TimestampTiming and says so. AperfTiming (L130-L168): IA32_APERF (0xe8) read, shifted
 * left by 32, before and after CPUID(1); "fail" when the difference is under 10,000.
 * The shift keeps only APERF's low 32 bits, moved up: any change at all is >= 2^32, so
 * the check fails exactly when APERF's low half did not move ("most hypervisors (such as
 * KVM) does not even implement this MSR", L135-L137). KVM answers an APERF read with #GP
 * unless it passes the counters through (--evade autovirt-aperfmperf); the driver does
 * not catch it (a bug check), and this guest catches it with its own #GP handler
 * (vmm_idt_set) and reports "#GP" for the check, deciding nothing. The twin skips it
 * (ring 3), as it skips the MSR check. The driver's verdict is each check's own line;
 * here the payload's verdict is virtual when any fails, native when every check run
 * passed. */
#include "vmm_sdk.h"

VMM_PAYLOAD("vmcheck rdtsc+msr+aperf timing", VMM_CAP_VERDICT);

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

#define MSR_APERF 0xe8u

#ifdef VMM_GUEST
/* #GP (error code pushed): count it, step over the 2-byte rdmsr that raised it, return. */
static volatile uint64_t gp_faults;
void gp_entry(void);
__asm__(".text\n.globl gp_entry\ngp_entry:\n"
        "  lock incq gp_faults(%rip)\n"
        "  addq $8, %rsp\n"
        "  addq $2, (%rsp)\n"
        "  iretq\n");

/* 0 passed, 1 failed, -1 a #GP (KVM does not offer APERF). */
static int aperf_timing(uint64_t *calculated) {
    vmm_idt_set(13, gp_entry);
    uint64_t faults = gp_faults;
    uint64_t start = read_msr(MSR_APERF) << 32;
    uint32_t a = 1, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
    uint64_t end = read_msr(MSR_APERF) << 32;
    if (gp_faults != faults)
        return -1;
    *calculated = end - start;
    return *calculated < 10000;
}
#endif

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
    uint64_t aperf_figure = 0;
#ifdef VMM_GUEST
    int aperf = aperf_timing(&aperf_figure);
#else
    int aperf = -2;
#endif
    struct vmm_text line = {{0}, 0};
    add_result(&line, "rdtsc", rdtsc, rdtsc_figure, "200");
    if (msr == -2)
        vmm_text_add(&line, "; msr not run (rdmsr needs ring 0: the native twin is a user process)");
    else
        add_result((vmm_text_add(&line, "; "), &line), "msr", msr, msr_figure, "300");
    /* The reason line holds 119 characters: the APERF result in short. */
    if (aperf == -1)
        vmm_text_add(&line, "; aperf #GP");
    else if (aperf >= 0) {
        vmm_text_add(&line, aperf ? "; aperf fail (" : "; aperf pass (");
        vmm_text_add_u64(&line, aperf_figure >> 32);
        vmm_text_add(&line, aperf ? " << 32 < 10000)" : " << 32)");
    }
    enum vmm_verdict verdict = VMM_VERDICT_UNSURE;
    if (rdtsc == 1 || msr == 1 || aperf == 1)
        verdict = VMM_VERDICT_VIRTUAL;
    else if (rdtsc == 0 && msr != -1)
        verdict = VMM_VERDICT_NATIVE;
    /* The score: the RDTSC figure over its threshold, in thousandths. */
    vmm_verdict(run, verdict, (int64_t)(rdtsc_figure * 1000 / 200), line.text);
    return VMM_STATUS_OK;
}
