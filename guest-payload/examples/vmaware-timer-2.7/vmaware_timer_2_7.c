/* VMAware's TIMER technique as released in v2.7.0: our code after its logic.
 *
 * Original: kernelwernel/VMAware, src/vmaware.hpp, `static bool timer()`, tag v2.7.0
 * (commit 619d1583f8c2a71c764decbec6e22eaf127f9e03, 2026-04-05), lines 5373-5758, with
 * the helpers it calls: util::is_running_under_translator() (L3701), util::hyper_x()
 * (L3777), cpu::is_leaf_supported() (L888), cpu::is_amd() (L927), cpu::get_brand()
 * (L950), cpu::cpu_manufacturer() (L985). It compiles for x86 Windows only (elsewhere
 * `return false;`, L5757); this is that Windows code, in order:
 *   1. under a translator: not a VM (L5378). The CPUID parts of the check: leaf
 *      0x40000000 supported (its EAX >= 0x40000000) and its vendor (EBX, ECX, EDX)
 *      "VirtualApple" or "PowerVM Lx86"; or the brand string (0x80000002-4, supported,
 *      left-trimmed) contains "Virtual CPU". (IsWow64Process2 has no equivalent here.)
 *   2. threshold 3.5, or 25 when hyper_x() is not HYPERV_UNKNOWN (L5377, L5382): not a
 *      root partition (0x40000003.EBX[0] clear): Hyper-V if (0x40000000.EAX & 0xff) == 11
 *      and the hypervisor bit (1.ECX[31]); a root partition: Hyper-V if the vendor of
 *      0x40000100 contains "KVM" (enlightenments), else if SIDT's base is
 *      0xfffff80000001000 (a Windows Hyper-V host). Its CPUIDs use subleaf 0xff, as
 *      cpu::cpuid's default.
 *   3. a counter thread on another CPU spins `incq counter` (here: the counter vCPU of
 *      `vmm run --vcpus 2`, or the native twin's counter thread; both run
 *      abi::counter::LOOP_CODE, whose first instruction is that `incq`).
 *   4. a batch size drawn uniformly from [30000, 70000] (L5651); warm-up 1000 x
 *      (CPUID(0, 0), then 8 x LFENCE) (L5663-5666);
 *   5. pairs until the batch is full (L5668-5697): two tick-syncs (`sync = counter;
 *      while (counter == sync);`), `counter; cpuid(0, 0); counter`, two tick-syncs,
 *      `counter; 8 x lfence; counter`; a pair is kept when both windows saw the counter
 *      move, retaken otherwise. Each window here is one asm block: the counter load, the
 *      CPUID (its four results stored to a stack array, as trigger_vmexit's outputs are)
 *      or the 8 LFENCEs, the counter load. EAX and ECX are set before the first load.
 *   6. calculate_latency (L5490-5638) of each: the densest low cluster (median, MAD,
 *      sigma = 1.4826 MAD or 1, a window of max(10, ceil(8% N)) samples with the least
 *      span, grown left then right while the span stays within 1.5x or within 3 sigma),
 *      its 10%-trimmed mean, clamped to M + 4 sigma when over M + 6 sigma;
 *   7. a VM if cpuid_l / ref_l >= threshold (L5707);
 *   8. on AMD (CPUID(0).ECX "cAMD") when nothing was detected: CPUID (0xd, 0), (0xd, 1),
 *      (0xd, 12), (0x80000008, 0); CET supported ((i32)EAX(0xd, 12) > 0) and
 *      EBX(0xd, 1) - EBX(0xd, 0) != 0x10: an "SVM bypass", a VM (VMAware: KVM, score 150).
 *
 * What differs here. In the measurement, only two things:
 *   - the batch size is drawn from the TSC hashed (vmm_mix64), not std::random_device and
 *     mt19937 (uniform over the same inclusive range, up to a bias of 2^-48): the only
 *     deviation besides the bounded waits;
 *   - bounded waits where VMAware waits for ever: each tick-sync gives up after
 *     VMM_COUNTER_MAX_POLLS polls (a stalled counter), and the pairs after 4 x batch
 *     attempts; either ends with the verdict "unsure" and says why.
 * Around it, what a bare guest has no equivalent for:
 *   - exact integer arithmetic where VMAware uses long double (guests have no FPU): the
 *     ratio test is 2 cpuid_l >= 7 ref_l (cpuid_l >= 25 ref_l with Hyper-V), sigma is
 *     MAD x 14826 / 10000, and the roundings are done on those fractions. Where MAD is a
 *     multiple of 5000 ticks, ceil(3 sigma) may differ by one from what the compiler's
 *     long double makes of 1.4826 (MSVC's long double is a double);
 *   - no scheduler to ask: no thread priorities, no pinning of the measuring thread to CPU
 *     0 (the VMM pins the twin to one CPU; the guest is one vCPU), the counter CPU is not
 *     drawn at random away from CPU 0's SMT siblings (the twin's thread takes the first
 *     other CPU; the guest's counter vCPU is wherever the VMM puts it), SleepEx(0) is a
 *     zero-length nanosleep natively and nothing in the guest, VirtualLock is a write of
 *     every sample slot beforehand; the counter runs from before the detector starts
 *     (there is no start_test flag) and is not reset to 0 (only differences count);
 *   - in a paravirt guest every CPUID is the hypercall, the timed one included.
 *
 * Reported samples: TIMER reads no TSC, so the payload reports its kept pairs' counter
 * tick deltas in the probes' slots: the CPUID window's as the `cpuid` probe and the
 * 8 x LFENCE window's as `lfence8` (ticks, not TSC cycles; the header's `ticks` stays 0).
 * As many pairs as the result area holds (a run with a counter holds room for ticks too:
 * about 65,500 pairs in the 2 MiB a run gets); the statistic takes every pair. */
