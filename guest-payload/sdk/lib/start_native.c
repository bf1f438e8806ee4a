/* The native twin's entry point: the same detector as a Linux program. `vmm run --mode
 * native --payload X.elf` runs X.native pinned to one CPU as
 *     X.native CONFIG_FILE RESULT_FILE
 * with the config block the guest would get; the twin writes the result block the guest
 * would write (header and samples) to RESULT_FILE. */
#include "vmm_sdk.h"
#include <stdio.h>
#include <stdlib.h>

/* The largest result area a twin allocates, whatever the config says. */
#define MAX_RESULT_BYTES (1ull << 30)

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
    struct vmm_run run = {&config, result, 0, 0};
    int status = vmm_run_detector(&run);
    size_t bytes = sizeof *result + (size_t)__builtin_popcount(run.probes) * run.iterations * sizeof(int64_t);
    FILE *out = fopen(argv[2], "wb");
    if (!out || fwrite(result, 1, bytes, out) != bytes || fclose(out) != 0) {
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
