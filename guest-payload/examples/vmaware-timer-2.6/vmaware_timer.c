/* VMAware's TIMER technique as released in v2.6.0, the part that runs on Linux: our code
 * after its logic.
 *
 * Original: kernelwernel/VMAware, src/vmaware.hpp, `static bool timer()`, tag v2.6.0
 * (commit 4a441cde, 2026-01-25), lines 4572-5044. On Linux (the Windows-only TSC-rate
 * and RDTSC-trap checks and the thread pinning are skipped there), in order:
 *   1. under a translator (CPUID 0x40000000 vendor "VirtualApple" or "PowerVM Lx86"):
 *      not a VM;
 *   2. threshold 1000 cycles (7500 only on a Windows Hyper-V root partition);
 *   3. no RDTSCP (CPUID.80000001H:EDX[27] clear): a VM;
 *   4. sleep 1 ms (a fresh scheduler quantum), 128 warm-ups, then 1000 samples of
 *      `lfence; rdtsc; cpuid(EAX=0); rdtscp; lfence`, each the unsigned difference;
 *   5. calculate_latency: sort; gaps between neighbours; gap threshold
 *      max(50, ceil(5 x median gap)) with the median gap at index (N-1)/2 of the gaps;
 *      the low cluster ends before the first gap at or above it (none: the lowest 10%;
 *      under 5% of N: the lowest 10%); its 10%-trimmed mean, rounded (a cluster under 10
 *      samples: its median);
 *   6. a VM if that latency >= 1000 or <= 20 cycles.
 *
 * What differs here: no OS to sleep in the guest (the twin does sleep 1 ms); integer
 * arithmetic where VMAware uses double (exact for these sums); ECX = 0 for the CPUID
 * (VMAware leaves it as it is; leaf 0 ignores it); in a paravirt guest the timed CPUID is
 * the hypercall. The 1000 samples are reported as the `cpuid` probe: they are these
 * lfence;rdtsc;cpuid;rdtscp;lfence timings, not the timing core's fenced probe. v2.7.0 rewrote TIMER around a counter thread on another
 * core (no TSC at all): ../vmaware-timer-2.7, run with a second vCPU (--vcpus 2). */
#include "vmm_sdk.h"

VMM_PAYLOAD("VMAware TIMER 2.6.0", VMM_CAP_PARAVIRT_CPUID | VMM_CAP_VERDICT | VMM_CAP_RDTSCP);

#define WARMUP 128
#define SAMPLES 1000
#define CYCLE_THRESHOLD 1000
#define FLOOR 20

static uint64_t sorted[SAMPLES];
static uint64_t gaps[SAMPLES - 1];
static uint64_t gaps_ordered[SAMPLES - 1];

static uint64_t timed_cpuid_instruction(void) {
    uint32_t lo1, hi1, lo2, hi2, a = 0, b, c = 0, d;
    __asm__ volatile("lfence\n\trdtsc" : "=a"(lo1), "=d"(hi1) : : "memory");
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
    __asm__ volatile("rdtscp\n\tlfence" : "=a"(lo2), "=d"(hi2) : : "rcx", "memory");
    (void)b;
    (void)c;
    (void)d;
    return (((uint64_t)hi2 << 32) | lo2) - (((uint64_t)hi1 << 32) | lo1);
}

#ifdef VMM_GUEST
/* The same, with CPUID asked of the VMM by hypercall (paravirt). */
static uint64_t timed_cpuid_hypercall(void) {
    uint32_t lo1, hi1, lo2, hi2, a = 0, b, c = 0, d = VMM_PORT_HYPERCALL;
    __asm__ volatile("lfence\n\trdtsc" : "=a"(lo1), "=d"(hi1) : : "memory");
    __asm__ volatile("out %%eax, %%dx" : "+a"(a), "=b"(b), "+c"(c), "+d"(d) : : "memory");
    __asm__ volatile("rdtscp\n\tlfence" : "=a"(lo2), "=d"(hi2) : : "rcx", "memory");
    (void)b;
    return (((uint64_t)hi2 << 32) | lo2) - (((uint64_t)hi1 << 32) | lo1);
}
#endif

static void sort(uint64_t *v, unsigned n) {
    /* Shell sort: no libc in the guest, and 1,000 elements. */
    for (unsigned gap = n / 2; gap > 0; gap /= 2)
        for (unsigned i = gap; i < n; i++) {
            uint64_t x = v[i];
            unsigned j = i;
            for (; j >= gap && v[j - gap] > x; j -= gap)
                v[j] = v[j - gap];
            v[j] = x;
        }
}

