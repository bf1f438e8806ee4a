// VMAware's TIMER technique (v2.6.0, the part that runs on Linux) in C++, written the way
// its authors write it -- a lambda, `double` arithmetic for the trimmed mean, a header-only
// sort -- plus an `__int128` division and, with `make CPUID=pafish`, pafish's `cpuid` line:
// what a detector author brings when wrapping VMAware, pafish or al-khaser with the SDK.
// It is built with the SDK unchanged (sdk.mk compiles .cpp with $(CXX), freestanding in
// the guest; the twin links with libstdc++) at the original's -O2 and warnings.
//
// Original: kernelwernel/VMAware, src/vmaware.hpp, `static bool timer()`, tag v2.6.0
// (commit 4a441cde, 2026-01-25), lines 4572-5044; the logic (translator check, RDTSCP
// required, 128 warm-ups, 1000 x `lfence; rdtsc; cpuid(0); rdtscp; lfence`, the low
// cluster's 10%-trimmed mean, VM at >= 1000 or <= 20 cycles) is the C port's,
// ../vmaware-timer-2.6/vmaware_timer.c, which lists every step and what differs. Our
// code, not a copy of VMAware's: the source is not reachable from the build host.
//
// What this file adds to the C port, to show the SDK takes it:
//  * `double`: the trimmed mean is `sum / count` in double and rounded with +0.5, as
//    VMAware computes it. On a hardware KVM (and natively) it runs. An emulating KVM
//    (this project's development host) runs no floating-point arithmetic: there the VMM
//    stops the run and names the instruction (`cvtsi2sd`, `divsd`, ...) and its RIP.
//  * `__int128`: the score in thousandths is (latency * 1000) / 1000 computed in 128 bits
//    (an identity, to need `__divti3`: the SDK supplies a general-register one).
//  * `make CPUID=pafish`: the timed CPUID is pafish 0.6's line verbatim,
//        __asm__ volatile("cpuid" : /* no output */ : "a"(0x00));
//    which tells the compiler nothing about EBX, ECX and EDX, which CPUID overwrites. At
//    -O0 every value lives on the stack between statements, and it measures what it says.
//    At -O2 the compiler may keep a value in one of those registers across the asm (the
//    first TSC read, a loop bound, a pointer): the sample, the verdict, even the loop may
//    be garbage. The SDK calls vmm_detect() with RBX, RBP and R12-R15 saved and restored
//    around it, so what the detector wrote is still reported as written and the VMM does
//    not misreport; a pointer the detector itself lost is its own fault (the VMM then
//    reports the guest's fault, or the twin's signal).
//  * `make RDTSCP=0`: the closing `rdtscp` becomes `lfence; rdtsc` and VMM_CAP_RDTSCP is
//    not declared, so the payload runs on a KVM that cannot run rdtscp in a guest.
#include "vmm_sdk.h"

#ifndef CPUID_AS_PAFISH
#define CPUID_AS_PAFISH 0
#endif
#ifndef TIMER_RDTSCP
#define TIMER_RDTSCP 1
#endif

#if TIMER_RDTSCP
VMM_PAYLOAD("VMAware TIMER 2.6.0 C++", VMM_CAP_VERDICT | VMM_CAP_RDTSCP);
#else
VMM_PAYLOAD("VMAware TIMER 2.6.0 C++ rdtsc", VMM_CAP_VERDICT);
#endif

namespace {

using u32 = uint32_t;
using u64 = uint64_t;

constexpr int warmup = 128;
constexpr int samples_n = 1000;
constexpr u64 cycle_threshold = 1000;
constexpr u64 floor_cycles = 20;

u64 sorted[samples_n];
u64 gaps[samples_n - 1];
u64 gaps_ordered[samples_n - 1];

inline __attribute__((always_inline)) u64 timed_cpuid() {
    u32 lo1, hi1, lo2, hi2;
    __asm__ volatile("lfence\n\trdtsc" : "=a"(lo1), "=d"(hi1) : : "memory");
#if CPUID_AS_PAFISH
    // pafish 0.6, cpu.c, rdtsc_diff_vmexit(): verbatim.
    __asm__ volatile("cpuid" : /* no output */ : "a"(0x00));
#else
    u32 a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) : : "memory");
    (void)b;
    (void)d;
#endif
#if TIMER_RDTSCP
    __asm__ volatile("rdtscp\n\tlfence" : "=a"(lo2), "=d"(hi2) : : "rcx", "memory");
#else
    __asm__ volatile("lfence\n\trdtsc\n\tlfence" : "=a"(lo2), "=d"(hi2) : : "memory");
#endif
    return ((static_cast<u64>(hi2) << 32) | lo2) - ((static_cast<u64>(hi1) << 32) | lo1);
}

