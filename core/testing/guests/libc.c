/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * Freestanding runtime for the C test guests; see libc.h.
 */
#include "libc.h"

/* From common.S and link.ld. */
extern uint32_t mb_info;
extern char __bss_end[];

#define MB_FLAG_MEM	(1u << 0)
#define MB_FLAG_CMDLINE	(1u << 2)

/* ------------------------------------------------------------------ */
/* Debug console                                                       */

void con_putc(char c)
{
	outb(DEBUGCON_PORT, (uint8_t)c);
}

void con_puts(const char *s)
{
	while (*s)
		outb(DEBUGCON_PORT, (uint8_t)*s++);
}

void con_hex(uint32_t v, int digits)
{
	static const char hex[] = "0123456789abcdef";

	while (digits-- > 0)
		con_putc(hex[(v >> (4 * digits)) & 0xf]);
}

void con_hex64(uint64_t v)
{
	con_hex((uint32_t)(v >> 32), 8);
	con_hex((uint32_t)v, 8);
}

void con_dec(uint32_t v)
{
	char buf[12];
	int i = 0;

	do {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		con_putc(buf[--i]);
}

void guest_exit(uint32_t v)
{
	outl(EXIT_PORT, v);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void fail(const char *msg)
{
	con_puts(msg);
	con_putc('\n');
	guest_exit(1);
}

/* ------------------------------------------------------------------ */
/* Command line and memory                                             */

#define CMDLINE_MAX 1024

static char cmdline[CMDLINE_MAX];
static uint32_t mem_next;
static uint32_t mem_end;

void opt_init(void)
{
	const uint32_t *mbi = (const uint32_t *)mb_info;
	uint32_t i;

	cmdline[0] = 0;
	mem_end = 0x100000u + 64u * 1024 * 1024;	/* no info: assume 64 MiB */
	if (mbi) {
		if ((mbi[0] & MB_FLAG_CMDLINE) && mbi[4]) {
			const char *s = (const char *)mbi[4];
			for (i = 0; i < CMDLINE_MAX - 1 && s[i]; i++)
				cmdline[i] = s[i];
			cmdline[i] = 0;
		}
		if (mbi[0] & MB_FLAG_MEM)
			mem_end = 0x100000u + mbi[2] * 1024u;
	}
	mem_next = ((uint32_t)__bss_end + 0xfffffu) & ~0xfffffu;
}

const char *opt_find(const char *key)
{
	const char *p;

	for (p = cmdline; *p; p++) {
		const char *k = key, *q = p;

		if (p != cmdline && p[-1] != ' ')
			continue;
		while (*k && *k == *q) {
			k++;
			q++;
		}
		if (!*k)
			return q;
	}
	return 0;
}

uint32_t opt_num(const char *key, uint32_t def)
{
	const char *p = opt_find(key);
	uint32_t v = 0;

	if (!p)
		return def;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		for (p += 2;; p++) {
			uint32_t d;

			if (*p >= '0' && *p <= '9')
				d = (uint32_t)(*p - '0');
			else if ((*p | 0x20) >= 'a' && (*p | 0x20) <= 'f')
				d = (uint32_t)((*p | 0x20) - 'a' + 10);
			else
				break;
			v = v * 16 + d;
		}
		return v;
	}
	while (*p >= '0' && *p <= '9')
		v = v * 10 + (uint32_t)(*p++ - '0');
	return v;
}

void *mem_alloc(uint32_t size, uint32_t align)
{
	uint32_t a = (mem_next + align - 1) & ~(align - 1);

	if (a < mem_next || a + size < a || a + size > mem_end) {
		con_puts("out of guest memory: want ");
		con_dec(size);
		con_puts(" bytes at ");
		con_hex(a, 8);
		con_puts(", memory ends at ");
		con_hex(mem_end, 8);
		con_putc('\n');
		guest_exit(1);
	}
	mem_next = a + size;
	return (void *)a;
}

void *mem_zalloc(uint32_t size, uint32_t align)
{
	void *p = mem_alloc(size, align);

	memset(p, 0, size);
	return p;
}

void *memset(void *d, int c, size_t n)
{
	uint32_t w = (uint8_t)c * 0x01010101u;
	size_t words = n / 4, rest = n % 4;
	void *p = d;

	__asm__ volatile("rep stosl"
			 : "+D"(p), "+c"(words)
			 : "a"(w)
			 : "memory");
	__asm__ volatile("rep stosb"
			 : "+D"(p), "+c"(rest)
			 : "a"(w)
			 : "memory");
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	void *ret = d;
	size_t words = n / 4, rest = n % 4;

	__asm__ volatile("rep movsl"
			 : "+D"(d), "+S"(s), "+c"(words)
			 :
			 : "memory");
	__asm__ volatile("rep movsb"
			 : "+D"(d), "+S"(s), "+c"(rest)
			 :
			 : "memory");
	return ret;
}

/* ------------------------------------------------------------------ */
/* Interrupts                                                          */

#define PIC1_CMD	0x20
#define PIC1_DATA	0x21
#define PIC2_CMD	0xa0
#define PIC2_DATA	0xa1
#define PIC_EOI		0x20

#define MAX_LINE_HANDLERS 4

struct handler {
	irq_handler fn;
	void *arg;
};

static struct handler vector_handlers[256];
static struct handler line_handlers[16][MAX_LINE_HANDLERS];
static uint16_t pic_mask = 0xffff;
volatile uint32_t irq_stray;

struct idt_gate {
	uint16_t off_lo;
	uint16_t sel;
	uint16_t flags;
	uint16_t off_hi;
};

static struct idt_gate idt[256] __attribute__((aligned(8)));

/*
 * Entry stubs, 16 bytes apart: each pushes its vector number and jumps
 * to irq_entry, which saves the registers and calls irq_dispatch with a
 * pointer to the saved frame (pushal block, vector, then what the CPU
 * pushed).
 *
 * The return path avoids IRET: KVM on some hosts (kvm_pvm) cannot
 * emulate a protected-mode IRET.  Interrupts taken here never change
 * privilege, so the CPU frame is EIP, CS, EFLAGS; it is rewritten in
 * place into EFLAGS (with IF cleared), EIP, and the stub returns with
 * POPF and RET, putting IF back with STI just before the RET when it
 * was set.  STI's one-instruction shadow covers the RET, so returns do
 * not nest.
 */
__asm__(
	"	.text\n"
	"	.balign	16\n"
	"irq_stubs:\n"
	"	.set	.Lirq_vec, 0\n"
	"	.rept	256\n"
	"	.balign	16\n"
	"	pushl	$.Lirq_vec\n"
	"	jmp	irq_entry\n"
	"	.set	.Lirq_vec, .Lirq_vec + 1\n"
	"	.endr\n"
	"irq_entry:\n"
	"	pushal\n"
	"	cld\n"
	"	pushl	%esp\n"			/* frame pointer argument */
	"	call	irq_dispatch\n"
	"	addl	$4, %esp\n"
	"	popal\n"
	"	addl	$4, %esp\n"		/* vector; now EIP, CS, EFLAGS */
	"	pushl	%eax\n"		/* EAX, EIP, CS, EFLAGS */
	"	movl	4(%esp), %eax\n"
	"	xchgl	%eax, 12(%esp)\n"	/* EIP into the EFLAGS slot */
	"	movl	%eax, 8(%esp)\n"	/* EFLAGS into the CS slot */
	"	popl	%eax\n"
	"	addl	$4, %esp\n"		/* now EFLAGS, EIP */
	"	btrl	$9, (%esp)\n"		/* IF off; CF = IF before */
	"	jc	1f\n"
	"	popfl\n"
	"	ret\n"
	"1:	popfl\n"
	"	sti\n"
	"	ret\n");

extern char irq_stubs[];
void irq_dispatch(uint32_t *frame) __attribute__((used));

static int has_error_code(uint32_t v)
{
	return v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 ||
	       v == 29 || v == 30;
}

static void pic_eoi(uint32_t irq)
{
	if (irq >= 8)
		outb(PIC2_CMD, PIC_EOI);
	outb(PIC1_CMD, PIC_EOI);
}

void irq_dispatch(uint32_t *frame)
{
	uint32_t vec = frame[8];
	uint32_t i;

	if (vec < 32) {
		uint32_t *cpu = &frame[9];

		con_puts("exception ");
		con_dec(vec);
		if (has_error_code(vec)) {
			con_puts(" error ");
			con_hex(*cpu++, 8);
		}
		con_puts(" eip ");
		con_hex(cpu[0], 8);
		con_putc('\n');
		guest_exit(3);
	}
	if (vec >= PIC_VECTOR_BASE && vec < PIC_VECTOR_BASE + 16) {
		uint32_t irq = vec - PIC_VECTOR_BASE;
		int handled = 0;

		if ((irq & 7) == 7) {
			/* IRQ7/15 with the in-service bit clear are spurious. */
			uint16_t cmd = irq == 7 ? PIC1_CMD : PIC2_CMD;

			outb(cmd, 0x0b);	/* OCW3: read ISR */
			if (!(inb(cmd) & 0x80)) {
				if (irq == 15)
					outb(PIC1_CMD, PIC_EOI);
				return;
			}
		}
		for (i = 0; i < MAX_LINE_HANDLERS; i++) {
			if (line_handlers[irq][i].fn) {
				line_handlers[irq][i].fn(line_handlers[irq][i].arg);
				handled = 1;
			}
		}
		if (!handled)
			irq_stray++;
		pic_eoi(irq);
		return;
	}
	if (vec == SPURIOUS_VECTOR)
		return;			/* APIC spurious: no EOI */
	if (vector_handlers[vec].fn)
		vector_handlers[vec].fn(vector_handlers[vec].arg);
	else
		irq_stray++;
	mmio_write32(LAPIC_BASE + LAPIC_EOI, 0);
}

void irq_init(void)
{
	struct {
		uint16_t limit;
		uint32_t base;
	} __attribute__((packed)) desc;
	uint32_t i;

	for (i = 0; i < 256; i++) {
		uint32_t a = (uint32_t)irq_stubs + 16 * i;

		idt[i].off_lo = (uint16_t)a;
		idt[i].sel = 0x08;
		idt[i].flags = 0x8e00;	/* present, DPL 0, 32-bit interrupt gate */
		idt[i].off_hi = (uint16_t)(a >> 16);
	}
	desc.limit = sizeof(idt) - 1;
	desc.base = (uint32_t)idt;
	__asm__ volatile("lidt %0" : : "m"(desc));

	/* 8259 pair: edge (ELCR decides per line), vectors 0x20/0x28. */
	outb(PIC1_CMD, 0x11);
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, PIC_VECTOR_BASE);
	outb(PIC2_DATA, PIC_VECTOR_BASE + 8);
	outb(PIC1_DATA, 0x04);		/* slave on IRQ2 */
	outb(PIC2_DATA, 0x02);
	outb(PIC1_DATA, 0x01);		/* 8086 mode, normal EOI */
	outb(PIC2_DATA, 0x01);
	pic_mask = 0xffff;
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);

	/* Local APIC on (MSI delivery), 8259 through LINT0 (virtual wire). */
	mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
	mmio_write32(LAPIC_BASE + LAPIC_LVT0, 0x700);
}

void irq_set_vector(uint8_t vector, irq_handler fn, void *arg)
{
	vector_handlers[vector].fn = fn;
	vector_handlers[vector].arg = arg;
}

void irq_add_line(uint8_t irq, irq_handler fn, void *arg)
{
	uint32_t i, slot = MAX_LINE_HANDLERS;

	if (irq >= 16 || irq == 2)
		fail("irq: line out of range or the cascade");
	for (i = 0; i < MAX_LINE_HANDLERS; i++) {
		if (line_handlers[irq][i].fn == fn && line_handlers[irq][i].arg == arg)
			return;
		if (!line_handlers[irq][i].fn && slot == MAX_LINE_HANDLERS)
			slot = i;
	}
	if (slot == MAX_LINE_HANDLERS)
		fail("irq: too many handlers on one line");
	line_handlers[irq][slot].arg = arg;
	line_handlers[irq][slot].fn = fn;
	pic_mask &= (uint16_t)~(1u << irq);
	if (irq >= 8)
		pic_mask &= (uint16_t)~(1u << 2);
	outb(PIC1_DATA, (uint8_t)pic_mask);
	outb(PIC2_DATA, (uint8_t)(pic_mask >> 8));
}
