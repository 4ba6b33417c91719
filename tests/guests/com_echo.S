/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * com_echo: polled echo on a 16550 (no interrupts): every byte received is sent
 * back.
 *
 *   ready                  (UART initialised: send now)
 *   echoed <n>             (after n bytes; then exit 0)
 *
 * `port=` the UART's base port, decimal (default 760 = 0x2F8, COM2); `n=` bytes
 * to echo before exiting (default 16).  The UART is set up with the FIFO on,
 * 8N1, MCR DTR|RTS (OUT2 off: no interrupt line), IER 0.
 */

	.include "guest.inc"

	.equ	UART_DATA,	0
	.equ	UART_IER,	1
	.equ	UART_FCR,	2
	.equ	UART_LCR,	3
	.equ	UART_MCR,	4
	.equ	UART_LSR,	5
	.equ	LSR_DR,		0x01
	.equ	LSR_THRE,	0x20

/* OUT_REG reg, imm8: write to port uart_port + reg (clobbers AL, DX) */
.macro OUT_REG reg, val
	movw	uart_port, %dx
	addw	$\reg, %dx
	movb	$\val, %al
	outb	%al, %dx
.endm

	.text
	.globl	main
main:
	pushl	%ebx
	pushl	%esi
	.pushsection .rodata
.Lport_key:
	.asciz	"port="
.Ln_key:
	.asciz	"n="
	.popsection
	movl	$.Lport_key, %esi
	movl	$0x2f8, %eax
	call	cmdline_num
	movw	%ax, uart_port
	movl	$.Ln_key, %esi
	movl	$16, %eax
	call	cmdline_num
	movl	%eax, %ebx			/* bytes left */

	OUT_REG	UART_IER, 0x00
	OUT_REG	UART_LCR, 0x80			/* DLAB: divisor 1 */
	OUT_REG	UART_DATA, 0x01
	OUT_REG	UART_IER, 0x00
	OUT_REG	UART_LCR, 0x03			/* 8N1 */
	OUT_REG	UART_FCR, 0x07			/* FIFO on, both cleared */
	OUT_REG	UART_MCR, 0x03			/* DTR, RTS */
	PUTS_LIT "ready\n"
	xorl	%esi, %esi			/* bytes echoed */

1:	testl	%ebx, %ebx
	jz	3f
	movw	uart_port, %dx
	addw	$UART_LSR, %dx
2:	inb	%dx, %al
	testb	$LSR_DR, %al
	jz	2b
	movw	uart_port, %dx
	inb	%dx, %al			/* RBR */
	movb	%al, %cl
	addw	$UART_LSR, %dx
4:	inb	%dx, %al
	testb	$LSR_THRE, %al
	jz	4b
	movw	uart_port, %dx
	movb	%cl, %al
	outb	%al, %dx			/* THR */
	incl	%esi
	decl	%ebx
	jmp	1b

3:	PUTS_LIT "echoed "
	PUT_DEC	%esi
	PUTS_LIT "\n"
	xorl	%eax, %eax
	popl	%esi
	popl	%ebx
	ret

	.data
uart_port:
	.word	0
