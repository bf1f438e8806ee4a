# Builds one detector twice from one source with the compilers of a stock Linux box:
#   $(NAME).elf     the vmm guest (static, freestanding, at the ABI's payload address)
#   $(NAME).native  the native twin (an ordinary Linux program)
# A detector's Makefile sets NAME and SRCS (C: .c; C++: .cpp, .cc, .cxx), then includes
# this file. docs/sdk.md says how to build a function taken from pafish, al-khaser or
# VMAware unchanged.
#
# What a detector may set, in its Makefile or on make's command line (`make OPT=-O0`):
#   OPT            optimisation, as the original was built (default -O2)
#   WARNINGS       warnings, as the original was built (default -Wall -Wextra; -w: none)
#   WERROR=1       warnings are errors (the SDK's own examples build with it)
#   EXTRA_CFLAGS   defines and flags for C and C++ sources, both builds (-DSLEEP_MS=500)
#   EXTRA_CXXFLAGS flags for C++ sources only
#   CSTD, CXXSTD   the language standards (default -std=gnu11, -std=gnu++17)
#   GUEST_SSE_FOR_FP_ONLY  see below; empty lets the compiler vectorise integer code
SDK := $(dir $(lastword $(MAKEFILE_LIST)))
CC ?= cc
CXX ?= c++
OPT ?= -O2
WARNINGS ?= -Wall -Wextra
WERROR ?= 0
CSTD ?= -std=gnu11
CXXSTD ?= -std=gnu++17

# The guest has SSE (the VMM sets CR4.OSFXSR): `double` and `float` compile as anywhere
# on x86-64. An emulating KVM (this project's development host) runs no SSE or x87
# arithmetic at all, only plain SSE moves (docs/sdk.md lists what it runs): there, code
# that computes in floating point stops with the VMM naming the instruction. So that
# integer code does not stop there too, the compiler is kept from using SSE registers for
# integers (vectorised loops, zeroing or copying structs through XMM), where it accepts
# the flags that say so (GCC's).
SSE_FOR_FP_ONLY_FLAGS := -fno-tree-vectorize \
	-mtune-ctrl=^sse_unaligned_load_optimal,^sse_unaligned_store_optimal,^inter_unit_moves_to_vec
ifeq ($(origin GUEST_SSE_FOR_FP_ONLY),undefined)
GUEST_SSE_FOR_FP_ONLY := $(shell $(CC) $(SSE_FOR_FP_ONLY_FLAGS) -x c -c -o /dev/null /dev/null 2>/dev/null && echo '$(SSE_FOR_FP_ONLY_FLAGS)')
endif

# Flags of the detector's own sources (recursive: a Makefile may set the knobs after the
# include too).
COMMON_FLAGS = $(OPT) $(WARNINGS) $(if $(filter 1,$(WERROR)),-Werror) \
	-ffunction-sections -fdata-sections -I$(SDK)include $(EXTRA_CFLAGS)
# -mno-red-zone: nothing interrupts a guest today, but an exception or NMI handler of a
# future VMM would write below RSP. No stack protector, no unwind tables, no libc.
GUEST_FLAGS = $(COMMON_FLAGS) -DVMM_GUEST=1 -ffreestanding -fno-pic -fno-pie -mno-red-zone \
	-fno-stack-protector -fno-asynchronous-unwind-tables -fno-builtin $(GUEST_SSE_FOR_FP_ONLY)
# C++ in the guest is freestanding too: no exceptions, RTTI or thread-safe statics
# (they need libstdc++/libsupc++, which the guest does not have).
GUEST_CXX_ONLY := -fno-exceptions -fno-rtti -fno-threadsafe-statics
GUEST_CFLAGS = $(GUEST_FLAGS) $(CSTD)
GUEST_CXXFLAGS = $(GUEST_FLAGS) $(CXXSTD) $(GUEST_CXX_ONLY) $(EXTRA_CXXFLAGS)
NATIVE_CFLAGS = $(COMMON_FLAGS) $(CSTD)
NATIVE_CXXFLAGS = $(COMMON_FLAGS) $(CXXSTD) $(EXTRA_CXXFLAGS)

# The SDK's own library is C, built with its own flags whatever the detector's, and with
# general registers only: nothing of the SDK needs an instruction an emulating KVM lacks.
SDK_FLAGS := -O2 -Wall -Wextra -std=gnu11 -ffunction-sections -fdata-sections -I$(SDK)include
SDK_GUEST_FLAGS := $(SDK_FLAGS) -DVMM_GUEST=1 -ffreestanding -fno-pic -fno-pie -mno-red-zone \
	-mgeneral-regs-only -fno-stack-protector -fno-asynchronous-unwind-tables -fno-builtin