#include "vmm_sdk.h"

VMM_PAYLOAD("VMAware TIMER 2.7.0", VMM_CAP_PARAVIRT_CPUID | VMM_CAP_VERDICT | VMM_CAP_COUNTER);

#define BATCH_MIN 30000u
#define BATCH_MAX 70000u
#define WARMUP 1000
#define ATTEMPTS_PER_PAIR 4u
#define SIDT_HYPERV_ROOT 0xfffff80000001000ull

/* The pairs (VMAware's two vectors). */
static uint64_t vm_samples[BATCH_MAX], ref_samples[BATCH_MAX];

/* ---- CPUID as VMAware's helpers ask it ---- */

static void cpuid(const struct vmm_run *run, uint32_t leaf, uint32_t subleaf, uint32_t regs[4]) {
    vmm_cpuid(run, leaf, subleaf, regs);
}

/* cpu::cpuid(..., leaf) with its default subleaf 0xff. */
static void cpuid_ff(const struct vmm_run *run, uint32_t leaf, uint32_t regs[4]) {
    cpuid(run, leaf, 0xff, regs);
}

/* cpu::is_leaf_supported: the leaf is at most the maximum of its range. */
static int leaf_supported(const struct vmm_run *run, uint32_t leaf) {
    uint32_t regs[4];
    if (leaf < 0x40000000u)
        cpuid_ff(run, 0, regs);
    else if (leaf < 0x80000000u)
        cpuid_ff(run, 0x40000000u, regs);
    else if (leaf < 0xc0000000u)
        cpuid_ff(run, 0x80000000u, regs);
    else
        return 0;
    return leaf <= regs[0];
}

/* cpu::cpu_manufacturer(leaf) for a hypervisor leaf: EBX, ECX, EDX as a C string ("" if
 * all three are zero), NUL-terminated in 13 bytes. */
static void hypervisor_vendor(const struct vmm_run *run, uint32_t leaf, char out[13]) {
    uint32_t regs[4];
    cpuid_ff(run, leaf, regs);
    for (int i = 0; i < 13; i++)
        out[i] = 0;
    if (regs[1] == 0 && regs[2] == 0 && regs[3] == 0)
        return;
    for (int i = 0; i < 12; i++)
        out[i] = (char)(regs[1 + i / 4] >> (8 * (i % 4)));
}

static int text_equal(const char *a, const char *b) {
    for (; *a && *a == *b; a++, b++)
        ;
    return *a == *b;
}

static int text_contains(const char *haystack, const char *needle) {
    for (; *haystack; haystack++) {
        const char *h = haystack, *n = needle;
        for (; *n && *h == *n; h++, n++)
            ;
        if (!*n)
            return 1;
    }
    return !*needle;
}

/* util::is_running_under_translator(), its CPUID part (L3745-3760): the name of what
 * matched, or 0. */
static const char *translator(const struct vmm_run *run) {
    if (leaf_supported(run, 0x40000000u)) {
        char vendor[13];
        hypervisor_vendor(run, 0x40000000u, vendor);
        if (text_equal(vendor, "VirtualApple"))
            return "vendor VirtualApple";
        if (text_equal(vendor, "PowerVM Lx86"))
            return "vendor PowerVM Lx86";
    }
    /* cpu::get_brand(): "Unknown" without leaf 0x80000004; else the 48 bytes, left-trimmed. */
    if (leaf_supported(run, 0x80000004u)) {
        uint32_t brand[13];
        for (uint32_t i = 0; i < 3; i++)
            cpuid_ff(run, 0x80000002u + i, &brand[4 * i]);
        brand[12] = 0;
        const char *text = (const char *)brand;
        while (*text == ' ' || (*text >= '\t' && *text <= '\r'))
            text++;
        if (text_contains(text, "Virtual CPU"))
            return "brand Virtual CPU";
    }
    return 0;
}

