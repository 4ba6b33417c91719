/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * counter_smp: `counter` with a second CPU (run with -c 2).  The BSP sets
 * up paging, the IDT, the 8259 and the PIT like `counter`, prints
 * `counter start`, then starts the AP with INIT/SIPI/SIPI.  The AP turns
 * on the same paging and counts: it increments `ap_counter` once per loop
 * iteration (with a PAUSE), and after every AP_BURST increments it spins
 * for AP_DELAY further PAUSEs.  Every `every=` ticks the BSP prints on COM1
 * (and on the debug console with `debugcon=1`)
 *
 *   count N ap M
 *
 * N: the BSP's line counter (1, 2, 3, ...); M: ap_counter read at that
 * moment (non-decreasing).  Exits with 0 after `limit=` lines (default 0 =
 * forever).  If no AP checks in within 500 ticks (~5 s) it prints
 * `counter_smp: no AP` and exits with 3.  Only the first AP to arrive
 * counts; any further APs halt.
 */

	.include "guest.inc"

	.equ	TRAMP_ADDR,	0x8000		/* real-mode trampoline */
	.equ	SIPI_VECTOR,	(TRAMP_ADDR >> 12)
	.equ	ICR_INIT_ALL_BUT_SELF,	0x000c4500
	.equ	ICR_SIPI_ALL_BUT_SELF,	0x000c4600
	.equ	ICR_BUSY,	(1 << 12)
	.equ	AP_WAIT_TICKS,	500
	.equ	AP_BURST,	4096		/* increments between delays */
	.equ	AP_DELAY,	4096		/* PAUSEs per delay */

	.text
	.globl	main
main:
	call	ctr_setup
	call	ctr_timer_setup
	movl	$.Lstart_msg, %esi
	call	ctr_puts
	sti

	/* Trampoline below 1 MiB, with a copy of the GDT descriptor. */
	movl	$tramp_start, %esi
	movl	$TRAMP_ADDR, %edi
	movl	$(tramp_end - tramp_start), %ecx
	rep movsb
	movl	$ctr_gdt_desc, %esi
	movl	$(TRAMP_ADDR + tramp_gdt_desc - tramp_start), %edi
	movl	$6, %ecx
	rep movsb

	/* INIT, ~10 ms, SIPI, short wait, SIPI */
	movl	$0, LAPIC_BASE + LAPIC_ICR_HI
	movl	$ICR_INIT_ALL_BUT_SELF, %eax
	call	send_ipi
	movl	ctr_ticks, %ebx
1:	hlt					/* IF=1: woken by the PIT */
	movl	ctr_ticks, %eax
	subl	%ebx, %eax
	cmpl	$2, %eax
	jb	1b
	movl	$(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), %eax
	call	send_ipi
	movl	$2000, %ecx
	call	delay
	movl	$(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), %eax
	call	send_ipi

	/* Wait for the AP to reach its loop. */
	movl	ctr_ticks, %ebx
2:	cmpl	$0, ap_started
	jne	.Lap_up
	movl	ctr_ticks, %eax
	subl	%ebx, %eax
	cmpl	$AP_WAIT_TICKS, %eax
	jae	.Lno_ap
	hlt
	jmp	2b

.Lno_ap:
	movl	$.Lno_ap_msg, %esi
	call	ctr_puts
	cli
	movl	$3, %eax
	ret

.Lap_up:
	movl	ctr_ticks, %eax			/* first line `every` ticks from now */
	movl	%eax, ctr_last_tick
.Lloop:
	call	ctr_wait_tick
	jnc	.Lloop
	incl	count
	movl	$.Lcount_msg, %esi
	call	ctr_puts
	movl	count, %eax
	call	ctr_putdec
	movl	$.Lap_msg, %esi
	call	ctr_puts
	movl	ap_counter, %eax
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

/* send_ipi(EAX = ICR low): write ICR and wait (bounded) for delivery. */
send_ipi:
	pushl	%ecx
	movl	%eax, LAPIC_BASE + LAPIC_ICR_LO
	movl	$10000, %ecx
1:	testl	$ICR_BUSY, LAPIC_BASE + LAPIC_ICR_LO
	jz	2f
	pause
	loop	1b
2:	popl	%ecx
	ret

/* ------------------------------------------------------------------ */
/* AP: 32-bit protected mode, paging off, IF=0 (from the trampoline).  */

ap_entry32:
	movw	$DATA_SEL, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %fs
	movw	%ax, %gs
	movw	%ax, %ss
	cld
	movl	$1, %eax
	lock xaddl %eax, ap_ticket
	testl	%eax, %eax
	jnz	halt_forever			/* not the first AP */
	movl	$ap_stack_top, %esp
	call	ctr_paging_on
	call	ctr_load_idt
	movl	$1, ap_started
.Lap_loop:
	movl	$AP_BURST, %ecx
1:	incl	ap_counter			/* the only writer */
	pause
	loop	1b
	movl	$AP_DELAY, %ecx
	call	delay
	jmp	.Lap_loop

/* ------------------------------------------------------------------ */
/* Real-mode trampoline, copied to TRAMP_ADDR; entered at CS=0x0800:0.  */

	.balign	16
tramp_start:
	.code16
	cli
	cld
	xorw	%ax, %ax
	movw	%ax, %ds
	lgdtl	TRAMP_ADDR + tramp_gdt_desc - tramp_start
	movl	%cr0, %eax
	orl	$1, %eax			/* PE */
	movl	%eax, %cr0
	ljmpl	$CODE_SEL, $ap_entry32
	.balign	4
	.word	0
tramp_gdt_desc:					/* filled from ctr_gdt_desc */
	.word	0
	.long	0
tramp_end:
	.code32

	.section .rodata
.Lstart_msg:
	.asciz	"counter start\n"
.Lcount_msg:
	.asciz	"count "
.Lap_msg:
	.asciz	" ap "
.Lno_ap_msg:
	.asciz	"counter_smp: no AP\n"

	.data
	.balign	4
count:
	.long	0
ap_ticket:
	.long	0
ap_started:
	.long	0
	.balign	64				/* own cache line */
ap_counter:
	.long	0
	.balign	64

	.bss
	.balign	16
ap_stack:
	.skip	4096
ap_stack_top:

	.include "counter_lib.S"
