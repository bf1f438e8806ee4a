/* The SDK's helpers, compiled into both builds (VMM_GUEST set for the guest). */
#include "vmm_sdk.h"

#ifdef VMM_GUEST
static inline void outb(uint16_t port, uint8_t value) {
    __asm__ volatile("out %0, %1" : : "a"(value), "Nd"(port));
}
static inline uint32_t inl(uint16_t port) {
    uint32_t value;
    __asm__ volatile("in %1, %0" : "=a"(value) : "Nd"(port));
    return value;
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

#ifdef VMM_GUEST
/* The SDK's IDT: the 32 exception vectors, 64-bit interrupt gates. */
struct vmm_gate {
    uint16_t offset_low, selector;
    uint8_t ist, type;
    uint16_t offset_mid;
    uint32_t offset_high, zero;
} __attribute__((packed));
static struct vmm_gate vmm_idt[32] __attribute__((aligned(16)));

void vmm_idt_set(unsigned vector, void (*entry)(void)) {
    if (vector >= 32)
        return;
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    uint64_t at = (uint64_t)entry;
    vmm_idt[vector] = (struct vmm_gate){(uint16_t)at, cs, 0, 0x8e, (uint16_t)(at >> 16), (uint32_t)(at >> 32), 0};
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = {sizeof vmm_idt - 1, (uint64_t)vmm_idt};
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}
#endif

void vmm_sort_u64(uint64_t *values, unsigned n) {
    for (unsigned i = 1; i < n; i++) {
        uint64_t x = values[i];
        unsigned j = i;
        for (; j > 0 && values[j - 1] > x; j--)
            values[j] = values[j - 1];
        values[j] = x;
    }
}

uint64_t vmm_interquartile_mean(uint64_t *values, unsigned n) {
    if (n == 0)
        return 0;
    if (n == 1)
        return values[0];
    vmm_sort_u64(values, n);
    unsigned lo = n / 4, hi = (3 * n) / 4;
    if (hi == lo)
        return values[n / 2];
    uint64_t sum = 0;
    for (unsigned i = lo; i < hi; i++)
        sum += values[i];
    uint64_t count = hi - lo;
    return (2 * sum + count) / (2 * count);
}

uint64_t vmm_mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

/* Count bits by hand: the SDK's own code needs nothing from libgcc. */
static unsigned bits(uint32_t mask) {
    unsigned n = 0;
    for (; mask; mask &= mask - 1)
        n++;
    return n;
}

/* Bytes per sample of one probe: a TSC sample, and room for its tick count too in a run
 * with a counter (the VMM reads ticks only where the header's `ticks` says so, but a
 * payload may say so after vmm_begin, with vmm_ticks()). */
static uint64_t bytes_per_sample(const struct vmm_run *run) {
    return (run->config->counter_addr != 0 || run->result->ticks != 0 ? 2 : 1) * sizeof(int64_t);
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

int64_t *vmm_ticks(struct vmm_run *run, unsigned probe) {
    int64_t *samples = vmm_samples(run, probe);
    if (!samples || run->config->counter_addr == 0)
        return 0;
    run->result->ticks = 1;
    /* After every probe's TSC samples, in the same order (ResultHeader::tick_offset). */
    return samples + (uint64_t)bits(run->probes) * run->iterations;
}

/* Calls vmm_detect(run) with RBX, RBP and R12-R15 saved on the stack and restored after,
 * whatever the detector did to them: an asm statement that clobbers registers it does not
 * declare (pafish's `cpuid` names no outputs) must not take the SDK down with it. The
 * stack stays 16-byte aligned at the call, as the System V ABI demands (SSE code relies
 * on it). */
int vmm_call_detector(struct vmm_run *run);
__asm__(".pushsection .text.vmm_call_detector,\"ax\",@progbits\n"
        ".globl vmm_call_detector\n"
        ".type vmm_call_detector, @function\n"
        "vmm_call_detector:\n\t"
        "pushq %rbx\n\t"
        "pushq %rbp\n\t"
        "pushq %r12\n\t"
        "pushq %r13\n\t"
        "pushq %r14\n\t"
        "pushq %r15\n\t"
        "subq $8, %rsp\n\t" /* entry: RSP = 8 mod 16; 6 pushes and 8: 0 mod 16 */
        "call vmm_detect\n\t"
        "addq $8, %rsp\n\t"
        "popq %r15\n\t"
        "popq %r14\n\t"
        "popq %r13\n\t"
        "popq %r12\n\t"
        "popq %rbp\n\t"
        "popq %rbx\n\t"
        "ret\n"
        ".size vmm_call_detector, . - vmm_call_detector\n"
        ".popsection\n");

int vmm_run_detector(struct vmm_run *run) {
    struct vmm_result_header *result = run->result;
    result->verdict = VMM_VERDICT_NONE;
    result->ticks = 0;
    result->tsc_start = vmm_rdtsc_fenced();
    int status = vmm_call_detector(run);
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

uint32_t vmm_pm_timer(void) {
#ifdef VMM_GUEST
    return inl(VMM_PORT_PM_TIMER);
#else
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    /* ns * HZ / 1e9, split so that it cannot overflow in 64 bits. */
    uint64_t ticks = (uint64_t)now.tv_sec * VMM_PM_TIMER_HZ +
                     (uint64_t)now.tv_nsec * VMM_PM_TIMER_HZ / 1000000000ull;
    return (uint32_t)ticks;
#endif
}

void vmm_wall_wait_ms(uint32_t ms) {
#ifdef VMM_GUEST
    /* Differences of a 32-bit count, so a wrap of the timer (every ~20 minutes) is no step. */
    uint64_t want = (uint64_t)ms * VMM_PM_TIMER_HZ / 1000, waited = 0;
    uint32_t last = vmm_pm_timer();
    while (waited < want) {
        uint32_t now = vmm_pm_timer();
        waited += (uint32_t)(now - last);
        last = now;
    }
#else
    struct timespec left = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&left, &left) != 0 && errno == EINTR)
        ;
#endif
}

void vmm_print(const char *text) {
    char last = 0;
#ifdef VMM_GUEST
    for (; text && *text; text++)
        outb(VMM_PORT_CONSOLE, (uint8_t)(last = *text));
    if (last != '\n')
        outb(VMM_PORT_CONSOLE, '\n');
#else
    if (text && *text) {
        fputs(text, stderr);
        last = text[strlen(text) - 1];
    }
    if (last != '\n')
        fputc('\n', stderr);
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
    void *d = dest;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dest;
}
void *memmove(void *dest, const void *src, size_t n) {
    unsigned char *d = (unsigned char *)dest;
    const unsigned char *s = (const unsigned char *)src;
    if (d <= s || d >= s + n)
        return memcpy(dest, src, n);
    /* Overlapping, destination above: copy backwards. */
    unsigned char *d_last = d + n - 1;
    const unsigned char *s_last = s + n - 1;
    __asm__ volatile("std\n\trep movsb\n\tcld" : "+D"(d_last), "+S"(s_last), "+c"(n) : : "memory");
    return dest;
}
void *memset(void *dest, int value, size_t n) {
    void *d = dest;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(value) : "memory");
    return dest;
}
int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

