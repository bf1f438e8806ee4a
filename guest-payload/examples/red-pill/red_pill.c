/* Sensitive but unprivileged: the instructions that broke pure trap-and-emulate on x86.
 *
 * Popek and Goldberg (1974): a VMM can be built by trap-and-emulate alone when every
 * sensitive instruction (one that reads or changes the machine's control state) is
 * privileged (traps outside the most privileged mode). Classic x86 has sensitive
 * instructions that do not trap (Robin & Irvine, 2000): SGDT, SIDT, SLDT and STR store
 * the descriptor-table and task registers, SMSW stores CR0's low bits, and POPF outside
 * ring 0 silently leaves IF alone instead of faulting. A guest kernel deprivileged to
 * ring 1 or 3 sees the host's tables and loses its interrupt-flag writes, unnoticed.
 * Joanna Rutkowska's "red pill" (2004) read SIDT: a VM's IDT lived elsewhere.
 *
 * Two things ended it: hardware virtualisation (VT-x, AMD-V: the guest kernel runs in
 * ring 0 of its own mode with its own IDTR, GDTR, LDTR, TR and CR0, so these read the
 * guest's own state) and UMIP (CR4.UMIP: the five faults at CPL > 0; Linux emulates
 * SGDT, SIDT and SMSW for old programs with fixed dummy values and sends SIGSEGV for SLDT
 * and STR).
 *
 * This payload executes each once for its value and 101 times for its cost (median of
 * `lfence; rdtsc; <insn>; lfence; rdtsc`), beside CPUID (which always exits under
 * hardware virtualisation) and an empty window (the floor). In the guest it runs in ring
 * 0: the values are the VM's own tables (the VMM's GDT, no IDT, no LDT). The native twin
 * runs in ring 3: where UMIP is on, each of the five traps to the host kernel, and the
 * cost says so. Details go to the console (`vmm run --console`; the twin's stderr), the
 * values in short to the verdict's reason line. The verdict is Rutkowska's own test
 * (IDT base above 0xd0000000: a VM), which means nothing on 64-bit: it is reported as
 * unsure, saying so. */
#include "vmm_sdk.h"

#ifndef VMM_GUEST
#include <setjmp.h>
#include <signal.h>
#include <string.h>
static sigjmp_buf fault_jump;
static void on_fault(int signal) {
    siglongjmp(fault_jump, signal);
}
#endif

VMM_PAYLOAD("red pill (sidt sgdt sldt..)", VMM_CAP_VERDICT | VMM_CAP_PARAVIRT_CPUID);

#define TRIES 101

enum insn { SIDT, SGDT, SLDT, STR, SMSW, CPUID, FLOOR, INSNS };
static const char *const NAMES[INSNS] = {"sidt", "sgdt", "sldt", "str", "smsw", "cpuid", "floor"};

struct table_register {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

/* Executes `which` once between two fenced timestamps; its value to *value. */
static uint64_t timed(const struct vmm_run *run, enum insn which, uint64_t *value) {
    struct table_register table = {0, 0};
    uint64_t word = 0, start, end;
    uint32_t regs[4];
    start = vmm_rdtsc_fenced();
    switch (which) {
    case SIDT:
        __asm__ volatile("sidt %0" : "=m"(table));
        break;
    case SGDT:
        __asm__ volatile("sgdt %0" : "=m"(table));
        break;
    case SLDT:
        __asm__ volatile("sldt %0" : "+r"(word)); /* +r: bits a 16-bit store leaves stay 0 */
        break;
    case STR:
        __asm__ volatile("str %0" : "+r"(word));
        break;
    case SMSW:
        __asm__ volatile("smsw %0" : "+r"(word));
        break;
    case CPUID:
        vmm_cpuid(run, 0, 0, regs);
        word = regs[0];
        break;
    default:
        break;
    }
    end = vmm_rdtsc_fenced();
    *value = (which == SIDT || which == SGDT) ? table.base : word;
    return end - start;
}

static uint64_t median(uint64_t *samples, unsigned n) {
    vmm_sort_u64(samples, n);
    return samples[n / 2];
}

static void add_hex(struct vmm_text *line, uint64_t value) {
    char digits[17];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[value & 0xf];
        value >>= 4;
    } while (value && n < 16);
    char text[19] = "0x";
    for (int i = 0; i < n; i++)
        text[2 + i] = digits[n - 1 - i];
    text[2 + n] = 0;
    vmm_text_add(line, text);
}

