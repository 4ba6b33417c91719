/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * smp: read the CPU count from fw_cfg, start the APs with INIT/SIPI/SIPI
 * and wait for them to check in.
 *
 *   fwcfg QEMU cpus N             (the 4 signature bytes as read)
 *   ap apic id A                  (once per AP, in arrival order)
 *   bsp apic id B
 *   cpus up N                     (N = CPUs up, BSP included; exit 0)
 * or
 *   smp timeout up N              (exit 1)
 *
 * The wait is bounded by the TSC (2^34 cycles, a few seconds) and by an
 * iteration count, whichever comes first.
 */

	.include "guest.inc"

	.equ	TRAMP_ADDR,	0x8000		/* real-mode trampoline */
	.equ	SIPI_VECTOR,	(TRAMP_ADDR >> 12)
	.equ	ICR_INIT_ALL_BUT_SELF,	0x000c4500	/* shorthand 11, assert, INIT */
	.equ	ICR_SIPI_ALL_BUT_SELF,	0x000c4600	/* shorthand 11, assert, SIPI */
	.equ	ICR_BUSY,	(1 << 12)
	.equ	AP_STACK_SIZE,	1024
	.equ	MAX_AP_STACKS,	64
	.equ	WAIT_TSC_HI,	4		/* timeout: 4 << 32 TSC cycles */
	.equ	WAIT_MAX_ITER,	(1 << 27)

	.text
	.globl	main
main:
	/* fw_cfg signature and CPU count */
	PUTS_LIT "fwcfg "
	movw	$FWCFG_SEL_PORT, %dx
	movw	$FWCFG_SIGNATURE, %ax
	outw	%ax, %dx
	movw	$FWCFG_DATA_PORT, %dx
	movl	$4, %ecx
1:	inb	%dx, %al
	call	putc
	loop	1b

	movw	$FWCFG_SEL_PORT, %dx
	movw	$FWCFG_NB_CPUS, %ax
	outw	%ax, %dx
	movw	$FWCFG_DATA_PORT, %dx
	inb	%dx, %al
	movb	%al, %bl
	inb	%dx, %al
	movb	%al, %bh
	movzwl	%bx, %ebx
	PUTS_LIT " cpus "
	PUT_DEC	%ebx
	PUTS_LIT "\n"
	movl	%ebx, %ebp
	decl	%ebp				/* APs expected */
	jns	2f
	xorl	%ebp, %ebp
2:
	/* Software-enable the local APIC (spurious vector 0xff). */
	movl	LAPIC_BASE + LAPIC_SVR, %eax
	orl	$0x1ff, %eax
	movl	%eax, LAPIC_BASE + LAPIC_SVR

	/* Copy the trampoline below 1 MiB and give it our GDT descriptor. */
	movl	$tramp_start, %esi
	movl	$TRAMP_ADDR, %edi
	movl	$(tramp_end - tramp_start), %ecx
	rep movsb
	movl	$gdt_desc, %esi
	movl	$(TRAMP_ADDR + tramp_gdt_desc - tramp_start), %edi
	movl	$6, %ecx
	rep movsb

	/* INIT, wait, SIPI, wait, SIPI */
	movl	$0, LAPIC_BASE + LAPIC_ICR_HI
	movl	$ICR_INIT_ALL_BUT_SELF, %eax
	call	send_ipi
	movl	$10000, %ecx
	call	delay
	movl	$(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), %eax
	call	send_ipi
	movl	$2000, %ecx
	call	delay
	movl	$(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), %eax
	call	send_ipi

	/* Wait for the APs, bounded by TSC and by iterations. */
	rdtsc
	movl	%eax, %esi			/* start, low */
	movl	%edx, %edi			/* start, high */
	movl	$WAIT_MAX_ITER, %ecx
3:	cmpl	%ebp, ap_count
	jae	.Lall_up
	pause
	rdtsc
	subl	%esi, %eax
	sbbl	%edi, %edx
	cmpl	$WAIT_TSC_HI, %edx
	jae	.Ltimeout
	loop	3b

.Ltimeout:
	call	lock_acquire
	PUTS_LIT "smp timeout up "
	movl	ap_count, %eax
	incl	%eax
	call	putdec
	PUTS_LIT "\n"
	call	lock_release
	movl	$1, %eax
	ret

.Lall_up:
	call	lock_acquire
	PUTS_LIT "bsp apic id "
	movl	LAPIC_BASE + LAPIC_ID, %eax
	shrl	$24, %eax
	call	putdec
	PUTS_LIT "\ncpus up "
	movl	ap_count, %eax
	incl	%eax
	call	putdec
	PUTS_LIT "\n"
	call	lock_release
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

/* Console spinlock (all registers preserved). */
lock_acquire:
	pushl	%eax
1:	movl	$1, %eax
	xchgl	%eax, print_lock
	testl	%eax, %eax
	jz	3f
2:	pause
	cmpl	$0, print_lock
	jne	2b
	jmp	1b
3:	popl	%eax
	ret

lock_release:
	movl	$0, print_lock
	ret

/* ------------------------------------------------------------------ */
/* AP entry, 32-bit protected mode (reached from the trampoline).      */

ap_entry32:
	movw	$DATA_SEL, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %fs
	movw	%ax, %gs
	movw	%ax, %ss
	cld
	movl	$1, %eax
	lock xaddl %eax, ap_next_stack
	cmpl	$MAX_AP_STACKS, %eax
	jae	halt_forever			/* out of stacks: stay quiet */
	incl	%eax
	imull	$AP_STACK_SIZE, %eax
	addl	$ap_stacks, %eax
	movl	%eax, %esp

	movl	LAPIC_BASE + LAPIC_ID, %ebx
	shrl	$24, %ebx
	call	lock_acquire
	PUTS_LIT "ap apic id "
	PUT_DEC	%ebx
	PUTS_LIT "\n"
	lock incl ap_count
	call	lock_release
	jmp	halt_forever			/* cli; hlt forever */

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
tramp_gdt_desc:					/* filled from gdt_desc by the BSP */
	.word	0
	.long	0
tramp_end:
	.code32

	.data
	.balign	4
ap_count:
	.long	0
ap_next_stack:
	.long	0
print_lock:
	.long	0

	.bss
	.balign	16
ap_stacks:
	.skip	AP_STACK_SIZE * MAX_AP_STACKS
