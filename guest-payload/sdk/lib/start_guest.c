/* The guest build's entry point. The VMM starts the vCPU here in 64-bit long mode with
 * the stack set, interrupts off and no IDT (any exception is a triple fault, which the VMM
 * reports with the RIP). See docs/sdk.md for what the VMM demands, in order. */
#include "vmm_sdk.h"

__attribute__((noreturn)) static void ring_done(uint32_t status) {
    for (;;) {
        __asm__ volatile("out %0, %1" : : "a"(status), "Nd"((uint16_t)VMM_PORT_DONE));
        __asm__ volatile("hlt");
    }
}

__attribute__((section(".text._start"), noreturn)) void _start(void) {
    const struct vmm_config *config = (const struct vmm_config *)VMM_CONFIG_ADDR;
    if (config->magic != VMM_CONFIG_MAGIC)
        ring_done(VMM_STATUS_BAD_CONFIG_MAGIC);
    if (config->abi_version != VMM_ABI_VERSION)
        ring_done(VMM_STATUS_ABI_MISMATCH);
    struct vmm_result_header *result = (struct vmm_result_header *)config->result_addr;
    struct vmm_run run = {config, result, 0, 0};
    result->verdict = VMM_VERDICT_NONE;
    result->tsc_start = vmm_rdtsc_fenced();
    int status = vmm_detect(&run);
    result->tsc_end = vmm_rdtsc_fenced();
    result->abi_version = VMM_ABI_VERSION;
    result->status = (uint32_t)status;
    result->iterations = run.iterations;
    result->probes = run.probes;
    if (status == VMM_STATUS_OK) {
        /* The magic goes in last: the VMM never takes a half-written block for a whole. */
        __asm__ volatile("" : : : "memory");
        result->magic = VMM_RESULT_MAGIC;
    }
    ring_done((uint32_t)status);
}