/* util::hyper_x() != HYPERV_UNKNOWN (L3777-3900): the name of what matched, or 0. */
static const char *hyper_v(const struct vmm_run *run) {
    uint32_t regs[4];
    cpuid_ff(run, 0x40000003u, regs);
    if (!(regs[1] & 1)) {
        cpuid_ff(run, 0x40000000u, regs);
        if ((regs[0] & 0xff) != 11)
            return 0;
        cpuid_ff(run, 1, regs);
        return (regs[2] >> 31) & 1 ? "Hyper-V guest" : 0;
    }
    char vendor[13];
    hypervisor_vendor(run, 0x40000100u, vendor);
    if (text_contains(vendor, "KVM"))
        return "Hyper-V enlightenments";
    uint8_t idtr[10] = {0};
    __asm__ volatile("sidt %0" : "=m"(idtr));
    uint64_t base = 0;
    for (int i = 0; i < 8; i++)
        base |= (uint64_t)idtr[2 + i] << (8 * i);
    return base == SIDT_HYPERV_ROOT ? "Hyper-V root" : 0;
}

/* ---- the measurement ---- */

/* `sync = counter; while (counter == sync);`, giving up after VMM_COUNTER_MAX_POLLS polls. */
static inline __attribute__((always_inline)) int tick_sync(const volatile uint64_t *counter) {
    uint64_t sync = *counter;
    for (uint64_t polls = 0; polls < VMM_COUNTER_MAX_POLLS; polls++)
        if (*counter != sync)
            return 1;
    return 0;
}

/* trigger_vmexit(info, 0, 0) alone, for the warm-up: `cpuid(0, 0)`, results to info[]. */
static inline __attribute__((always_inline)) void trigger_cpuid(uint32_t info[4]) {
    uint32_t a = 0, b, c = 0, d;
    __asm__ volatile("cpuid\n\t"
                     "movl %%eax, (%[info])\n\t"
                     "movl %%ebx, 4(%[info])\n\t"
                     "movl %%ecx, 8(%[info])\n\t"
                     "movl %%edx, 12(%[info])"
                     : "+a"(a), "=&b"(b), "+c"(c), "=&d"(d)
                     : [info] "r"(info)
                     : "cc", "memory");
}

/* `counter; cpuid(0, 0) (results to info[]); counter`. */
static inline __attribute__((always_inline)) void window_cpuid(const volatile uint64_t *counter, uint32_t info[4],
                                                               uint64_t *pre, uint64_t *post) {
    uint32_t a = 0, b, c = 0, d;
    uint64_t p, q;
    __asm__ volatile("movq (%[counter]), %[p]\n\t"
                     "cpuid\n\t"
                     "movl %%eax, (%[info])\n\t"
                     "movl %%ebx, 4(%[info])\n\t"
                     "movl %%ecx, 8(%[info])\n\t"
                     "movl %%edx, 12(%[info])\n\t"
                     "movq (%[counter]), %[q]"
                     : [p] "=&r"(p), [q] "=&r"(q), "+a"(a), "=&b"(b), "+c"(c), "=&d"(d)
                     : [counter] "r"(counter), [info] "r"(info)
                     : "cc", "memory");
    *pre = p;
    *post = q;
}

#ifdef VMM_GUEST
/* The same two with the CPUID asked of the VMM by hypercall (paravirt). */
static inline __attribute__((always_inline)) void trigger_hypercall(uint32_t info[4]) {
    uint32_t a = 0, b, c = 0, d = VMM_PORT_HYPERCALL;
    __asm__ volatile("out %%eax, %%dx\n\t"
                     "movl %%eax, (%[info])\n\t"
                     "movl %%ebx, 4(%[info])\n\t"
                     "movl %%ecx, 8(%[info])\n\t"
                     "movl %%edx, 12(%[info])"
                     : "+a"(a), "=&b"(b), "+c"(c), "+d"(d)
                     : [info] "r"(info)
                     : "cc", "memory");
}

static inline __attribute__((always_inline)) void window_hypercall(const volatile uint64_t *counter, uint32_t info[4],
                                                                   uint64_t *pre, uint64_t *post) {
    uint32_t a = 0, b, c = 0, d = VMM_PORT_HYPERCALL;
    uint64_t p, q;
    __asm__ volatile("movq (%[counter]), %[p]\n\t"
                     "out %%eax, %%dx\n\t"
                     "movl %%eax, (%[info])\n\t"
                     "movl %%ebx, 4(%[info])\n\t"
                     "movl %%ecx, 8(%[info])\n\t"
                     "movl %%edx, 12(%[info])\n\t"
                     "movq (%[counter]), %[q]"
                     : [p] "=&r"(p), [q] "=&r"(q), "+a"(a), "=&b"(b), "+c"(c), "+d"(d)
                     : [counter] "r"(counter), [info] "r"(info)
                     : "cc", "memory");
    *pre = p;
    *post = q;
}
#endif