static uint64_t median_of_sorted(const uint64_t *s, unsigned n) {
    unsigned mid = n / 2;
    return (n % 2) ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/* calculate_latency() of v2.6.0, step 5 above. */
static uint64_t calculate_latency(const int64_t *samples, unsigned n) {
    for (unsigned i = 0; i < n; i++)
        sorted[i] = (uint64_t)samples[i];
    sort(sorted, n);
    if (n <= 4)
        return sorted[0];
    for (unsigned i = 1; i < n; i++)
        gaps[i - 1] = sorted[i] - sorted[i - 1];
    /* nth_element at (n-1)/2 of the gaps is that element of them sorted; the split below
     * scans the gaps in sample order, so the sort is of a copy. */
    for (unsigned i = 0; i < n - 1; i++)
        gaps_ordered[i] = gaps[i];
    sort(gaps_ordered, n - 1);
    uint64_t median_gap = gaps_ordered[(n - 1) / 2];
    uint64_t gap_threshold = 5 * median_gap > 50 ? 5 * median_gap : 50;
    unsigned split = 0;
    for (unsigned i = 0; i < n - 1; i++)
        if (gaps[i] >= gap_threshold) {
            split = i + 1;
            break;
        }
    unsigned tenth = n / 10 > 1 ? n / 10 : 1;
    if (split == 0)
        split = tenth;
    unsigned cluster = split;
    if ((uint64_t)cluster * 20 < n) /* cluster / n < 0.05 */
        cluster = tenth;
    if (cluster < 10)
        return median_of_sorted(sorted, cluster);
    unsigned trim = cluster / 10, lo = trim, hi = cluster - trim;
    if (hi <= lo)
        return median_of_sorted(sorted, cluster);
    uint64_t sum = 0;
    for (unsigned i = lo; i < hi; i++)
        sum += sorted[i];
    uint64_t count = hi - lo;
    return (2 * sum + count) / (2 * count); /* round(sum / count) */
}

static int vendor_is(const uint32_t regs[4], const char *name) {
    const uint32_t *words[3] = {&regs[1], &regs[2], &regs[3]};
    for (int i = 0; i < 12; i++)
        if ((char)(*words[i / 4] >> (8 * (i % 4))) != name[i])
            return 0;
    return 1;
}

static void say(struct vmm_run *run, enum vmm_verdict verdict, int64_t score, const char *why, uint64_t latency) {
    struct vmm_text line = {{0}, 0};
    vmm_text_add(&line, why);
    if (latency != (uint64_t)-1) {
        vmm_text_add_u64(&line, latency);
        vmm_text_add(&line, verdict == VMM_VERDICT_VIRTUAL ? " cycles (low-cluster trimmed mean of 1000): >= 1000 or <= 20"
                                                           : " cycles (low-cluster trimmed mean of 1000): in (20, 1000)");
    }
    vmm_verdict(run, verdict, score, line.text);
}

int vmm_detect(struct vmm_run *run) {
    int status = vmm_begin(run, 1u << VMM_PROBE_CPUID, SAMPLES);
    if (status != VMM_STATUS_OK)
        return status;
    uint32_t regs[4];
    vmm_cpuid(run, 0x40000000u, 0, regs);
    if (vendor_is(regs, "VirtualApple") || vendor_is(regs, "PowerVM Lx86")) {
        say(run, VMM_VERDICT_NATIVE, 0, "TIMER 2.6.0: running under a translator, not judged", (uint64_t)-1);
        return VMM_STATUS_OK;
    }
    if (!vmm_has_rdtscp(run)) {
        say(run, VMM_VERDICT_VIRTUAL, 1000, "TIMER 2.6.0: RDTSCP not supported (CPUID.80000001H:EDX[27] clear)", (uint64_t)-1);
        return VMM_STATUS_OK;
    }
    uint64_t (*timed)(void) = timed_cpuid_instruction;
#ifdef VMM_GUEST
    if (run->config->flags & VMM_FLAG_PARAVIRT_CPUID)
        timed = timed_cpuid_hypercall;
#endif
    vmm_sleep_ms(run, vmm_in_guest() ? 0 : 1);
    for (int w = 0; w < WARMUP; w++)
        (void)timed();
    int64_t *samples = vmm_samples(run, VMM_PROBE_CPUID);
    for (int i = 0; i < SAMPLES; i++)
        samples[i] = (int64_t)timed();
    uint64_t latency = calculate_latency(samples, SAMPLES);
    int vm = latency >= CYCLE_THRESHOLD || latency <= FLOOR;
    say(run, vm ? VMM_VERDICT_VIRTUAL : VMM_VERDICT_NATIVE, (int64_t)latency,
        "TIMER 2.6.0: lfence;rdtsc;cpuid(0);rdtscp;lfence latency ", latency);
    return VMM_STATUS_OK;
}
