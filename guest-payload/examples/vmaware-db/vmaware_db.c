/* VMAware's #DB-interception check, in its spirit, on this testbed.
 *
 * NotRequiem/VMAware 754187b, src/vmaware.hpp L6884-7272 (added in 700f377, "feat: added
 * nested vmexit timing checks"; 754187b fixed the ratio's direction to db/api). Per trial,
 * up to a batch of valid samples: a trap-flag single step (`pushf; or [rsp], 0x100; popf;
 * nop`, L6915-6949: the CPU raises #DB after the nop, the handler clears TF) timed against
 * the same exception raised by software (`ZwRaiseException` with EXCEPTION_SINGLE_STEP,
 * L6952-7021, caught by the same kind of handler). A sample is valid when both deltas are
 * positive. Statistic: the interquartile mean of each trial (calculate_latency, as TIMER
 * uses it: vmm_interquartile_mean), the minimum over 5 trials,
 * for each side; `db / api >= 4.0` is a hypervisor that intercepts #DB (L7265-7272); no
 * valid sample at all is an invalid measurement, which the original also calls a VM
 * (L7247).
 *
 * Why it works: a hypervisor that owns the debug registers (a debugger attached to the
 * guest, or this VMM's `--trap hw-breakpoint`, which arms DR0-DR3 on the CPUID sites)
 * intercepts every #DB to see whether it is its own, and reflects the guest's back: each
 * single step pays a VM exit, while the software-raised exception never leaves the guest.
 *
 * What differs here, and why: the original times with its counter thread (no TSC); this
 * times with RDTSC, as the SDK's other examples do. In the guest (ring 0) the payload
 * loads its own IDT (vmm_idt_set), with one gate for vector 1: the single step arrives
 * there as #DB, and the software side enters the same handler through a frame built by
 * hand (no exception, so no hypervisor sees it). The native twin (ring 3) catches SIGTRAP: the single step
 * arrives as #DB through the host kernel, the software side is raise(SIGTRAP), a signal
 * the kernel delivers to the same handler, as ZwRaiseException is dispatched by Windows.
 * The batch is a fixed 500 (the original draws 500-1000). */
#ifndef VMM_GUEST
#define _GNU_SOURCE /* REG_EFL */
#endif
#include "vmm_sdk.h"

#ifndef VMM_GUEST
#include <signal.h>
#include <string.h>
#include <ucontext.h>
#endif

VMM_PAYLOAD("vmaware #DB (754187b)", VMM_CAP_VERDICT | VMM_CAP_PARAVIRT_CPUID);

#define TRIALS 5
#define BATCH 500
#define MAX_INVALID 5000
#define THRESHOLD_MILLI 4000 /* db / api >= 4.0 */

static volatile uint64_t db_hits;

#ifdef VMM_GUEST
/* #DB: count it, clear TF in the frame the CPU pushed (RIP, CS, RFLAGS, RSP, SS), return.
 * The same handler for the single step and for the software-raised side. */
void db_entry(void);
__asm__(".text\n.globl db_entry\ndb_entry:\n"
        "  lock incq db_hits(%rip)\n"
        "  andq $~0x100, 16(%rsp)\n"
        "  iretq\n");

static void load_idt(void) {
    vmm_idt_set(1, db_entry);
}

/* The exception raised by software: the frame the CPU would push (SS, RSP, RFLAGS, CS,
 * RIP) built by hand and the same handler entered, as Windows' dispatcher runs a handler
 * for ZwRaiseException with no hardware exception. Not `int 1`: an emulating KVM cannot
 * run INT n in long mode (an emulation failure), and a hardware one would not intercept
 * it either way. The payload builds with -mno-red-zone: the pushes clobber nothing. */
