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

/* A C++ payload's static constructors (payload.ld gathers them). */
typedef void (*vmm_constructor)(void);
extern const vmm_constructor __init_array_start[], __init_array_end[];

/* The VMM starts it with RSP = VMM_STACK_TOP - 8, as after a `call`: the stack is 16-byte
 * aligned at every call, as the System V ABI demands and SSE code relies on (movaps of a
 * local). force_align_arg_pointer keeps that true whatever RSP the entry finds. */
__attribute__((section(".text._start"), noreturn, force_align_arg_pointer)) void _start(void) {
    const struct vmm_config *config = (const struct vmm_config *)VMM_CONFIG_ADDR;
    if (config->magic != VMM_CONFIG_MAGIC)
        ring_done(VMM_STATUS_BAD_CONFIG_MAGIC);
    if (config->abi_version != VMM_ABI_VERSION)
        ring_done(VMM_STATUS_ABI_MISMATCH);
    for (const vmm_constructor *constructor = __init_array_start; constructor < __init_array_end; constructor++)
        (*constructor)();
    struct vmm_run run = {config, (struct vmm_result_header *)config->result_addr, 0, 0};
    ring_done((uint32_t)vmm_run_detector(&run));
}
