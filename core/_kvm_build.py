# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf._kvm``: the KVM API compiled against <linux/kvm.h>.

API (out-of-line) mode: every struct below ends in ``...;`` or is checked against the
real header, and every ioctl number and constant is taken from the header by the C
compiler, so no layout or number is written by hand here.
"""

from __future__ import annotations

from cffi import FFI

# Ioctls used by hvf; each becomes a constant of the same name.
IOCTLS = (
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID",
    "KVM_GET_MSR_INDEX_LIST",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP",
    "KVM_CREATE_PIT2",
    "KVM_IRQ_LINE",
    "KVM_IRQ_LINE_STATUS",
    "KVM_GET_IRQCHIP",
    "KVM_SET_IRQCHIP",
    "KVM_GET_PIT2",
    "KVM_SET_PIT2",
    "KVM_GET_CLOCK",
    "KVM_SET_CLOCK",
    "KVM_CREATE_VCPU",
    "KVM_RUN",
    "KVM_GET_REGS",
    "KVM_SET_REGS",
    "KVM_GET_SREGS",
    "KVM_SET_SREGS",
    "KVM_GET_FPU",
    "KVM_SET_FPU",
    "KVM_GET_XSAVE",
    "KVM_SET_XSAVE",
    "KVM_GET_XCRS",
    "KVM_SET_XCRS",
    "KVM_GET_MSRS",
    "KVM_SET_MSRS",
    "KVM_GET_LAPIC",
    "KVM_SET_LAPIC",
    "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS",
    "KVM_GET_MP_STATE",
    "KVM_SET_MP_STATE",
    "KVM_GET_DEBUGREGS",
    "KVM_SET_DEBUGREGS",
    "KVM_SET_CPUID2",
    "KVM_GET_CPUID2",
    "KVM_SET_SIGNAL_MASK",
    "KVM_SET_GSI_ROUTING",
    "KVM_KVMCLOCK_CTRL",
    "KVM_GET_XSAVE2",
    "KVM_IRQFD",
    "KVM_IOEVENTFD",
    "KVM_SIGNAL_MSI",
    "KVM_SET_GUEST_DEBUG",
    "KVM_TRANSLATE",
    "KVM_ENABLE_CAP",
    "KVM_GET_DIRTY_LOG",
    "KVM_CLEAR_DIRTY_LOG",
    "KVM_GET_TSC_KHZ",
    "KVM_SET_TSC_KHZ",
)

# Ioctls whose third argument points to a struct: (ioctl, struct). A test checks that
# the size the kernel encodes in each number equals the compiler's sizeof.
STRUCT_IOCTLS = (
    ("KVM_SET_USER_MEMORY_REGION", "struct kvm_userspace_memory_region"),
    ("KVM_CREATE_PIT2", "struct kvm_pit_config"),
    ("KVM_IRQ_LINE", "struct kvm_irq_level"),
    ("KVM_IRQ_LINE_STATUS", "struct kvm_irq_level"),
    ("KVM_GET_IRQCHIP", "struct kvm_irqchip"),
    ("KVM_SET_IRQCHIP", "struct kvm_irqchip"),
    ("KVM_GET_PIT2", "struct kvm_pit_state2"),
    ("KVM_SET_PIT2", "struct kvm_pit_state2"),
    ("KVM_GET_CLOCK", "struct kvm_clock_data"),
    ("KVM_SET_CLOCK", "struct kvm_clock_data"),
    ("KVM_GET_REGS", "struct kvm_regs"),
    ("KVM_SET_REGS", "struct kvm_regs"),
    ("KVM_GET_SREGS", "struct kvm_sregs"),
    ("KVM_SET_SREGS", "struct kvm_sregs"),
    ("KVM_GET_FPU", "struct kvm_fpu"),
    ("KVM_SET_FPU", "struct kvm_fpu"),
    ("KVM_GET_XSAVE", "struct kvm_xsave"),
    ("KVM_SET_XSAVE", "struct kvm_xsave"),
    ("KVM_GET_XCRS", "struct kvm_xcrs"),
    ("KVM_SET_XCRS", "struct kvm_xcrs"),
    ("KVM_GET_MSRS", "struct kvm_msrs"),
    ("KVM_SET_MSRS", "struct kvm_msrs"),
    ("KVM_GET_LAPIC", "struct kvm_lapic_state"),
    ("KVM_SET_LAPIC", "struct kvm_lapic_state"),
    ("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events"),
    ("KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events"),
    ("KVM_GET_MP_STATE", "struct kvm_mp_state"),
    ("KVM_SET_MP_STATE", "struct kvm_mp_state"),
    ("KVM_GET_DEBUGREGS", "struct kvm_debugregs"),
    ("KVM_SET_DEBUGREGS", "struct kvm_debugregs"),
    ("KVM_SET_CPUID2", "struct kvm_cpuid2"),
    ("KVM_GET_CPUID2", "struct kvm_cpuid2"),
    ("KVM_GET_SUPPORTED_CPUID", "struct kvm_cpuid2"),
    ("KVM_GET_MSR_INDEX_LIST", "struct kvm_msr_list"),
    ("KVM_SET_SIGNAL_MASK", "struct kvm_signal_mask"),
    ("KVM_SET_GSI_ROUTING", "struct kvm_irq_routing"),
    ("KVM_IRQFD", "struct kvm_irqfd"),
    ("KVM_IOEVENTFD", "struct kvm_ioeventfd"),
    ("KVM_SIGNAL_MSI", "struct kvm_msi"),
    ("KVM_SET_GUEST_DEBUG", "struct kvm_guest_debug"),
    ("KVM_TRANSLATE", "struct kvm_translation"),
    ("KVM_ENABLE_CAP", "struct kvm_enable_cap"),
    ("KVM_GET_DIRTY_LOG", "struct kvm_dirty_log"),
    ("KVM_CLEAR_DIRTY_LOG", "struct kvm_clear_dirty_log"),
)

CONSTANTS = (
    "KVM_API_VERSION",
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_EXCEPTION", "KVM_EXIT_IO", "KVM_EXIT_HYPERCALL",
    "KVM_EXIT_DEBUG", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_IRQ_WINDOW_OPEN",
    "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_NMI",
    "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_IOAPIC_EOI",
    "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR",
    "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT",
    "KVM_INTERNAL_ERROR_EMULATION", "KVM_INTERNAL_ERROR_SIMUL_EX",
    "KVM_INTERNAL_ERROR_DELIVERY_EV", "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES",
    "KVM_SYSTEM_EVENT_SHUTDOWN", "KVM_SYSTEM_EVENT_RESET", "KVM_SYSTEM_EVENT_CRASH",
    "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_PIT2", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_EXT_CPUID", "KVM_CAP_MP_STATE",
    "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS", "KVM_CAP_XSAVE", "KVM_CAP_XCRS",
    "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_NR_VCPUS", "KVM_CAP_MAX_VCPUS",
    "KVM_CAP_NR_MEMSLOTS", "KVM_CAP_INTERNAL_ERROR_DATA", "KVM_CAP_IRQ_ROUTING",
    "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_IRQ_INJECT_STATUS",
    "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED", "KVM_MP_STATE_INIT_RECEIVED",
    "KVM_MP_STATE_HALTED", "KVM_MP_STATE_SIPI_RECEIVED",
    "KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC",
    "KVM_PIT_SPEAKER_DUMMY",
    "KVM_CAP_XSAVE2",
    "KVM_CAP_READONLY_MEM",
    "KVM_MEM_READONLY",
    "KVM_CAP_IRQFD", "KVM_CAP_IRQFD_RESAMPLE", "KVM_CAP_IOEVENTFD", "KVM_CAP_SIGNAL_MSI",
    "KVM_CAP_IOEVENTFD_ANY_LENGTH",
    "KVM_IRQFD_FLAG_DEASSIGN", "KVM_IRQFD_FLAG_RESAMPLE",
    "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO", "KVM_IOEVENTFD_FLAG_DEASSIGN",
    "KVM_IRQ_ROUTING_IRQCHIP", "KVM_IRQ_ROUTING_MSI",
    "KVM_CAP_SET_GUEST_DEBUG", "KVM_CAP_SET_GUEST_DEBUG2",
    "KVM_GUESTDBG_ENABLE", "KVM_GUESTDBG_SINGLESTEP", "KVM_GUESTDBG_USE_SW_BP",
    "KVM_GUESTDBG_USE_HW_BP", "KVM_GUESTDBG_INJECT_BP", "KVM_GUESTDBG_BLOCKIRQ",
    "KVM_CAP_X86_USER_SPACE_MSR",
    "KVM_MSR_EXIT_REASON_INVAL", "KVM_MSR_EXIT_REASON_UNKNOWN", "KVM_MSR_EXIT_REASON_FILTER",
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CAP_DIRTY_LOG_RING",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_CAP_GET_TSC_KHZ", "KVM_CAP_TSC_CONTROL",
)

CDEF = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int32_t __s32;

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    ...;
};

/* The members of kvm_run's anonymous exit union, given names in the C source. */
typedef struct { __u8 direction; __u8 size; __u16 port; __u32 count;
                 __u64 data_offset; ...; } hvf_exit_io;
typedef struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; ...;
               } hvf_exit_mmio;
typedef struct { __u64 hardware_entry_failure_reason; __u32 cpu; ...; }
               hvf_exit_fail_entry;
typedef struct { __u32 suberror; __u32 ndata; __u64 data[16]; ...; }
               hvf_exit_internal;
typedef struct { __u32 type; ...; } hvf_exit_system_event;
typedef struct { __u32 exception; __u64 pc; __u64 dr6; __u64 dr7; ...; } hvf_exit_debug;
typedef struct { __u8 error; __u32 reason; __u32 index; __u64 data; ...; } hvf_exit_msr;
static const int HVF_RUN_EXIT_OFFSET;

struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size;
    __u64 userspace_addr;
};
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_irq_level { __u32 irq; __u32 level; ...; };

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector;
    __u8 type; __u8 present, dpl, db, s, l, g, avl; __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode; __u64 last_ip;
    __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; ...;
};
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_xcr { __u32 xcr; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[16]; ...; };
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_irqchip { __u32 chip_id; ...; };
struct kvm_pic_state { __u8 irr; __u8 imr; __u8 elcr; __u8 elcr_mask; ...; };
static const int HVF_IRQCHIP_CHIP_OFFSET;
struct kvm_pit_state2 { __u32 flags; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; ...; };
struct kvm_vcpu_events { __u32 flags; ...; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags;
    __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; ...;
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_signal_mask { __u32 len; __u8 sigset[]; };
struct kvm_irq_routing { __u32 nr; __u32 flags; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; ...; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; };
struct kvm_guest_debug { __u32 control; struct kvm_guest_debug_arch arch; ...; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address; __u8 valid; __u8 writeable; __u8 usermode;
    ...;
};
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
/* One GSI route: irqchip (a = chip, b = pin) or MSI (a, b = address lo/hi, c = data). */
typedef struct { __u32 gsi; __u32 type; __u32 a; __u32 b; __u32 c; } hvf_route;
int hvf_set_gsi_routing(int vmfd, const hvf_route *routes, unsigned int n);
struct kvm_dirty_log { __u32 slot; ...; };
struct kvm_clear_dirty_log { __u32 slot; __u32 num_pages; __u64 first_page; ...; };
int hvf_get_dirty_log(int vmfd, __u32 slot, void *bitmap);
int hvf_clear_dirty_log(int vmfd, __u32 slot, __u64 first_page, __u32 num_pages, void *bitmap);

int hvf_ioctl(int fd, unsigned long request, void *arg);
int hvf_ioctl_int(int fd, unsigned long request, unsigned long arg);
int hvf_run(int fd);
long long hvf_run_fast(int fd, struct kvm_run *run);
#define HVF_FAST_IO ...
#define HVF_FAST_IO_OUT ...
static const int HVF_PIO_DATA_OFFSET;
"""