/* 128-bit division for `__int128` code (`__divti3` and friends). libgcc has them too (the
 * guest links with -lgcc, after these), but its `__umodti3` moves through SSE registers,
 * which an emulating KVM cannot run: these use general registers only. Divide by zero
 * faults (#DE), as libgcc's does. */
typedef unsigned __int128 vmm_u128;
static uint64_t div_128_by_64(uint64_t high, uint64_t low, uint64_t divisor, uint64_t *remainder) {
    uint64_t quotient;
    __asm__("divq %[d]" : "=a"(quotient), "=d"(*remainder) : [d] "rm"(divisor), "a"(low), "d"(high));
    return quotient;
}
static vmm_u128 udivmod_128(vmm_u128 n, vmm_u128 d, vmm_u128 *remainder) {
    uint64_t n_high = (uint64_t)(n >> 64), n_low = (uint64_t)n;
    uint64_t d_high = (uint64_t)(d >> 64), d_low = (uint64_t)d;
    if (d_high == 0) {
        /* Two 128-by-64 divisions, each quotient fits 64 bits (a zero divisor faults). */
        uint64_t r_high, r;
        uint64_t q_high = n_high < d_low ? (r_high = n_high, 0) : div_128_by_64(0, n_high, d_low, &r_high);
        uint64_t q_low = div_128_by_64(r_high, n_low, d_low, &r);
        if (remainder)
            *remainder = r;
        return ((vmm_u128)q_high << 64) | q_low;
    }
    /* A divisor of 2^64 or more: the quotient fits 64 bits. Estimate it from the divisor's
     * normalised top 64 bits (Hacker's Delight, divlu2), then correct by one. */
    unsigned shift = (unsigned)__builtin_clzll(d_high);
    uint64_t top = (uint64_t)((d << shift) >> 64);
    vmm_u128 half = n >> 1;
    uint64_t unused;
    uint64_t q = div_128_by_64((uint64_t)(half >> 64), (uint64_t)half, top, &unused);
    q = (uint64_t)(((vmm_u128)q << shift) >> 63);
    if (q != 0)
        q--;
    vmm_u128 r = n - (vmm_u128)q * d;
    if (r >= d) {
        q++;
        r -= d;
    }
    if (remainder)
        *remainder = r;
    return q;
}
vmm_u128 __udivti3(vmm_u128 n, vmm_u128 d);
vmm_u128 __umodti3(vmm_u128 n, vmm_u128 d);
__int128 __divti3(__int128 n, __int128 d);
__int128 __modti3(__int128 n, __int128 d);
vmm_u128 __udivmodti4(vmm_u128 n, vmm_u128 d, vmm_u128 *remainder);
vmm_u128 __udivti3(vmm_u128 n, vmm_u128 d) {
    return udivmod_128(n, d, 0);
}
vmm_u128 __umodti3(vmm_u128 n, vmm_u128 d) {
    vmm_u128 r;
    udivmod_128(n, d, &r);
    return r;
}
vmm_u128 __udivmodti4(vmm_u128 n, vmm_u128 d, vmm_u128 *remainder) {
    return udivmod_128(n, d, remainder);
}
/* Signed: on magnitudes, the quotient negative when the signs differ, the remainder with
 * the dividend's sign (C's truncating division). */
