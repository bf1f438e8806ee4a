/* Five CPUID instructions, each timed once between fenced TSC reads: a payload the VMM
 * knows nothing about but what its code says (no vmm_site_* symbols). */
#include "vmm_sdk.h"

VMM_PAYLOAD("five cpuids", 0);

/* One CPUID site per expansion: `asm volatile` statements are never merged. */
#define TIMED_CPUID(slot)                                                                   \
    do {                                                                                    \
        uint32_t a = 0, b, c = 0, d;                                                        \
        uint64_t start = vmm_rdtsc_fenced();                                                \
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));                     \
        samples[slot] = (int64_t)(vmm_rdtsc_fenced() - start);                              \
    } while (0)

int vmm_detect(struct vmm_run *run) {
    int status = vmm_begin(run, 1u << VMM_PROBE_CPUID, 5);
    if (status != VMM_STATUS_OK)
        return status;
    int64_t *samples = vmm_samples(run, VMM_PROBE_CPUID);
    TIMED_CPUID(0);
    TIMED_CPUID(1);
    TIMED_CPUID(2);
    TIMED_CPUID(3);
    TIMED_CPUID(4);
    vmm_print("five cpuids: done\n");
    return VMM_STATUS_OK;
}
