# Builds one detector twice from one source with the compilers of a stock Linux box:
#   $(NAME).elf     the vmm guest (static, freestanding, at the ABI's payload address)
#   $(NAME).native  the native twin (an ordinary Linux program)
# A detector's Makefile sets NAME and SRCS, then includes this file.
SDK := $(dir $(lastword $(MAKEFILE_LIST)))
CC ?= cc
# A detector adds its own defines in EXTRA_CFLAGS, set before the include.
CFLAGS_COMMON := -O2 -Wall -Wextra -Werror -std=gnu11 -ffunction-sections -fdata-sections -I$(SDK)include $(EXTRA_CFLAGS)
# No SSE in the guest: an emulating KVM cannot run most SSE instructions, and the
# compiler emits them for plain copies unless told not to.
GUEST_CFLAGS := $(CFLAGS_COMMON) -DVMM_GUEST=1 -ffreestanding -fno-pic -fno-pie -mno-red-zone \
	-mgeneral-regs-only -fno-stack-protector -fno-asynchronous-unwind-tables -fno-builtin
# Unused SDK helpers are dropped (--gc-sections): the VMM traps every CPUID it finds in
# the code, and a helper nobody calls should not count. The info block is kept (-u).
GUEST_LDFLAGS := -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--gc-sections -Wl,-u,vmm_payload_info -T $(SDK)payload.ld
NATIVE_CFLAGS := $(CFLAGS_COMMON)
# The twin runs a counter thread when the config names a counter (lib/start_native.c).
NATIVE_LDFLAGS := -pthread

all: $(NAME).elf $(NAME).native

# The detector's own flags (EXTRA_CFLAGS: SLEEP_MS=500, a CHECK_*) are part of what a build
# is: a stamp that changes with them makes `make SLEEP_MS=500` rebuild.
$(NAME).flags: FORCE
	@echo '$(EXTRA_CFLAGS)' | cmp -s - $@ || echo '$(EXTRA_CFLAGS)' > $@
FORCE:

$(NAME).elf: $(NAME).flags $(SRCS) $(SDK)lib/vmm_sdk.c $(SDK)lib/start_guest.c $(SDK)include/vmm_abi.h $(SDK)include/vmm_sdk.h $(SDK)payload.ld
	$(CC) $(GUEST_CFLAGS) $(GUEST_LDFLAGS) -o $@ $(SRCS) $(SDK)lib/vmm_sdk.c $(SDK)lib/start_guest.c

$(NAME).native: $(NAME).flags $(SRCS) $(SDK)lib/vmm_sdk.c $(SDK)lib/start_native.c $(SDK)include/vmm_abi.h $(SDK)include/vmm_sdk.h
	$(CC) $(NATIVE_CFLAGS) $(NATIVE_LDFLAGS) -o $@ $(SRCS) $(SDK)lib/vmm_sdk.c $(SDK)lib/start_native.c

clean:
	rm -f $(NAME).elf $(NAME).native $(NAME).flags

.PHONY: all clean FORCE