static vmm_u128 magnitude(__int128 v) {
    return v < 0 ? -(vmm_u128)v : (vmm_u128)v;
}
__int128 __divti3(__int128 n, __int128 d) {
    vmm_u128 q = udivmod_128(magnitude(n), magnitude(d), 0);
    return (__int128)((n < 0) != (d < 0) ? -q : q);
}
__int128 __modti3(__int128 n, __int128 d) {
    vmm_u128 r;
    udivmod_128(magnitude(n), magnitude(d), &r);
    return (__int128)(n < 0 ? -r : r);
}

/* C++ runtime hooks a freestanding C++ payload may reference (there is no libstdc++ in
 * the guest): static destructors are registered and never run (a guest never returns
 * from _start), a pure virtual call stops the guest, delete of what was never newed does
 * nothing (there is no operator new: a payload that allocates fails to link). */
void *__dso_handle = 0;
int __cxa_atexit(void (*destructor)(void *), void *object, void *dso);
int __cxa_atexit(void (*destructor)(void *), void *object, void *dso) {
    (void)destructor;
    (void)object;
    (void)dso;
    return 0;
}
void __cxa_pure_virtual(void);
void __cxa_pure_virtual(void) {
    for (;;)
        __asm__ volatile("ud2");
}
void _ZdlPv(void *p);
void _ZdlPvm(void *p, size_t n);
void _ZdlPv(void *p) {
    (void)p;
}
void _ZdlPvm(void *p, size_t n) {
    (void)p;
    (void)n;
}
#endif
