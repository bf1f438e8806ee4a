/* The floor of VM setup: a minimal C program making the calls any VMM must make to run
 * a long-mode-free guest once (4 MiB of RAM, one vCPU, KVM_SET_CPUID2, sregs, regs, and
 * the first KVM_RUN, of a guest that is one `hlt`), timed from KVM_CREATE_VM to KVM_RUN's
 * return. The launch bench builds it with `cc -O2` and compares vmm's setup with it.
 *
 * Usage: bare_vm N   prints N setup times in microseconds, one a line. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM (4u << 20)

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    int runs = argc > 1 ? atoi(argv[1]) : 100;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("/dev/kvm"); return 1; }
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = 256;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) { perror("KVM_GET_SUPPORTED_CPUID"); return 1; }
    for (int i = 0; i < runs; i++) {
        double start = now_us();
        int vm = ioctl(kvm, KVM_CREATE_VM, 0);
        uint8_t *mem = mmap(NULL, RAM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        mem[0x1000] = 0xf4; /* hlt */
        struct kvm_userspace_memory_region region = {
            .slot = 0, .guest_phys_addr = 0, .memory_size = RAM, .userspace_addr = (uint64_t)mem};
        if (vm < 0 || mem == MAP_FAILED || ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) { perror("vm"); return 1; }
        int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
        struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
        if (vcpu < 0 || run == MAP_FAILED || ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) { perror("vcpu"); return 1; }
        struct kvm_sregs sregs;
        ioctl(vcpu, KVM_GET_SREGS, &sregs);
        sregs.cs.base = 0; sregs.cs.selector = 0;
        ioctl(vcpu, KVM_SET_SREGS, &sregs);
        struct kvm_regs regs = {.rip = 0x1000, .rflags = 2};
        ioctl(vcpu, KVM_SET_REGS, &regs);
        if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_HLT) {
            fprintf(stderr, "KVM_RUN: exit %u\n", run->exit_reason);
            return 1;
        }
        double setup = now_us() - start;
        munmap(run, run_size);
        close(vcpu);
        close(vm);
        munmap(mem, RAM);
        printf("%.1f\n", setup);
    }
    return 0;
}
