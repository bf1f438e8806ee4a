/* checkhv_um's TSC noise-floor check, our code after its logic: zer0condition/checkhv_um
 * at 33cf1422b2987bc3785f651f53ee9b5ad62a321e, hv_um.cpp, CheckTSCNoiseFloor(), L269-L309.
 *
 * The original: 100,000 plain __rdtsc() reads, each minus the one before (L276-L287); a
 * delta is kept only if 0 < delta < 10000 (L282); over the kept N, the mean (L292) and the
 * count of deltas above 1.5 x mean (L297-L300); "failed" (its word for "hypervisor
 * suspected") when that count exceeds (int)(N * 0.1) (L302). With N <= 1 it logs nothing
 * at all (L291): here that is an unsure verdict, saying so. The standard deviation it
 * prints (L295) decides nothing and is left out.
 *
 * Its comments (L266-L268) and README say a vCPU shows "unnatural consistency (<10%
 * peaks)"; the code flags the opposite, more than 10% peaks: reproduced as coded.
 *
 * What differs here: the original raises its thread to TIME_CRITICAL and pins it to CPU 0
 * (L273-L274); the native twin is pinned by vmm, and the guest has nothing else to run.
 * Integer arithmetic in place of doubles, exactly equivalent: d > 1.5 x mean is
 * 2 x d x N > 3 x sum, and (int)(N * 0.1) is N / 10 for every N here. */
#include "vmm_sdk.h"

VMM_PAYLOAD("checkhv_um TSCNoiseFloor", VMM_CAP_VERDICT);

#define READS 100000
#define KEEP_BELOW 10000

static uint32_t kept[READS];

int vmm_detect(struct vmm_run *run) {
    uint32_t n = 0;
    uint64_t sum = 0;
    uint64_t prev = vmm_rdtsc();
    for (int i = 0; i < READS; i++) {
        uint64_t curr = vmm_rdtsc();
        uint64_t delta = curr - prev;
        if (delta > 0 && delta < KEEP_BELOW) {
            kept[n++] = (uint32_t)delta;
            sum += delta;
        }
        prev = curr;
    }
    if (n <= 1) {
        vmm_verdict(run, VMM_VERDICT_UNSURE, 0,
                    "fewer than two rdtsc deltas in (0, 10000): the original logs nothing");
        return VMM_STATUS_OK;
    }
    uint32_t high = 0;
    for (uint32_t i = 0; i < n; i++)
        if (2ull * kept[i] * n > 3ull * sum)
            high++;
    int peaks = high > n / 10;
    /* The score: the share of peaks in per mille (1000 = every delta), given in the
     * thousandths the SDK's scores are written in. */
    vmm_verdict(run, peaks ? VMM_VERDICT_VIRTUAL : VMM_VERDICT_NATIVE, (int64_t)high * 1000 * 1000 / n,
                peaks ? "more than 10% of rdtsc deltas above 1.5x their mean (failed)"
                      : "at most 10% of rdtsc deltas above 1.5x their mean (pass)");
    return VMM_STATUS_OK;
}
