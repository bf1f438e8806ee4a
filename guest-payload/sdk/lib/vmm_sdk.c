/* The SDK's helpers, compiled into both builds (VMM_GUEST set for the guest). */
#include "vmm_sdk.h"

#ifdef VMM_GUEST
static inline void outb(uint16_t port, uint8_t value) {
    __asm__ volatile("out %0, %1" : : "a"(value), "Nd"(port));
}
#else
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#endif

int vmm_in_guest(void) {
#ifdef VMM_GUEST
    return 1;
#else
    return 0;
#endif
}

/* No libgcc in the guest: count bits by hand. */
static unsigned bits(uint32_t mask) {
    unsigned n = 0;
    for (; mask; mask &= mask - 1)
        n++;
    return n;
}

/* Bytes per sample of one probe: a TSC sample, and room for its tick count too where the
 * payload reports ticks (result->ticks set; the VMM counts them only then). */
static uint64_t bytes_per_sample(const struct vmm_run *run) {
    return (run->result->ticks != 0 ? 2 : 1) * sizeof(int64_t);
}

static uint64_t sample_bytes(const struct vmm_run *run, uint32_t probes, uint32_t iterations) {
    return (uint64_t)bits(probes) * iterations * bytes_per_sample(run);
}

int vmm_begin(struct vmm_run *run, uint32_t probes, uint32_t iterations) {
    if (probes == 0 || iterations == 0)
        return VMM_STATUS_BAD_CONFIG;
    if (sizeof(struct vmm_result_header) + sample_bytes(run, probes, iterations) > run->config->result_capacity)
        return VMM_STATUS_RESULT_AREA_TOO_SMALL;
    run->probes = probes;
    run->iterations = iterations;
    return VMM_STATUS_OK;
}

uint32_t vmm_samples_that_fit(const struct vmm_run *run, uint32_t probes) {
    uint64_t capacity = run->config->result_capacity;
    if (probes == 0 || capacity < sizeof(struct vmm_result_header))
        return 0;
    uint64_t fit = (capacity - sizeof(struct vmm_result_header)) / (bits(probes) * bytes_per_sample(run));
    return fit > 0xffffffffu ? 0xffffffffu : (uint32_t)fit;
}

/* abi::counter::LOOP_CODE (guest-payload/src/abi.rs), the same 45 bytes: in its own
 * section, so the guest build (which never runs it: the VMM puts those bytes on the
 * counter vCPU) drops it at link time. */
_Static_assert(offsetof(struct vmm_counter_block, stamp_request) == 0x40, "LOOP_CODE reads stamp_request at 0x40");
_Static_assert(offsetof(struct vmm_counter_block, stamp) == 0x80, "LOOP_CODE writes stamp at 0x80");
_Static_assert(VMM_COUNTER_STOP == 2, "LOOP_CODE compares with 2");
__asm__(".pushsection .text.vmm_counter_loop,\"ax\",@progbits\n"
        ".globl vmm_counter_loop\n"
        ".type vmm_counter_loop, @function\n"
        "vmm_counter_loop:\n"
        "1:\n\t"
        "incq (%rdi)\n\t"           /* counter += 1 */
        "movq 0x40(%rdi), %rax\n\t" /* stamp_request */
        "testq %rax, %rax\n\t"
        "je 1b\n\t"
        "cmpq $2, %rax\n\t" /* VMM_COUNTER_STOP */
        "je 2f\n\t"
        "rdtsc\n\t"
        "shlq $32, %rdx\n\t"
        "orq %rdx, %rax\n\t"
        "movq %rax, 0x80(%rdi)\n\t" /* stamp */
        "movq $0, 0x40(%rdi)\n\t"   /* answered */
        "jmp 1b\n"
        "2:\n\t"
        "ret\n"
        ".size vmm_counter_loop, . - vmm_counter_loop\n"
        ".popsection\n");

int64_t *vmm_samples(struct vmm_run *run, unsigned probe) {
    static const unsigned order[] = VMM_PROBE_ORDER;
    if (probe >= 32 || !(run->probes & (1u << probe)))
        return 0;
    uint64_t before = 0;
    for (unsigned i = 0; i < VMM_PROBE_COUNT && order[i] != probe; i++)
        if (run->probes & (1u << order[i]))
            before++;
    return (int64_t *)((char *)run->result + sizeof(struct vmm_result_header)) + before * run->iterations;
}