/* `counter; 8 x lfence; counter`. */
static inline __attribute__((always_inline)) void window_lfence8(const volatile uint64_t *counter, uint64_t *pre,
                                                                 uint64_t *post) {
    uint64_t p, q;
    __asm__ volatile("movq (%[counter]), %[p]\n\t"
                     "lfence\n\tlfence\n\tlfence\n\tlfence\n\t"
                     "lfence\n\tlfence\n\tlfence\n\tlfence\n\t"
                     "movq (%[counter]), %[q]"
                     : [p] "=&r"(p), [q] "=&r"(q)
                     : [counter] "r"(counter)
                     : "memory");
    *pre = p;
    *post = q;
}

enum collected { COLLECTED, STALLED, TOO_FEW };

struct pairs {
    unsigned batch, valid;
    uint64_t attempts;
};

/* The warm-up and the pairs (L5663-5697). One copy per CPUID path, so that no branch is
 * taken between the windows that VMAware does not take. */
static inline __attribute__((always_inline)) enum collected collect(const volatile uint64_t *counter, struct pairs *pairs,
                                                                    int hypercall) {
    (void)hypercall; /* the native twin has one path */
    uint32_t info[4];
    uint64_t v_pre, v_post, r_pre, r_post;
    for (int i = 0; i < WARMUP; i++) {
#ifdef VMM_GUEST
        if (hypercall)
            trigger_hypercall(info);
        else
#endif
            trigger_cpuid(info);
        __asm__ volatile("lfence\n\tlfence\n\tlfence\n\tlfence\n\t"
                         "lfence\n\tlfence\n\tlfence\n\tlfence" : : : "memory");
    }
    const uint64_t max_attempts = (uint64_t)ATTEMPTS_PER_PAIR * pairs->batch;
    while (pairs->valid < pairs->batch) {
        if (pairs->attempts == max_attempts)
            return TOO_FEW;
        pairs->attempts++;
        if (!tick_sync(counter) || !tick_sync(counter))
            return STALLED;
#ifdef VMM_GUEST
        if (hypercall)
            window_hypercall(counter, info, &v_pre, &v_post);
        else
#endif
            window_cpuid(counter, info, &v_pre, &v_post);
        if (!tick_sync(counter) || !tick_sync(counter))
            return STALLED;
        window_lfence8(counter, &r_pre, &r_post);
        if (v_post > v_pre && r_post > r_pre) {
            vm_samples[pairs->valid] = v_post - v_pre;
            ref_samples[pairs->valid] = r_post - r_pre;
            pairs->valid++;
        }
    }
    return COLLECTED;
}

/* ---- calculate_latency (L5490-5638), in integers ---- */

/* The statistic reads the samples sorted. Tick counts take few distinct values, so they
 * are sorted as runs (value, how many), ascending: a histogram for values under
 * HISTOGRAM, a radix sort for the rest. Every step of calculate_latency then walks runs
 * instead of samples (an emulated guest instruction costs thousands of cycles), and
 * computes what it computes on the sorted vector, index for index. */
#define HISTOGRAM 65536u
static uint32_t histogram[HISTOGRAM];
static uint64_t run_value[BATCH_MAX];
static uint32_t run_count[BATCH_MAX];
static uint64_t high_values[BATCH_MAX]; /* values >= HISTOGRAM, sorted with run_value as scratch */

struct sorted {
    const uint64_t *value;
    const uint32_t *count;
    unsigned runs, n;
};

/* LSD radix sort, a byte a digit, only as many bytes as the largest value has:
 * ascending. `tmp` holds n. */