template <typename T> void shell_sort(T *v, unsigned n) {
    for (unsigned gap = n / 2; gap > 0; gap /= 2)
        for (unsigned i = gap; i < n; i++) {
            T x = v[i];
            unsigned j = i;
            for (; j >= gap && v[j - gap] > x; j -= gap)
                v[j] = v[j - gap];
            v[j] = x;
        }
}

// calculate_latency(), as the C port's, with VMAware's double arithmetic.
u64 calculate_latency(const int64_t *samples, unsigned n) {
    for (unsigned i = 0; i < n; i++)
        sorted[i] = static_cast<u64>(samples[i]);
    shell_sort(sorted, n);
    auto median_of_sorted = [](const u64 *s, unsigned count) -> u64 {
        unsigned mid = count / 2;
        return (count % 2) ? s[mid] : (s[mid - 1] + s[mid]) / 2;
    };
    if (n <= 4)
        return sorted[0];
    for (unsigned i = 1; i < n; i++)
        gaps[i - 1] = sorted[i] - sorted[i - 1];
    for (unsigned i = 0; i < n - 1; i++)
        gaps_ordered[i] = gaps[i];
    shell_sort(gaps_ordered, n - 1);
    const u64 median_gap = gaps_ordered[(n - 1) / 2];
    const u64 gap_threshold = 5 * median_gap > 50 ? 5 * median_gap : 50;
    unsigned split = 0;
    for (unsigned i = 0; i < n - 1; i++)
        if (gaps[i] >= gap_threshold) {
            split = i + 1;
            break;
        }
    const unsigned tenth = n / 10 > 1 ? n / 10 : 1;
    if (split == 0)
        split = tenth;
    unsigned cluster = split;
    if (static_cast<double>(cluster) / n < 0.05)
        cluster = tenth;
    if (cluster < 10)
        return median_of_sorted(sorted, cluster);
    const unsigned trim = cluster / 10, lo = trim, hi = cluster - trim;
    if (hi <= lo)
        return median_of_sorted(sorted, cluster);
    double sum = 0.0;
    for (unsigned i = lo; i < hi; i++)
        sum += static_cast<double>(sorted[i]);
    return static_cast<u64>(sum / (hi - lo) + 0.5);
}

bool vendor_is(const u32 regs[4], const char *name) {
    const u32 words[3] = {regs[1], regs[2], regs[3]};
    for (int i = 0; i < 12; i++)
        if (static_cast<char>(words[i / 4] >> (8 * (i % 4))) != name[i])
            return false;
    return true;
}

} // namespace

int vmm_detect(struct vmm_run *run) {
    int status = vmm_begin(run, 1u << VMM_PROBE_CPUID, samples_n);
    if (status != VMM_STATUS_OK)
        return status;
    u32 regs[4];
    vmm_cpuid(run, 0x40000000u, 0, regs);
    if (vendor_is(regs, "VirtualApple") || vendor_is(regs, "PowerVM Lx86")) {
        vmm_verdict(run, VMM_VERDICT_NATIVE, 0, "TIMER 2.6.0 C++: running under a translator, not judged");
        return VMM_STATUS_OK;
    }
#if TIMER_RDTSCP
    if (!vmm_has_rdtscp(run)) {
        vmm_verdict(run, VMM_VERDICT_VIRTUAL, 1000, "TIMER 2.6.0 C++: RDTSCP not supported");
        return VMM_STATUS_OK;
    }
#endif
    vmm_sleep_ms(run, vmm_in_guest() ? 0 : 1);
    for (int w = 0; w < warmup; w++)
        (void)timed_cpuid();
    int64_t *samples = vmm_samples(run, VMM_PROBE_CPUID);
    for (int i = 0; i < samples_n; i++)
        samples[i] = static_cast<int64_t>(timed_cpuid());
    const u64 latency = calculate_latency(samples, samples_n);
    const bool vm = latency >= cycle_threshold || latency <= floor_cycles;
    // An identity in 128 bits: the division is __divti3.
    volatile __int128 thousand = 1000;
    const int64_t score = static_cast<int64_t>((static_cast<__int128>(latency) * 1000) / thousand);
    vmm_text line = {{0}, 0};
    vmm_text_add(&line, TIMER_RDTSCP ? "TIMER 2.6.0 C++: lfence;rdtsc;cpuid(0);rdtscp;lfence latency "
                                     : "TIMER 2.6.0 C++: lfence;rdtsc;cpuid(0);lfence;rdtsc latency ");
    vmm_text_add_u64(&line, latency);
    vmm_text_add(&line, vm ? " cycles: >= 1000 or <= 20" : " cycles: in (20, 1000)");
    if (CPUID_AS_PAFISH)
        vmm_text_add(&line, "; pafish's cpuid asm");
    vmm_verdict(run, vm ? VMM_VERDICT_VIRTUAL : VMM_VERDICT_NATIVE, score, line.text);
    vmm_print(line.text);
    return VMM_STATUS_OK;
}
