/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * Freestanding runtime for the C test guests (libc.c): port and MMIO
 * access, debug-console output, the multiboot command line, a bump
 * allocator for guest RAM above the image, and interrupt plumbing (IDT,
 * 8259 pair, local APIC) whose handlers return without IRET.
 *
 * The C guests are linked with common.S exactly like the assembly ones:
 * common.S sets up the GDT, the stack and .bss and calls `main(void)`,
 * whose return value becomes the exit value (port 0xF4).  The helpers of
 * common.S take register arguments, so the C side has its own (named
 * con_* / guest_exit here so that they do not clash with them).
 */
#ifndef HVF_GUEST_LIBC_H
#define HVF_GUEST_LIBC_H

#include <stddef.h>
#include <stdint.h>

#define DEBUGCON_PORT	0x402
#define EXIT_PORT	0xf4

#define LAPIC_BASE	0xfee00000u
#define LAPIC_EOI	0x0b0
#define LAPIC_SVR	0x0f0
#define LAPIC_LVT0	0x350

/* Vector layout: exceptions 0-31, 8259 IRQs 0x20-0x2f, MSI(-X) from 0x50. */
#define PIC_VECTOR_BASE	0x20
#define SPURIOUS_VECTOR	0xff

/* An unaligned, aliasing-safe 32-bit word (x86 allows unaligned loads). */
typedef uint32_t __attribute__((may_alias, aligned(1))) u32_unaligned;

#define barrier()	__asm__ volatile("" ::: "memory")

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(uint16_t port, uint16_t v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* MMIO: exactly one access of the given width each (volatile). */
static inline uint8_t mmio_read8(uint32_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uint32_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t mmio_read32(uint32_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write8(uint32_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uint32_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void mmio_write32(uint32_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

static inline void cpu_cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void cpu_sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }

/*
 * Enable interrupts and halt atomically (STI's shadow covers HLT), then
 * disable them again once an interrupt has been handled.  Call with
 * IF clear after checking the wake-up condition.
 */
static inline void cpu_sti_hlt_cli(void)
{
	__asm__ volatile("sti; hlt; cli" ::: "memory");
}

static inline uint64_t rdtsc(void)
{
	uint64_t v;
	__asm__ volatile("rdtsc" : "=A"(v));
	return v;
}

/* Debug console (port 0x402). */
void con_putc(char c);
void con_puts(const char *s);
void con_hex(uint32_t v, int digits);	/* lowercase, zero-padded */
void con_hex64(uint64_t v);		/* 16 digits */
void con_dec(uint32_t v);

/* Print then exit with value v (status 2v+1).  Never returns. */
void guest_exit(uint32_t v) __attribute__((noreturn));
void fail(const char *msg) __attribute__((noreturn));	/* line + exit 1 */

/*
 * Command line.  opt_init() copies it (so that later allocations may
 * overwrite the loader's copy) and reads the memory size from the
 * multiboot info; call it first.  Keys such as "n=" count only at the
 * start of a space-separated word.
 */
void opt_init(void);
const char *opt_find(const char *key);		/* text after the key, or 0 */
uint32_t opt_num(const char *key, uint32_t def);	/* decimal or 0x hex */

/*
 * Bump allocator over guest RAM from the first MiB boundary after the
 * image up to the end of upper memory.  Memory is not zeroed except by
 * mem_zalloc; allocation failure prints a line and exits 1.
 */
void *mem_alloc(uint32_t size, uint32_t align);
void *mem_zalloc(uint32_t size, uint32_t align);

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

/*
 * Interrupts.  irq_init() loads a 256-entry IDT (exceptions print
 * `exception <vec> eip <hex8>` and exit 3), remaps the 8259 pair to
 * 0x20/0x28 with every line masked, and software-enables the local APIC
 * (SVR 0x1ff, LVT0 ExtINT so that 8259 interrupts still arrive).
 * Handlers run with IF clear and must be short.
 */
typedef void (*irq_handler)(void *arg);

void irq_init(void);
/* Fixed APIC vector (MSI/MSI-X); the dispatcher sends the APIC EOI. */
void irq_set_vector(uint8_t vector, irq_handler fn, void *arg);
/* 8259 line (shared lines allowed); the dispatcher sends the PIC EOI. */
void irq_add_line(uint8_t irq, irq_handler fn, void *arg);
/* Count of interrupts nobody claimed (stray vectors/IRQs). */
extern volatile uint32_t irq_stray;

#endif