static void radix_sort(uint64_t *v, uint64_t *tmp, unsigned n) {
    uint64_t all = 0;
    for (unsigned i = 0; i < n; i++)
        all |= v[i];
    uint64_t *src = v, *dst = tmp;
    for (unsigned shift = 0; shift < 64 && (all >> shift) != 0; shift += 8) {
        unsigned count[256];
        for (unsigned d = 0; d < 256; d++)
            count[d] = 0;
        for (unsigned i = 0; i < n; i++)
            count[(src[i] >> shift) & 0xff]++;
        if (count[(src[0] >> shift) & 0xff] == n)
            continue; /* one digit for all: this pass would not move anything */
        unsigned at = 0;
        for (unsigned d = 0; d < 256; d++) {
            unsigned here = count[d];
            count[d] = at;
            at += here;
        }
        for (unsigned i = 0; i < n; i++)
            dst[count[(src[i] >> shift) & 0xff]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != v)
        for (unsigned i = 0; i < n; i++)
            v[i] = src[i];
}

/* std::sort of in[0..n), as runs. */
static struct sorted sort_runs(const uint64_t *in, unsigned n) {
    uint64_t low_max = 0;
    unsigned high = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t x = in[i];
        if (x >= HISTOGRAM)
            high_values[high++] = x;
        else if (x > low_max)
            low_max = x;
    }
    radix_sort(high_values, run_value, high);
    for (unsigned x = 0; x <= low_max; x++)
        histogram[x] = 0;
    for (unsigned i = 0; i < n; i++)
        if (in[i] < HISTOGRAM)
            histogram[in[i]]++;
    unsigned runs = 0;
    if (high < n)
        for (unsigned x = 0; x <= low_max; x++)
            if (histogram[x]) {
                run_value[runs] = x;
                run_count[runs++] = histogram[x];
            }
    for (unsigned i = 0; i < high; i++) {
        if (runs && run_value[runs - 1] == high_values[i]) {
            run_count[runs - 1]++;
        } else {
            run_value[runs] = high_values[i];
            run_count[runs++] = 1;
        }
    }
    struct sorted s = {run_value, run_count, runs, n};
    return s;
}

/* s[i]. */
static uint64_t at(const struct sorted *s, unsigned i) {
    unsigned k = 0;
    for (unsigned start = 0; start + s->count[k] <= i; k++)
        start += s->count[k];
    return s->value[k];
}

/* median_of_sorted(s, lo, hi) (L5503-5510). */
static uint64_t median_of_sorted(const struct sorted *s, unsigned lo, unsigned hi) {
    unsigned len = hi - lo;
    if (len == 0)
        return 0;
    unsigned mid = lo + len / 2;
    if (len & 1)
        return at(s, mid);
    return (at(s, mid - 1) + at(s, mid)) / 2;
}

/* The median of |s[i] - m| (L5515-5534: nth_element and the max of the lower half, the
 * same value as the median of the sorted deviations). The sorted deviations merge the
 * runs below m, walked down, with those above, walked up. */
static uint64_t median_deviation(const struct sorted *s, uint64_t m) {
    unsigned up = 0;
    while (up < s->runs && s->value[up] <= m)
        up++;
    int down = (int)up - 1;
    const unsigned want_hi = s->n / 2, want_lo = s->n & 1 ? want_hi : want_hi - 1;
    uint64_t lo_value = 0;
    unsigned seen = 0;
    for (;;) {
        uint64_t d;
        uint32_t c;
        if (down >= 0 && (up >= s->runs || m - s->value[down] <= s->value[up] - m)) {
            d = m - s->value[down];
            c = s->count[down--];
        } else {
            d = s->value[up] - m;
            c = s->count[up++];
        }
        seen += c; /* deviations [seen - c, seen) are d */
        if (seen > want_lo && seen - c <= want_lo)
            lo_value = d;
        if (seen > want_hi)
            return s->n & 1 ? d : (lo_value + d) / 2;
    }
}

/* sigma = MAD x 1.4826 (1 where MAD is 0); `times` sigma for a whole `times`, as the
 * floor or ceil of MAD x (times x 14826) / 10000, or rounded half up. */
enum rounding { FLOOR, CEIL, NEAREST };
static uint64_t times_sigma(uint64_t mad, uint64_t times, enum rounding rounding) {
    if (mad == 0)
        return times;
    const uint64_t k = times * 14826u;
    const uint64_t q = mad / 10000u, r = mad % 10000u;
    uint64_t part = r * k; /* < 10^4 x 10^5: no overflow */
    if (rounding == NEAREST)
        part += 5000u;
    uint64_t whole = q * k + part / 10000u;
    if (rounding == CEIL && part % 10000u != 0)
        whole++;
    return whole;
}

/* 2 x new_span <= 3 x best_span, without overflow. */
static int within_1_5(uint64_t new_span, uint64_t best_span) {
    return (unsigned __int128)2 * new_span <= (unsigned __int128)3 * best_span;
}

