/* pafish's CPUID timing check, our code after its logic.
 *
 * Original: a0rtega/pafish, pafish/cpu.c, cpu_rdtsc_force_vmexit() and
 * rdtsc_diff_vmexit(), release v0.6 (commit b497899f, 2021-11-09; unchanged since 2015):
 *   10 times: rdtsc; cpuid with EAX = 0; rdtsc (no fence, no warm-up), Sleep(500) after each;
 *   avg = (sum of the 10 differences) / 10, unsigned integer division;
 *   a VM unless 0 < avg < 1000 (an average of 0 also counts as a VM).
 * al-khaser's rdtsc_diff_vmexit() (TimingAttacks/timing.cpp, v1.1.0) is the same rule
 * without the sleep. What differs here: the sleep is a TSC spin (no OS in the guest) and
 * is off unless built with SLEEP_MS=500; the samples are also recorded for vmm's rules. */
#include "vmm_sdk.h"

VMM_PAYLOAD("pafish rdtsc_force_vmexit 0.6", VMM_CAP_PARAVIRT_CPUID | VMM_CAP_VERDICT);

#define SAMPLES 10

static uint64_t rdtsc_diff_vmexit(const struct vmm_run *run) {
    uint32_t regs[4];
    uint64_t start = vmm_rdtsc();
    vmm_cpuid(run, 0, 0, regs); /* the hypercall instead, in a paravirt guest */
    return vmm_rdtsc() - start;
}

int vmm_detect(struct vmm_run *run) {
    int status = vmm_begin(run, 1u << VMM_PROBE_CPUID_UNFENCED, SAMPLES);
    if (status != VMM_STATUS_OK)
        return status;
    int64_t *samples = vmm_samples(run, VMM_PROBE_CPUID_UNFENCED);
    uint64_t sum = 0;
    for (int i = 0; i < SAMPLES; i++) {
        uint64_t diff = rdtsc_diff_vmexit(run);
        samples[i] = (int64_t)diff;
        sum += diff;
        if (SLEEP_MS)
            vmm_spin_ms(run, SLEEP_MS);
    }
    uint64_t avg = sum / SAMPLES;
    int native = avg < 1000 && avg > 0;
    char reason[VMM_REASON_BYTES] = "rdtsc;cpuid(0);rdtsc mean of 10 = ";
    char number[21];
    vmm_format_u64(number, avg);
    char *end = reason;
    while (*end)
        end++;
    for (char *n = number; *n;)
        *end++ = *n++;
    const char *tail = native ? " cycles: 0 < mean < 1000" : " cycles: not 0 < mean < 1000";
    while (*tail)
        *end++ = *tail++;
    *end = 0;
    vmm_verdict(run, native ? VMM_VERDICT_NATIVE : VMM_VERDICT_VIRTUAL, (int64_t)avg, reason);
    return VMM_STATUS_OK;
}
