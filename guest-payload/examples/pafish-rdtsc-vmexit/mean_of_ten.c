/* The "mean of ten" TSC checks of pafish and al-khaser, our code after their logic. One
 * source, three payloads (the Makefile of each example picks the check with CHECK_*):
 *
 * pafish, a0rtega/pafish, pafish/cpu.c, release v0.6 (commit b497899f):
 *   cpu_rdtsc_force_vmexit()  10 times `rdtsc; cpuid(EAX=0); rdtsc`, Sleep(500) after each;
 *                             VM unless 0 < avg < 1000                (CHECK_PAFISH_VMEXIT)
 *   cpu_rdtsc()               10 times `rdtsc; rdtsc`, Sleep(500) after each;
 *                             VM unless 0 < avg < 750                 (CHECK_PAFISH_RDTSC)
 * al-khaser, LordNoteworthy/al-khaser, al-khaser/TimingAttacks/timing.cpp, release v1.0.0
 * (commit 680b623e; unchanged at b4d1e5af):
 *   rdtsc_diff_vmexit()       10 times `__rdtsc(); __cpuid(info, 0); __rdtsc()`, no sleep;
 *                             VM unless 0 < avg < 1000                (CHECK_AL_KHASER)
 * All three: no LFENCE, no warm-up, no pinning; avg = (sum of unsigned 64-bit differences)
 * / 10, integer division (an average of 0 also counts as a VM).
 *
 * What differs here: Sleep(500) is vmm_sleep_ms (nanosleep in the native twin, a TSC spin
 * in the guest, which has no OS) and only if built with SLEEP_MS=500 (default 0, said in
 * the reason line); the samples are also recorded, for vmm's own rules; in a paravirt
 * guest CPUID is the hypercall. The timed window is inline, as the originals': rdtsc,
 * the CPUID (ECX = 0, as MSVC's __cpuid sets it; pafish leaves ECX as it is), rdtsc. al-khaser's other TSC check, rdtsc_diff_locky(), times
 * Windows API calls (GetProcessHeap, CloseHandle) and has no equivalent in a bare guest. */
#include "vmm_sdk.h"

#if defined(CHECK_PAFISH_RDTSC)
/* No CPUID to time, so no paravirt: the VMM refuses paravirt and trap-emulate, saying why. */
VMM_PAYLOAD("pafish cpu_rdtsc 0.6", VMM_CAP_VERDICT);
#define THRESHOLD 750
#define PROBE VMM_PROBE_RDTSC
#define TIMED "rdtsc;rdtsc"
#elif defined(CHECK_AL_KHASER)
VMM_PAYLOAD("al-khaser rdtsc_diff_vmexit 1.0", VMM_CAP_PARAVIRT_CPUID | VMM_CAP_VERDICT);
#define THRESHOLD 1000
#define PROBE VMM_PROBE_CPUID_UNFENCED
#define TIMED "rdtsc;cpuid(0);rdtsc"
#elif defined(CHECK_PAFISH_VMEXIT)
VMM_PAYLOAD("pafish rdtsc_force_vmexit 0.6", VMM_CAP_PARAVIRT_CPUID | VMM_CAP_VERDICT);
#define THRESHOLD 1000
#define PROBE VMM_PROBE_CPUID_UNFENCED
#define TIMED "rdtsc;cpuid(0);rdtsc"
#else
#error "build with -DCHECK_PAFISH_VMEXIT, -DCHECK_PAFISH_RDTSC or -DCHECK_AL_KHASER"
#endif

#ifndef SLEEP_MS
#define SLEEP_MS 0
#endif
#define SAMPLES 10

static inline __attribute__((always_inline)) void cpuid_leaf0(void) {
    uint32_t a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
}

#ifdef VMM_GUEST
/* CPUID leaf 0 asked of the VMM (paravirt): the same registers, through the port. */
static inline __attribute__((always_inline)) void hypercall_leaf0(void) {
    uint32_t a = 0, b, c = 0, d = VMM_PORT_HYPERCALL;
    __asm__ volatile("out %%eax, %%dx" : "+a"(a), "=b"(b), "+c"(c), "+d"(d));
}
#endif

/* One timing: the window holds the two rdtsc and what they time, nothing else. */
static uint64_t one_timing(int paravirt) {
    uint64_t start;
#if PROBE == VMM_PROBE_CPUID_UNFENCED
#ifdef VMM_GUEST
    if (paravirt) {
        start = vmm_rdtsc();
        hypercall_leaf0();
        return vmm_rdtsc() - start;
    }
#endif
    start = vmm_rdtsc();
    cpuid_leaf0();
#else
    start = vmm_rdtsc();
#endif
    (void)paravirt;
    return vmm_rdtsc() - start;
}

int vmm_detect(struct vmm_run *run) {
    int status = vmm_begin(run, 1u << PROBE, SAMPLES);
    if (status != VMM_STATUS_OK)
        return status;
    int64_t *samples = vmm_samples(run, PROBE);
    int paravirt = vmm_in_guest() && (run->config->flags & VMM_FLAG_PARAVIRT_CPUID);
    uint64_t sum = 0;
    int slept = 1;
    for (int i = 0; i < SAMPLES; i++) {
        uint64_t diff = one_timing(paravirt);
        samples[i] = (int64_t)diff;
        sum += diff; /* unsigned, as in the originals: a backwards step wraps */
        if (SLEEP_MS)
            slept &= vmm_sleep_ms(run, SLEEP_MS);
    }
    uint64_t avg = sum / SAMPLES;
    int native = avg < THRESHOLD && avg > 0;
    struct vmm_text why = {{0}, 0};
    vmm_text_add(&why, TIMED " mean of 10 = ");
    vmm_text_add_u64(&why, avg);
    vmm_text_add(&why, native ? " cycles: 0 < mean < " : " cycles: not 0 < mean < ");
    vmm_text_add_u64(&why, THRESHOLD);
    if (SLEEP_MS && slept) {
        vmm_text_add(&why, "; slept ");
        vmm_text_add_u64(&why, SLEEP_MS);
        vmm_text_add(&why, " ms after each sample");
    } else if (SLEEP_MS) {
        vmm_text_add(&why, "; could not sleep (TSC rate unknown)");
    } else {
        vmm_text_add(&why, "; no sleep between samples (built with SLEEP_MS=0)");
    }
    vmm_verdict(run, native ? VMM_VERDICT_NATIVE : VMM_VERDICT_VIRTUAL, (int64_t)avg, why.text);
    return VMM_STATUS_OK;
}