/* VMAware v2.7.0's calculate_latency of in[0..n) (in is left as it is). */
static uint64_t calculate_latency(const uint64_t *in, unsigned n) {
    if (n == 0)
        return 0;
    if (n == 1)
        return in[0];
    const struct sorted sorted = sort_runs(in, n), *s = &sorted;
    const uint64_t *v = s->value;
    const uint32_t *c = s->count;
    const uint64_t first = v[0], last = v[s->runs - 1];
    if (n <= 4)
        return first;

    const uint64_t m = median_of_sorted(s, 0, n);
    const uint64_t mad = median_deviation(s, m);

    /* win = min(N, max(10, ceil(N x 0.08))) */
    const unsigned frac = (unsigned)(((uint64_t)n * 8u + 99u) / 100u);
    const unsigned inner = frac > 10 ? frac : 10;
    const unsigned win = n < inner ? n : inner;

    /* The first i with the least s[i + win - 1] - s[i]: within a run s[i] stays and
     * s[i + win - 1] only grows, so only the starts of runs can be it. */
    unsigned best_i = 0, best_k = 0;
    uint64_t best_span = (last - first) + 1;
    unsigned far_k = 0, far_start = 0; /* the run holding i + win - 1 */
    for (unsigned k = 0, start = 0; k < s->runs && start + win <= n; start += c[k], k++) {
        const unsigned far = start + win - 1;
        while (far_start + c[far_k] <= far)
            far_start += c[far_k++];
        const uint64_t span = v[far_k] - v[k];
        if (span < best_span) {
            best_span = span;
            best_i = start;
            best_k = k;
        }
    }

    /* Grow left, then right, while new_span <= 1.5 best_span or the new sample is within
     * ceil(3 sigma); a run passes or fails whole (its samples are equal, and once one
     * passed best_span is at most new_span). */
    const uint64_t three_sigma = times_sigma(mad, 3, CEIL);
    unsigned lo_c = best_i, hi_c = best_i + win;
    unsigned lo_k = best_k; /* the run starting at lo_c */
    const uint64_t top = at(s, hi_c - 1);
    while (lo_k > 0) {
        const uint64_t below = v[lo_k - 1], new_span = top - below;
        if (!(within_1_5(new_span, best_span) || top <= below + three_sigma))
            break;
        lo_k--;
        lo_c -= c[lo_k];
        best_span = best_span < new_span ? best_span : new_span;
    }
    unsigned hi_k = 0, hi_start = 0; /* the run holding hi_c */
    while (hi_k < s->runs && hi_start + c[hi_k] <= hi_c)
        hi_start += c[hi_k++];
    while (hi_c < n) {
        const uint64_t new_span = v[hi_k] - v[lo_k];
        if (!(within_1_5(new_span, best_span) || v[hi_k] <= v[lo_k] + three_sigma))
            break;
        hi_start += c[hi_k];
        hi_c = hi_start;
        hi_k++;
        best_span = best_span < new_span ? best_span : new_span;
    }

    const unsigned cluster = hi_c - lo_c;
    unsigned min_cluster = n / 50 > 5 ? n / 50 : 5;
    if (min_cluster > n)
        min_cluster = n;
    if (cluster < min_cluster || (uint64_t)cluster * 50u < n) { /* fraction < 0.02 */
        const unsigned fallback = n / 10 > 1 ? n / 10 : 1;
        if (fallback == 1)
            return first;
        const unsigned mid = fallback / 2;
        if (fallback & 1)
            return at(s, mid);
        return (at(s, mid - 1) + at(s, mid)) / 2;
    }

    /* The 10%-trimmed mean of the cluster, llround(sum / count). */
    const unsigned trim = cluster / 10;
    const unsigned lo = lo_c + trim, hi = hi_c - trim;
    if (hi <= lo)
        return median_of_sorted(s, lo_c, hi_c);
    uint64_t sum = 0; /* tick counts: far from 2^64 over 70,000 of them */
    for (unsigned k = 0, start = 0; k < s->runs && start < hi; start += c[k], k++) {
        const unsigned from = start > lo ? start : lo, to = start + c[k] < hi ? start + c[k] : hi;
        if (from < to)
            sum += v[k] * (to - from);
    }
    const uint64_t count = hi - lo;
    uint64_t result = (2 * sum + count) / (2 * count);

    /* result - M > 6 sigma: M + 4 sigma, rounded (result - M is whole: > 6 sigma is
     * > floor(6 sigma)). */
    if (result > m && result - m > times_sigma(mad, 6, FLOOR))
        result = m + times_sigma(mad, 4, NEAREST);
    if (result == 0)
        result = first;
    return result;
}

/* ---- the report ---- */

static void add_milli(struct vmm_text *line, uint64_t milli) {
    vmm_text_add_u64(line, milli / 1000);
    vmm_text_add(line, ".");
    char digits[4] = {(char)('0' + milli / 100 % 10), (char)('0' + milli / 10 % 10), (char)('0' + milli % 10), 0};
    vmm_text_add(line, digits);
}

