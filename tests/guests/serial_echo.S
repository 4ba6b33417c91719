/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * serial_echo: interrupt-driven echo of `n=` bytes (default 16).
 *
 *   uart <port hex4> irq <dec>
 *   ready                           (IER set, interrupts on: send now)
 *   iir <hex2>                      (IIR read in the first UART interrupt)
 *   echoed <count> bytes in <k> interrupts
 *
 * IER = received data available.  The handler reads IIR, then moves bytes
 * from RBR to THR while LSR.DR is set; after the n-th byte it writes IER 0
 * (so the line drops) and leaves any further input unread.  The main loop
 * only does `sti; hlt`.  Input that arrives before `ready` may be lost
 * (the FCR write resets the FIFO, as on a real 16550).  Exit 0 (1 if the UART setup failed).
 */

	.include "guest.inc"
	.include "serial_lib.S"

	.text
	.globl	main
main:
	call	serial_setup
	testl	%eax, %eax
	jnz	9f
	pushl	%esi
	movl	$.Lkey_n, %esi
	movl	$16, %eax
	call	serial_cmdline_num
	popl	%esi
	movl	%eax, echo_target

	UART_OUT UART_IER, 0x01
	sti
	PUTS_LIT "ready\n"			/* the host may send from now on */
1:	cli
	movl	echo_count, %eax
	cmpl	echo_target, %eax
	jae	2f
	sti
	hlt
	jmp	1b
2:	PUTS_LIT "iir "
	PUT_HEX	first_iir, 2
	PUTS_LIT "\nechoed "
	PUT_DEC	echo_count
	PUTS_LIT " bytes in "
	PUT_DEC	echo_irqs
	PUTS_LIT " interrupts\n"
	xorl	%eax, %eax
9:	ret

/* uart_isr: called by the interrupt stub (may clobber registers). */
	.globl	uart_isr
uart_isr:
	UART_IN	UART_IIR
	incl	echo_irqs
	cmpl	$1, echo_irqs
	jne	1f
	movzbl	%al, %eax
	movl	%eax, first_iir
1:	movl	echo_count, %ecx
	movl	echo_target, %ebx
	movw	uart_base, %si			/* SI = base, DX = base + LSR */
2:	cmpl	%ebx, %ecx
	jae	3f
	leaw	UART_LSR(%si), %dx
	inb	%dx, %al
	testb	$LSR_DR, %al
	jz	4f
	movw	%si, %dx
	inb	%dx, %al			/* RBR */
	outb	%al, %dx			/* THR */
	incl	%ecx
	jmp	2b
3:	UART_OUT UART_IER, 0x00			/* done: stop interrupting */
4:	movl	%ecx, echo_count
	ret

	.section .rodata
.Lkey_n:
	.asciz	"n="

	.bss
	.balign	4
echo_target:
	.skip	4
echo_count:
	.skip	4
echo_irqs:
	.skip	4
first_iir:
	.skip	4