static void raise_by_software(void) {
    __asm__ volatile("movq %%rsp, %%rax\n"
                     "movl %%ss, %%ecx\n"
                     "pushq %%rcx\n"
                     "pushq %%rax\n"
                     "pushfq\n"
                     "movl %%cs, %%ecx\n"
                     "pushq %%rcx\n"
                     "leaq 1f(%%rip), %%rcx\n"
                     "pushq %%rcx\n"
                     "jmp db_entry\n"
                     "1:\n"
                     :
                     :
                     : "rax", "rcx", "cc", "memory");
}
#else
static void on_trap(int signal, siginfo_t *info, void *context) {
    (void)signal;
    (void)info;
    db_hits++;
    ((ucontext_t *)context)->uc_mcontext.gregs[REG_EFL] &= ~0x100ll;
}

static void load_idt(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_trap;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &action, 0);
}

static void raise_by_software(void) {
    raise(SIGTRAP);
}
#endif

/* VMAware's execute_db: TF set by popf, #DB after the nop. */
static void single_step(void) {
    __asm__ volatile("pushfq; orq $0x100, (%%rsp); popfq; nop" : : : "cc", "memory");
}

int vmm_detect(struct vmm_run *run) {
    static uint64_t db[BATCH], api[BATCH];
    uint64_t best_db = UINT64_MAX, best_api = UINT64_MAX;
    unsigned valid_trials = 0;
    load_idt();
    for (int trial = 0; trial < TRIALS; trial++) {
        unsigned valid = 0, invalid = 0;
        while (valid < BATCH && invalid < MAX_INVALID) {
            /* The original runs this inside TIMER's trials, after its CPUID batch: one
             * CPUID(0) per sample, outside the windows, stands for that batch (and gives a
             * VMM that traps CPUID a site to trap). */
            uint32_t regs[4];
            vmm_cpuid(run, 0, 0, regs);
            uint64_t hits = db_hits;
            uint64_t start = vmm_rdtsc_fenced();
            single_step();
            uint64_t middle = vmm_rdtsc_fenced();
            raise_by_software();
            uint64_t end = vmm_rdtsc_fenced();
            /* Valid: both deltas positive, and both exceptions arrived. */
            if (middle > start && end > middle && db_hits == hits + 2) {
                db[valid] = middle - start;
                api[valid] = end - middle;
                valid++;
            } else {
                invalid++;
            }
        }
        if (valid == 0)
            continue;
        valid_trials++;
        uint64_t d = vmm_interquartile_mean(db, valid), a = vmm_interquartile_mean(api, valid);
        if (d < best_db)
            best_db = d;
        if (a < best_api)
            best_api = a;
    }
    struct vmm_text reason = {{0}, 0};
    if (valid_trials == 0) {
        vmm_text_add(&reason, "no valid #DB sample in any trial (invalid measurement: VM)");
        vmm_print(reason.text);
        vmm_verdict(run, VMM_VERDICT_VIRTUAL, 0, reason.text);
        return VMM_STATUS_OK;
    }
    uint64_t ratio_milli = best_api ? best_db * 1000 / best_api : 0;
    vmm_text_add(&reason, "single-step #DB ");
    vmm_text_add_u64(&reason, best_db);
    vmm_text_add(&reason, " vs software-raised ");
    vmm_text_add_u64(&reason, best_api);
    vmm_text_add(&reason, " cycles (IQM, min of 5): ratio ");
    vmm_text_add_u64(&reason, ratio_milli / 1000);
    vmm_text_add(&reason, ".");
    vmm_text_add_u64(&reason, ratio_milli % 1000 / 100);
    vmm_text_add_u64(&reason, ratio_milli % 100 / 10);
    vmm_text_add(&reason, ratio_milli >= THRESHOLD_MILLI ? " >= 4.0" : " < 4.0");
    vmm_print(reason.text);
    vmm_verdict(run, ratio_milli >= THRESHOLD_MILLI ? VMM_VERDICT_VIRTUAL : VMM_VERDICT_NATIVE, (int64_t)ratio_milli,
                reason.text);
    return VMM_STATUS_OK;
}