SOURCE = r"""
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

typedef __typeof__(((struct kvm_run *)0)->io) hvf_exit_io;
typedef __typeof__(((struct kvm_run *)0)->mmio) hvf_exit_mmio;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) hvf_exit_fail_entry;
typedef __typeof__(((struct kvm_run *)0)->internal) hvf_exit_internal;
typedef __typeof__(((struct kvm_run *)0)->system_event) hvf_exit_system_event;
typedef struct kvm_debug_exit_arch hvf_exit_debug;
typedef __typeof__(((struct kvm_run *)0)->msr) hvf_exit_msr;
#define HVF_RUN_EXIT_OFFSET ((int)offsetof(struct kvm_run, io))
#define HVF_IRQCHIP_CHIP_OFFSET ((int)offsetof(struct kvm_irqchip, chip))

/* Each wrapper returns the ioctl's result, or -errno on failure. */
static int hvf_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int hvf_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

typedef struct { __u32 gsi; __u32 type; __u32 a; __u32 b; __u32 c; } hvf_route;

/* KVM_SET_GSI_ROUTING with the whole table; the union is filled here, in C. */
static int hvf_set_gsi_routing(int vmfd, const hvf_route *routes, unsigned int n)
{
    struct kvm_irq_routing *table =
        calloc(1, sizeof(*table) + n * sizeof(struct kvm_irq_routing_entry));
    if (table == NULL)
        return -ENOMEM;
    table->nr = n;
    for (unsigned int i = 0; i < n; i++) {
        struct kvm_irq_routing_entry *e = &table->entries[i];
        e->gsi = routes[i].gsi;
        e->type = routes[i].type;
        if (e->type == KVM_IRQ_ROUTING_IRQCHIP) {
            e->u.irqchip.irqchip = routes[i].a;
            e->u.irqchip.pin = routes[i].b;
        } else {
            e->u.msi.address_lo = routes[i].a;
            e->u.msi.address_hi = routes[i].b;
            e->u.msi.data = routes[i].c;
        }
    }
    int r = ioctl(vmfd, KVM_SET_GSI_ROUTING, table);
    r = r < 0 ? -errno : r;
    free(table);
    return r;
}

/* KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG: the bitmap pointer is in a union, set here. */
static int hvf_get_dirty_log(int vmfd, __u32 slot, void *bitmap)
{
    struct kvm_dirty_log log = { .slot = slot, .dirty_bitmap = bitmap };
    return ioctl(vmfd, KVM_GET_DIRTY_LOG, &log) < 0 ? -errno : 0;
}

static int hvf_clear_dirty_log(int vmfd, __u32 slot, __u64 first_page, __u32 num_pages,
                               void *bitmap)
{
    struct kvm_clear_dirty_log log = { .slot = slot, .num_pages = num_pages,
                                       .first_page = first_page, .dirty_bitmap = bitmap };
    return ioctl(vmfd, KVM_CLEAR_DIRTY_LOG, &log) < 0 ? -errno : 0;
}

/* KVM_RUN; cffi releases the GIL around this call. */
static int hvf_run(int fd)
{
    return ioctl(fd, KVM_RUN, 0) < 0 ? -errno : 0;
}

/*
 * KVM_RUN for the vCPU loop's hot path. Returns -errno on failure. A single-element
 * port I/O exit comes back packed in a small integer (one digit of a Python int, so
 * that decoding it allocates nothing): HVF_FAST_IO | size << 16 | port
 * [| HVF_FAST_IO_OUT]. An OUT's value is left zero-extended as a 32-bit word at
 * HVF_PIO_DATA_OFFSET (KVM's data, which KVM reads no more once it has exited). Any
 * other exit returns its exit_reason (all below HVF_FAST_IO).
 */
#define HVF_FAST_IO (1LL << 21)
#define HVF_FAST_IO_OUT (1LL << 20)
#define HVF_PIO_DATA_OFFSET (KVM_PIO_PAGE_OFFSET * 4096)

static long long hvf_run_fast(int fd, struct kvm_run *run)
{
    if (ioctl(fd, KVM_RUN, 0) < 0)
        return -errno;
    if (run->exit_reason == KVM_EXIT_IO && run->io.count == 1 &&
        run->io.data_offset == HVF_PIO_DATA_OFFSET) {
        long long r = HVF_FAST_IO | (long long)run->io.size << 16 | run->io.port;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            unsigned char *d = (unsigned char *)run + HVF_PIO_DATA_OFFSET;
            unsigned int v = d[0];
            if (run->io.size >= 2)
                v |= (unsigned int)d[1] << 8;
            if (run->io.size == 4)
                v |= (unsigned int)d[2] << 16 | (unsigned int)d[3] << 24;
            *(unsigned int *)d = v;
            r |= HVF_FAST_IO_OUT;
        }
        return r;
    }
    return run->exit_reason;
}
"""


def _cdef() -> str:
    names = sorted(set(IOCTLS) | {name for name, _ in STRUCT_IOCTLS})
    lines = [f"#define {name} ..." for name in names + list(CONSTANTS)]
    return CDEF + "\n".join(lines) + "\n"


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source("hvf._kvm", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
