/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * counter: a PIT-driven counter for save/restore tests.  Paging on, IDT,
 * 8259 remapped to 0x20-0x2F, PIT channel 0 mode 2 at ~100 Hz (IRQ 0).
 * On COM1 (and on the debug console with `debugcon=1`):
 *
 *   counter start
 *   count 1
 *   count 2              (one line every `every=` ticks, default 10)
 *   ...
 *
 * N comes from a variable incremented once per line, never from time, so
 * a pause or a save/restore cannot skip or repeat a value.  Exits with 0
 * after `limit=` lines (default 0 = run forever).
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	call	ctr_setup
	call	ctr_timer_setup
	movl	$.Lstart_msg, %esi
	call	ctr_puts
	sti

.Lloop:
	call	ctr_wait_tick
	jnc	.Lloop
	incl	count
	movl	$.Lcount_msg, %esi
	call	ctr_puts
	movl	count, %eax
	call	ctr_putdec
	movb	$'\n', %al
	call	ctr_putc
	movl	ctr_limit, %eax
	testl	%eax, %eax
	jz	.Lloop
	cmpl	%eax, count
	jb	.Lloop
	cli
	xorl	%eax, %eax
	ret

	.section .rodata
.Lstart_msg:
	.asciz	"counter start\n"
.Lcount_msg:
	.asciz	"count "

	.data
	.balign	4
count:
	.long	0

	.include "counter_lib.S"