static void add_hex(struct vmm_text *line, uint32_t value) {
    char digits[11] = "0x";
    int n = 2;
    int started = 0;
    for (int shift = 28; shift >= 0; shift -= 4) {
        unsigned nibble = (value >> shift) & 0xf;
        if (nibble || started || shift == 0) {
            digits[n++] = (char)(nibble < 10 ? '0' + nibble : 'a' + nibble - 10);
            started = 1;
        }
    }
    digits[n] = 0;
    vmm_text_add(line, digits);
}

static void say(struct vmm_run *run, enum vmm_verdict verdict, int64_t score, const struct vmm_text *line) {
    vmm_verdict(run, verdict, score, line->text);
    vmm_print(line->text);
}

/* Eight bytes a step (an eighth of the iterations of the SDK's `rep movsb` memcpy: they
 * count where the KVM emulates). */
static void copy_u64(void *dst, const void *src, uint64_t n) {
    __asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}
static void zero_u64(void *dst, uint64_t n) {
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(n) : "a"(0ull) : "memory");
}

/* Reports the first kept pairs (as many as fit): CPUID window ticks as `cpuid`, 8 x
 * LFENCE window ticks as `lfence8`. Returns how many. */
static unsigned report_pairs(struct vmm_run *run, unsigned valid) {
    const uint32_t probes = (1u << VMM_PROBE_CPUID) | (1u << VMM_PROBE_LFENCE8);
    unsigned reported = valid;
    uint32_t fit = vmm_samples_that_fit(run, probes);
    if (reported > fit)
        reported = fit;
    if (reported == 0 || vmm_begin(run, probes, reported) != VMM_STATUS_OK)
        return 0;
    /* Tick deltas are far below 2^63: as int64_t they are the same bytes. */
    copy_u64(vmm_samples(run, VMM_PROBE_CPUID), vm_samples, reported);
    copy_u64(vmm_samples(run, VMM_PROBE_LFENCE8), ref_samples, reported);
    return reported;
}

/* `make EXTRA_CFLAGS=-DTIMER_PHASES`: the TSC cycles each phase took, on the console
 * (`vmm run --console`): where the time goes on a slow (emulating) KVM. */
#ifdef TIMER_PHASES
static uint64_t phase_start;
static void phase(const char *what) {
    char digits[24];
    uint64_t now = vmm_rdtsc();
    vmm_format_u64(digits, (now - phase_start) / 1000000);
    phase_start = now;
    struct vmm_text line = {{0}, 0};
    vmm_text_add(&line, "phase ");
    vmm_text_add(&line, what);
    vmm_text_add(&line, ": ");
    vmm_text_add(&line, digits);
    vmm_text_add(&line, " Mcycles");
    vmm_print(line.text);
}
#else
#define phase(what) ((void)0)
#endif

