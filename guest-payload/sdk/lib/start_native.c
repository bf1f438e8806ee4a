/* The native twin's entry point: the same detector as a Linux program. `vmm run --mode
 * native --payload X.elf` runs X.native pinned to one CPU as
 *     X.native CONFIG_FILE RESULT_FILE
 * with the config block the guest would get; the twin writes the result block the guest
 * would write (header and samples) to RESULT_FILE.
 *
 * Where the config names a counter (`counter_addr` != 0: `vmm run --vcpus 2`), the twin
 * is its own counter vCPU: a thread on another CPU runs vmm_counter_loop (the bytes of
 * abi::counter::LOOP_CODE that the VMM runs on a guest's counter vCPU) on a block of its
 * own, whose address replaces `counter_addr` for the detector. */
#define _GNU_SOURCE
#include "vmm_sdk.h"
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The largest result area a twin allocates, whatever the config says. */
#define MAX_RESULT_BYTES (1ull << 30)

struct counter {
    struct vmm_counter_block *block;
    pthread_t thread;
    int cpu, measuring_cpu;
};

static void *counter_thread(void *block) {
    vmm_counter_loop(block);
    return NULL;
}

/* Starts the counter thread on a CPU other than this process's. The VMM pins the twin to
 * one CPU before exec; run by hand (more CPUs allowed), the twin first pins itself to
 * the lowest of them, as the VMM would. Returns 0, or prints why not and returns -1. */
static int start_counter(const char *self, struct counter *counter) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online < 2) {
        fprintf(stderr, "%s: the run has a counter (--vcpus 2), and its thread needs a CPU besides the measuring one: %ld online\n",
                self, online);
        return -1;
    }
    cpu_set_t mine;
    CPU_ZERO(&mine);
    if (sched_getaffinity(0, sizeof mine, &mine) != 0 || CPU_COUNT(&mine) == 0) {
        fprintf(stderr, "%s: cannot read this process's CPU affinity: %s\n", self, strerror(errno));
        return -1;
    }
    int measuring = 0;
    while (!CPU_ISSET(measuring, &mine))
        measuring++;
    if (CPU_COUNT(&mine) > 1) {
        CPU_ZERO(&mine);
        CPU_SET(measuring, &mine);
        if (sched_setaffinity(0, sizeof mine, &mine) != 0) {
            fprintf(stderr, "%s: cannot pin the measuring thread to CPU %d: %s\n", self, measuring, strerror(errno));
            return -1;
        }
    }
    counter->block = aligned_alloc(64, sizeof *counter->block);
    if (!counter->block) {
        fprintf(stderr, "%s: out of memory\n", self);
        return -1;
    }
    memset(counter->block, 0, sizeof *counter->block);
    counter->measuring_cpu = measuring;
    /* The first CPU besides the measuring one that this process may run on (a CPU that is
     * offline or outside its cpuset is refused with EINVAL: the next is tried). */
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (cpu == measuring)
            continue;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pthread_attr_t attr;
        if (pthread_attr_init(&attr) != 0)
            break;
        int error = pthread_attr_setaffinity_np(&attr, sizeof set, &set);
        if (error == 0)
            error = pthread_create(&counter->thread, &attr, counter_thread, counter->block);
        pthread_attr_destroy(&attr);
        if (error == 0) {
            counter->cpu = cpu;
            return 0;
        }
        if (error != EINVAL) {
            fprintf(stderr, "%s: cannot start the counter thread on CPU %d: %s\n", self, cpu, strerror(error));
            free(counter->block);
            return -1;
        }
    }
    fprintf(stderr, "%s: the run has a counter (--vcpus 2), and no CPU besides %d (the measuring one) will take its thread\n",
            self, measuring);
    free(counter->block);
    return -1;
}

/* Asks the loop to return and waits for it. A detector that gave up on a stamp leaves a
 * request pending, which the loop may answer with a zero over our STOP: say it again. */
static void stop_counter(struct counter *counter) {
    volatile uint64_t *request = &counter->block->stamp_request;
    *request = VMM_COUNTER_STOP;
    int error;
    while ((error = pthread_tryjoin_np(counter->thread, NULL)) == EBUSY) {
        if (*request != VMM_COUNTER_STOP)
            *request = VMM_COUNTER_STOP;
        sched_yield();
    }
    free(counter->block);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONFIG_FILE RESULT_FILE (run by `vmm run --mode native`)\n", argv[0]);
        return 2;
    }
    struct vmm_config config;
    FILE *in = fopen(argv[1], "rb");
    if (!in || fread(&config, sizeof config, 1, in) != 1) {
        fprintf(stderr, "%s: cannot read the config block %s\n", argv[0], argv[1]);
        return 2;
    }
    fclose(in);
    if (config.magic != VMM_CONFIG_MAGIC || config.abi_version != VMM_ABI_VERSION) {
        fprintf(stderr, "%s: the config block is not for ABI %u\n", argv[0], VMM_ABI_VERSION);
        return 2;
    }
    if (config.result_capacity < sizeof(struct vmm_result_header) || config.result_capacity > MAX_RESULT_BYTES) {
        fprintf(stderr, "%s: result capacity %llu is out of range\n", argv[0], (unsigned long long)config.result_capacity);
        return 2;
    }
    struct vmm_result_header *result = calloc(1, config.result_capacity);
    if (!result) {
        fprintf(stderr, "%s: out of memory\n", argv[0]);
        return 2;
    }
    struct counter counter = {0};
    if (config.counter_addr != 0) {
        if (start_counter(argv[0], &counter) != 0)
            return 2;
        config.counter_addr = (uint64_t)(uintptr_t)counter.block;
    }
    struct vmm_run run = {&config, result, 0, 0};
    int status = vmm_run_detector(&run);
    if (counter.block)
        stop_counter(&counter);
    /* The header, every probe's samples and, where the header says ticks follow, as many
     * counter tick counts again (vmm_begin held room for them in a run with a counter). */
    uint64_t samples = (uint64_t)__builtin_popcount(run.probes) * run.iterations * sizeof(int64_t);
    uint64_t bytes = sizeof *result + (result->ticks != 0 ? 2 : 1) * samples;
    if (bytes > config.result_capacity)
        bytes = config.result_capacity;
    FILE *out = fopen(argv[2], "wb");
    if (!out || fwrite(result, 1, (size_t)bytes, out) != bytes || fclose(out) != 0) {
        fprintf(stderr, "%s: cannot write the result block to %s\n", argv[0], argv[2]);
        return 2;
    }
    free(result);
    if (status != VMM_STATUS_OK) {
        /* As a guest rings its status on the done port: vmm reads it from the exit code. */
        fprintf(stderr, "%s: the detector stopped with status %d\n", argv[0], status);
        return (int)VMM_NATIVE_TWIN_STATUS_BASE + status;
    }
    return 0;
}