/* 1 if the instruction faulted (the native twin under UMIP without emulation). */
static int measure(const struct vmm_run *run, enum insn which, uint64_t *value, uint64_t *cost) {
    static uint64_t samples[TRIES];
#ifndef VMM_GUEST
    struct sigaction action, old_segv, old_ill;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_fault;
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGILL, &action, &old_ill);
    int faulted = sigsetjmp(fault_jump, 1) != 0;
    if (!faulted) {
#endif
        timed(run, which, value);
        for (int i = 0; i < TRIES; i++) {
            uint64_t ignored;
            samples[i] = timed(run, which, &ignored);
        }
        *cost = median(samples, TRIES);
#ifndef VMM_GUEST
    }
    sigaction(SIGSEGV, &old_segv, 0);
    sigaction(SIGILL, &old_ill, 0);
    return faulted;
#else
    return 0;
#endif
}

/* POPF with IF flipped, read back by PUSHF, the flags restored: 1 if IF changed. At
 * CPL 0 it does; at CPL 3 (IOPL 0) POPF leaves IF as it was, without a fault. */
static int popf_changes_if(uint64_t *before) {
    uint64_t flags, after;
    __asm__ volatile("pushfq; popq %0" : "=r"(flags));
    uint64_t flipped = flags ^ (1ull << 9);
    __asm__ volatile("pushq %1; popfq; pushfq; popq %0; pushq %2; popfq"
                     : "=&r"(after)
                     : "r"(flipped), "r"(flags)
                     : "cc", "memory");
    *before = flags;
    return ((after ^ flags) >> 9) & 1;
}

int vmm_detect(struct vmm_run *run) {
    uint64_t value[INSNS] = {0}, cost[INSNS] = {0};
    int faulted[INSNS] = {0};
    for (int i = 0; i < INSNS; i++)
        faulted[i] = measure(run, (enum insn)i, &value[i], &cost[i]);
    uint64_t flags;
    int popf = popf_changes_if(&flags);

    vmm_print(vmm_in_guest() ? "red pill, in the guest (ring 0):" : "red pill, natively (ring 3):");
    for (int i = 0; i < INSNS; i++) {
        struct vmm_text line = {{0}, 0};
        vmm_text_add(&line, "  ");
        vmm_text_add(&line, NAMES[i]);
        if (faulted[i]) {
            vmm_text_add(&line, ": faulted (SIGSEGV/SIGILL: UMIP on, and this kernel does not emulate it)");
        } else {
            if (i != FLOOR) {
                vmm_text_add(&line, i == SIDT || i == SGDT ? ": base " : ": value ");
                add_hex(&line, value[i]);
            }
            vmm_text_add(&line, ", median ");
            vmm_text_add_u64(&line, cost[i]);
            vmm_text_add(&line, " cycles");
        }
        vmm_print(line.text);
    }
    {
        struct vmm_text line = {{0}, 0};
        vmm_text_add(&line, "  popf: IF ");
        vmm_text_add(&line, (flags >> 9) & 1 ? "was 1, " : "was 0, ");
        vmm_text_add(&line, popf ? "changed by popf" : "NOT changed by popf, and no fault (IOPL < CPL)");
        vmm_print(line.text);
    }

    /* The reason line: the values in short (120 bytes). */
    struct vmm_text reason = {{0}, 0};
    const enum insn shown[] = {SIDT, SGDT, SLDT, STR, SMSW};
    for (unsigned k = 0; k < sizeof shown / sizeof shown[0]; k++) {
        enum insn i = shown[k];
        vmm_text_add(&reason, NAMES[i]);
        vmm_text_add(&reason, " ");
        if (faulted[i])
            vmm_text_add(&reason, "fault");
        else
            add_hex(&reason, value[i]);
        vmm_text_add(&reason, " ");
    }
    vmm_text_add(&reason, popf ? "popf-if ok" : "popf-if dropped");
    vmm_verdict(run, VMM_VERDICT_UNSURE, 0, reason.text);
    return VMM_STATUS_OK;
}