int vmm_run_detector(struct vmm_run *run) {
    struct vmm_result_header *result = run->result;
    result->verdict = VMM_VERDICT_NONE;
    result->tsc_start = vmm_rdtsc_fenced();
    int status = vmm_detect(run);
    result->tsc_end = vmm_rdtsc_fenced();
    result->abi_version = VMM_ABI_VERSION;
    result->status = (uint32_t)status;
    result->iterations = run->iterations;
    result->probes = run->probes;
    if (status == VMM_STATUS_OK) {
        /* The magic goes in last: the VMM never takes a half-written block for a whole. */
        __asm__ volatile("" : : : "memory");
        result->magic = VMM_RESULT_MAGIC;
    }
    return status;
}

void vmm_verdict(struct vmm_run *run, enum vmm_verdict verdict, int64_t score_milli, const char *reason) {
    run->result->verdict = verdict;
    run->result->score_milli = score_milli;
    unsigned i = 0;
    for (; reason && reason[i] && i < VMM_REASON_BYTES - 1; i++)
        run->result->reason[i] = reason[i];
    for (; i < VMM_REASON_BYTES; i++)
        run->result->reason[i] = 0;
}

static void cpuid_instruction(uint32_t leaf, uint32_t subleaf, uint32_t regs[4]) {
    __asm__ volatile("cpuid" : "=a"(regs[0]), "=b"(regs[1]), "=c"(regs[2]), "=d"(regs[3]) : "a"(leaf), "c"(subleaf));
}

void vmm_cpuid(const struct vmm_run *run, uint32_t leaf, uint32_t subleaf, uint32_t regs[4]) {
#ifdef VMM_GUEST
    if (run->config->flags & VMM_FLAG_PARAVIRT_CPUID) {
        __asm__ volatile("out %%eax, %%dx"
                         : "=a"(regs[0]), "=b"(regs[1]), "=c"(regs[2]), "=d"(regs[3])
                         : "a"(leaf), "c"(subleaf), "d"((uint32_t)VMM_PORT_HYPERCALL));
        return;
    }
#else
    (void)run;
#endif
    cpuid_instruction(leaf, subleaf, regs);
}

int vmm_has_rdtscp(const struct vmm_run *run) {
    uint32_t regs[4];
    vmm_cpuid(run, 0x80000001u, 0, regs);
    return (regs[3] & (1u << 27)) != 0;
}

int vmm_spin_ms(const struct vmm_run *run, uint32_t ms) {
    uint64_t khz = run->config->tsc_khz;
    if (khz == 0)
        return 0;
    uint64_t end = vmm_rdtsc() + khz * ms;
    while (vmm_rdtsc() < end)
        __asm__ volatile("pause");
    return 1;
}

int vmm_sleep_ms(const struct vmm_run *run, uint32_t ms) {
#ifdef VMM_GUEST
    return vmm_spin_ms(run, ms);
#else
    (void)run;
    struct timespec left = {ms / 1000, (long)(ms % 1000) * 1000000L};
    int slept;
    while ((slept = nanosleep(&left, &left)) != 0 && errno == EINTR)
        ;
    return slept == 0;
#endif
}

void vmm_print(const char *text) {
#ifdef VMM_GUEST
    for (; *text; text++)
        outb(VMM_PORT_CONSOLE, (uint8_t)*text);
#else
    fputs(text, stderr);
#endif
}

void vmm_format_u64(char *out, uint64_t value) {
    char digits[21];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n)
        *out++ = digits[--n];
    *out = 0;
}

void vmm_text_add(struct vmm_text *line, const char *piece) {
    for (; piece && *piece && line->length < VMM_REASON_BYTES - 1; piece++)
        line->text[line->length++] = *piece;
    line->text[line->length] = 0;
}

void vmm_text_add_u64(struct vmm_text *line, uint64_t value) {
    char digits[21];
    vmm_format_u64(digits, value);
    vmm_text_add(line, digits);
}

#ifdef VMM_GUEST
/* What a freestanding compiler may emit calls to. */
void *memcpy(void *dest, const void *src, size_t n) {
    __asm__ volatile("rep movsb" : "+D"(dest), "+S"(src), "+c"(n) : : "memory");
    return dest;
}
void *memset(void *dest, int value, size_t n) {
    void *d = dest;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(value) : "memory");
    return dest;
}
#endif
