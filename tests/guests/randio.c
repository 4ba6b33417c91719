/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * randio: random port I/O at the built-in devices.  An xorshift32 generator
 * (seed= on the command line, default 1) picks n= accesses (default 100000):
 * a port in the range of one of the devices below, or up to 2 ports around
 * it, a width of 1, 2 or 4 bytes, in or out, and a value.  Writes that would
 * end the run are left out or defused: the reset ports (0xCF9 is not aimed
 * at; port 0x92 keeps bit 0 clear), the keyboard controller's reset pulses
 * (0xF0-0xFF) and output-port command (0xD1) at 0x64, ACPI sleep (SLP_EN
 * cleared at 0x604/0x605), pc-testdev's exit port 0xF4 (not aimed at) and
 * fw_cfg's DMA trigger 0x518-0x51B (only read).  Then COM1 is set up again
 * (the run reprograms it at random) and prints, on COM1 and the debug console,
 *
 *   randio done N accesses (W writes) seed S
 *
 * and the guest exits 0.
 */
#include "libc.h"

#define COM1 0x3f8

struct span {
	uint16_t base, length;
};

/* The built-in devices' ports (BASE_ARGS plus -s N,uart, fwcfg, COM1-4). */
static const struct span spans[] = {
	{0x60, 1},	/* keyboard controller data */
	{0x64, 1},	/* keyboard controller command */
	{0x70, 2},	/* RTC index, data */
	{0x92, 1},	/* system control port A */
	{0xb2, 1},	/* ACPI SMI_CMD */
	{0xe0, 8},	/* pc-testdev scratch, page flush */
	{0x2e8, 8}, {0x2f8, 8}, {0x3e8, 8}, {0x3f8, 8},	/* COM4, COM2, COM3, COM1 */
	{0x402, 1},	/* debug console */
	{0x510, 2},	/* fw_cfg selector, data */
	{0x514, 8},	/* fw_cfg DMA address (writes to its high half only) */
	{0x600, 16},	/* ACPI PM1a event, control, PM timer, GPE0 */
	{0xcf8, 1},	/* PCI config address */
	{0xcfc, 4},	/* PCI config data */
	{0x2000, 0x40},	/* pc-testdev IRQ lines, then the PCI I/O BARs */
};

static uint32_t rng_state;

static uint32_t xorshift32(void)
{
	uint32_t x = rng_state;

	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	return rng_state = x;
}

/* A write of v (width size) at port: would it end the run?  Defuse it. */
static int defuse(uint16_t port, uint32_t *v)
{
	if (port == 0xcf9 || (port >= 0xf4 && port <= 0xf7) ||
	    (port >= 0x518 && port <= 0x51b))
		return 0;
	if (port == 0x92)
		*v &= ~1u;
	if (port == 0x64 && ((*v & 0xff) >= 0xf0 || (*v & 0xff) == 0xd1))
		return 0;
	if (port == 0x604)
		*v &= ~0x2000u;
	if (port == 0x605)
		*v &= ~0x20u;
	return 1;
}

static void com1_putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))
		;
	outb(COM1, c);
}

static void com1_puts(const char *s)
{
	for (; *s; s++)
		com1_putc(*s);
}

static void com1_dec(uint32_t v)
{
	char digits[10];
	int n = 0;

	do {
		digits[n++] = '0' + v % 10;
		v /= 10;
	} while (v);
	while (n)
		com1_putc(digits[--n]);
}

static void report(uint32_t n, uint32_t writes, uint32_t seed)
{
	/* 115200 8N1, FIFO on, no loopback, no interrupts: whatever the run left */
	outb(COM1 + 3, 0x80);
	outb(COM1 + 0, 1);
	outb(COM1 + 1, 0);
	outb(COM1 + 3, 0x03);
	outb(COM1 + 1, 0);
	outb(COM1 + 2, 0x07);
	outb(COM1 + 4, 0x03);
	com1_puts("\r\nrandio done ");
	com1_dec(n);
	com1_puts(" accesses (");
	com1_dec(writes);
	com1_puts(" writes) seed ");
	com1_dec(seed);
	com1_puts("\r\n");
	con_puts("\nrandio done ");
	con_dec(n);
	con_puts(" accesses (");
	con_dec(writes);
	con_puts(" writes) seed ");
	con_dec(seed);
	con_putc('\n');
}

int main(void)
{
	uint32_t n, seed, i, writes = 0;

	opt_init();
	n = opt_num("n=", 100000);
	seed = opt_num("seed=", 1);
	rng_state = seed ? seed : 1;
	for (i = 0; i < n; i++) {
		uint32_t r = xorshift32();
		const struct span *s = &spans[r % (sizeof(spans) / sizeof(spans[0]))];
		uint32_t pick = xorshift32(), v = xorshift32();
		uint16_t port = s->base + (pick >> 8) % s->length;
		int size = 1 << ((pick & 3) % 3);	/* 1, 2, 4, 1 */

		if ((pick >> 4 & 7) == 0)	/* around the range */
			port = (pick >> 7 & 1) ? s->base + s->length + (pick >> 8 & 1)
					       : s->base - 1 - (pick >> 8 & 1);
		if (pick >> 2 & 1) {	/* a read */
			if (size == 1)
				(void)inb(port);
			else if (size == 2)
				(void)inw(port);
			else
				(void)inl(port);
			continue;
		}
		if (!defuse(port, &v))
			continue;
		writes++;
		if (size == 1)
			outb(port, v);
		else if (size == 2)
			outw(port, v);
		else
			outl(port, v);
	}
	report(n, writes, seed);
	return 0;
}
