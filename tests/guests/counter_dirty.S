/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * counter_dirty: a counter (as `counter`) that also dirties guest pages as fast
 * as it can, for live-migration tests and bench/migrate: between two lines it
 * increments the first word of one page of `pages=` (default 1024) after
 * another, from 32 MiB up, with `delay=` PAUSEs (default 0) between two pages.
 * It prints `count N` every `every=` PIT ticks (default 10, 0 reads as 1).
 */
	.include "guest.inc"
	.equ	DIRTY_BASE, 0x2000000

	.text
	.globl	main
main:
	call	ctr_setup
	movl	$key_pages, %esi
	movl	$1024, %eax
	call	cmdline_num
	movl	%eax, dirty_pages
	movl	$key_delay, %esi
	xorl	%eax, %eax
	call	cmdline_num
	movl	%eax, dirty_delay
	call	ctr_timer_setup
	movl	$start_msg, %esi
	call	ctr_puts
	sti
	xorl	%edi, %edi
loop:
	cli
	movl	ctr_ticks, %eax
	subl	ctr_last_tick, %eax
	cmpl	ctr_every, %eax
	jae	print
	sti
	movl	%edi, %eax
	shll	$12, %eax
	incl	DIRTY_BASE(%eax)
	incl	%edi
	cmpl	dirty_pages, %edi
	jb	1f
	xorl	%edi, %edi
1:	movl	dirty_delay, %ecx
	jecxz	loop
2:	pause
	loop	2b
	jmp	loop
print:
	movl	ctr_ticks, %eax
	movl	%eax, ctr_last_tick
	sti
	incl	count
	movl	$count_msg, %esi
	call	ctr_puts
	movl	count, %eax
	call	ctr_putdec
	movb	$'\n', %al
	call	ctr_putc
	jmp	loop

	.section .rodata
start_msg:
	.asciz	"counter start\n"
count_msg:
	.asciz	"count "
key_pages:
	.asciz	"pages="
key_delay:
	.asciz	"delay="

	.data
	.balign	4
count:
	.long	0
dirty_pages:
	.long	0
dirty_delay:
	.long	0

	.include "counter_lib.S"