int vmm_detect(struct vmm_run *run) {
    if (run->config->counter_addr == 0)
        return VMM_STATUS_NO_COUNTER; /* declared VMM_CAP_COUNTER: the VMM never runs it so */
    const volatile uint64_t *counter =
        &((const volatile struct vmm_counter_block *)(uintptr_t)run->config->counter_addr)->counter;
    struct vmm_text line = {{0}, 0};

#ifdef TIMER_PHASES
    phase_start = vmm_rdtsc();
#endif
    const char *translated = translator(run);
    if (translated) {
        vmm_text_add(&line, "TIMER 2.7.0: under a translator (");
        vmm_text_add(&line, translated);
        vmm_text_add(&line, "): VMAware returns false");
        say(run, VMM_VERDICT_NATIVE, 0, &line);
        return VMM_STATUS_OK;
    }
    const char *hv = hyper_v(run);

    struct pairs pairs = {BATCH_MIN + (unsigned)(vmm_mix64(vmm_rdtsc() ^ *counter) % (BATCH_MAX - BATCH_MIN + 1)), 0, 0};
    vmm_sleep_ms(run, 0); /* SleepEx(0, FALSE) */
    zero_u64(vm_samples, pairs.batch); /* the vectors, zero-filled and locked */
    zero_u64(ref_samples, pairs.batch);

    phase("setup");
    enum collected collected;
#ifdef VMM_GUEST
    if (run->config->flags & VMM_FLAG_PARAVIRT_CPUID)
        collected = collect(counter, &pairs, 1);
    else
#endif
        collected = collect(counter, &pairs, 0);

    phase("pairs");
    const unsigned reported = report_pairs(run, pairs.valid);
    phase("report");
    if (collected == STALLED) {
        vmm_text_add(&line, "TIMER 2.7.0: counter stalled (no tick in ");
        vmm_text_add_u64(&line, VMM_COUNTER_MAX_POLLS);
        vmm_text_add(&line, " polls) at pair ");
        vmm_text_add_u64(&line, pairs.valid + 1);
        vmm_text_add(&line, " of ");
        vmm_text_add_u64(&line, pairs.batch);
        vmm_text_add(&line, ", try ");
        vmm_text_add_u64(&line, pairs.attempts);
        vmm_text_add(&line, "; VMAware waits for ever");
        say(run, VMM_VERDICT_UNSURE, 0, &line);
        return VMM_STATUS_OK;
    }
    if (collected == TOO_FEW) {
        vmm_text_add(&line, "TIMER 2.7.0: only ");
        vmm_text_add_u64(&line, pairs.valid);
        vmm_text_add(&line, " of ");
        vmm_text_add_u64(&line, pairs.batch);
        vmm_text_add(&line, " pairs saw ticks in both windows in ");
        vmm_text_add_u64(&line, pairs.attempts);
        vmm_text_add(&line, " tries; VMAware retries for ever");
        say(run, VMM_VERDICT_UNSURE, 0, &line);
        return VMM_STATUS_OK;
    }

    const uint64_t cpuid_l = calculate_latency(vm_samples, pairs.valid);
    phase("cpuid_l");
    const uint64_t ref_l = calculate_latency(ref_samples, pairs.valid);
    phase("ref_l");
    /* ratio = ref_l ? cpuid_l / ref_l : 0; >= 3.5 (25 with Hyper-V) */
    const unsigned __int128 c = cpuid_l, r = ref_l;
    const int detected = ref_l != 0 && (hv ? c >= 25 * r : 2 * c >= 7 * r);
    /* ratio x 1000, rounded (no 128-bit division in a guest without libgcc) */
    uint64_t ratio_milli = 0;
    if (ref_l != 0)
        ratio_milli = cpuid_l < (1ull << 52) && ref_l < (1ull << 52) ? (2000 * cpuid_l + ref_l) / (2 * ref_l)
                                                                   : cpuid_l / ref_l * 1000;

    /* The AMD XSAVE check, when nothing was detected (L5713-5733). */
    uint32_t regs[4];
    cpuid_ff(run, 0, regs);
    const int amd = regs[2] == 0x444d4163u; /* cpu::is_amd(): ECX "cAMD" */
    int bypass = 0, cet = 0;
    uint32_t xss_delta = 0;
    if (amd && !detected) {
        uint32_t d0[4], d1[4], d12[4], ext[4];
        cpuid(run, 0xd, 0, d0);
        cpuid(run, 0xd, 1, d1);
        cpuid(run, 0xd, 12, d12);
        cpuid(run, 0x80000008u, 0, ext); /* asked, never read, as in VMAware */
        cet = (int32_t)d12[0] > 0; /* hardware_supports_cet */
        if (cet) {
            xss_delta = d1[1] - d0[1];
            bypass = xss_delta != 0x10;
        }
    }

    vmm_text_add(&line, "TIMER 2.7.0: cpuid_l ");
    vmm_text_add_u64(&line, cpuid_l);
    vmm_text_add(&line, " / ref_l ");
    vmm_text_add_u64(&line, ref_l);
    vmm_text_add(&line, " = ");
    add_milli(&line, ratio_milli);
    vmm_text_add(&line, detected ? " >= " : " < ");
    vmm_text_add(&line, hv ? "25 (Hyper-V)" : "3.5");
    vmm_text_add(&line, ", ");
    vmm_text_add_u64(&line, pairs.valid);
    vmm_text_add(&line, " pairs");
    if (bypass) {
        vmm_text_add(&line, "; AMD XSAVE delta ");
        add_hex(&line, xss_delta);
        vmm_text_add(&line, " != 0x10: bypass");
    }
    /* The console gets the whole story; the reason line what fits. */
    struct vmm_text more = {{0}, 0};
    vmm_text_add(&more, "TIMER 2.7.0: batch ");
    vmm_text_add_u64(&more, pairs.batch);
    vmm_text_add(&more, ", tries ");
    vmm_text_add_u64(&more, pairs.attempts);
    vmm_text_add(&more, ", reported ");
    vmm_text_add_u64(&more, reported);
    if (hv) {
        vmm_text_add(&more, ", ");
        vmm_text_add(&more, hv);
    }
    if (amd && detected)
        vmm_text_add(&more, ", AMD: no XSAVE check (detected already)");
    else if (amd && !cet)
        vmm_text_add(&more, ", AMD: no CET (CPUID 0xd,12 EAX <= 0), no XSAVE check");
    else if (amd) {
        vmm_text_add(&more, ", AMD: XSAVE supervisor delta ");
        add_hex(&more, xss_delta);
    }
    vmm_print(more.text);
    say(run, detected || bypass ? VMM_VERDICT_VIRTUAL : VMM_VERDICT_NATIVE, (int64_t)ratio_milli, &line);
    return VMM_STATUS_OK;
}