# Unused SDK helpers are dropped (--gc-sections): the VMM traps every CPUID it finds in
# the code, and a helper nobody calls should not count. The info block is kept (-u).
# libgcc comes last: what the compiler calls for `__int128` arithmetic and the like (the
# SDK's own general-register `__divti3` family is found first).
GUEST_LDFLAGS := -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--gc-sections -Wl,-u,vmm_payload_info -T $(SDK)payload.ld
GUEST_LIBS := -lgcc
# The twin runs a counter thread when the config names a counter (lib/start_native.c).
NATIVE_LDFLAGS := -pthread

CXX_SUFFIXES := %.cpp %.cc %.cxx
HAS_CXX = $(filter $(CXX_SUFFIXES),$(SRCS))
# The twin is linked by the C++ driver (libstdc++) when any source is C++.
NATIVE_LINK = $(if $(HAS_CXX),$(CXX),$(CC))

# Objects go under $(NAME).obj/, one directory per build; a source's path is flattened
# into its object's name (../x/y.c: up_x_y.c.o).
OBJDIR := $(NAME).obj
object = $(OBJDIR)/$(1)/$(subst /,_,$(subst ../,up_,$(2))).o
GUEST_OBJS = $(foreach s,$(SRCS),$(call object,guest,$(s)))
NATIVE_OBJS = $(foreach s,$(SRCS),$(call object,native,$(s)))
SDK_GUEST_OBJS := $(OBJDIR)/sdk-guest/vmm_sdk.o $(OBJDIR)/sdk-guest/start_guest.o
SDK_NATIVE_OBJS := $(OBJDIR)/sdk-native/vmm_sdk.o $(OBJDIR)/sdk-native/start_native.o
SDK_DEPS := $(SDK)include/vmm_abi.h $(SDK)include/vmm_sdk.h $(SDK)sdk.mk

all: $(NAME).elf $(NAME).native

# The detector's own flags (EXTRA_CFLAGS: SLEEP_MS=500, a CHECK_*; OPT, WARNINGS, the
# compilers) are part of what a build is: a stamp that changes with them makes
# `make OPT=-O0` rebuild.
BUILD_FLAGS = $(CC) $(CXX) $(OPT) $(WARNINGS) $(WERROR) $(CSTD) $(CXXSTD) $(EXTRA_CFLAGS) $(EXTRA_CXXFLAGS) $(GUEST_SSE_FOR_FP_ONLY)
$(NAME).flags: FORCE
	@echo '$(BUILD_FLAGS)' | cmp -s - $@ || echo '$(BUILD_FLAGS)' > $@
FORCE:

# One compile rule per source and build: $(1) guest or native, $(2) the source.
define compile_source
$(call object,$(1),$(2)): $(2) $(NAME).flags $(SDK_DEPS)
	@mkdir -p $$(dir $$@)
	$(if $(filter $(CXX_SUFFIXES),$(2)),$$(CXX) $$($(if $(filter guest,$(1)),GUEST,NATIVE)_CXXFLAGS),$$(CC) $$($(if $(filter guest,$(1)),GUEST,NATIVE)_CFLAGS)) -MMD -MP -c -o $$@ $$<
endef
$(foreach s,$(SRCS),$(eval $(call compile_source,guest,$(s))))
$(foreach s,$(SRCS),$(eval $(call compile_source,native,$(s))))

$(OBJDIR)/sdk-guest/%.o: $(SDK)lib/%.c $(SDK_DEPS)
	@mkdir -p $(dir $@)
	$(CC) $(SDK_GUEST_FLAGS) -c -o $@ $<
$(OBJDIR)/sdk-native/%.o: $(SDK)lib/%.c $(SDK_DEPS)
	@mkdir -p $(dir $@)
	$(CC) $(SDK_FLAGS) -c -o $@ $<

$(NAME).elf: $(GUEST_OBJS) $(SDK_GUEST_OBJS) $(SDK)payload.ld
	$(CC) $(GUEST_LDFLAGS) -o $@ $(GUEST_OBJS) $(SDK_GUEST_OBJS) $(GUEST_LIBS)

$(NAME).native: $(NATIVE_OBJS) $(SDK_NATIVE_OBJS)
	$(NATIVE_LINK) $(NATIVE_LDFLAGS) -o $@ $(NATIVE_OBJS) $(SDK_NATIVE_OBJS)

-include $(wildcard $(OBJDIR)/*/*.d)

clean:
	rm -rf $(NAME).elf $(NAME).native $(NAME).flags $(OBJDIR)

.PHONY: all clean FORCE
