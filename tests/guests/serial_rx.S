/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * serial_rx: receive exactly `n=` bytes (default 65536) with interrupts and
 * hash them (32-bit FNV-1a: h = 0x811c9dc5; per byte h ^= b, h *= 0x01000193).
 *
 *   uart <port hex4> irq <dec>
 *   ready                                  (once; the host sends after it)
 *   rx <count dec> fnv <hash hex8> irqs <k dec>
 *
 * IER = received data available, FCR 0xC7 (trigger 14; `fifo=0`: none).
 * The handler reads RBR while LSR.DR is set; after the n-th byte it writes
 * IER 0 and leaves any further input unread.  The main loop only does
 * `sti; hlt`.  Exit 0 (1 if the UART setup failed).
 */

	.include "guest.inc"
	.include "serial_lib.S"

	.equ	FNV_BASIS,	0x811c9dc5
	.equ	FNV_PRIME,	0x01000193

	.text
	.globl	main
main:
	call	serial_setup
	testl	%eax, %eax
	jnz	9f
	pushl	%esi
	movl	$.Lkey_n, %esi
	movl	$65536, %eax
	call	serial_cmdline_num
	popl	%esi
	movl	%eax, rx_target
	movl	$FNV_BASIS, rx_hash

	UART_OUT UART_IER, 0x01
	sti
	PUTS_LIT "ready\n"
1:	cli
	movl	rx_count, %eax
	cmpl	rx_target, %eax
	jae	2f
	sti
	hlt
	jmp	1b
2:	PUTS_LIT "rx "
	PUT_DEC	rx_count
	PUTS_LIT " fnv "
	PUT_HEX	rx_hash, 8
	PUTS_LIT " irqs "
	PUT_DEC	rx_irqs
	PUTS_LIT "\n"
	xorl	%eax, %eax
9:	ret

/* uart_isr: called by the interrupt stub (may clobber registers). */
	.globl	uart_isr
uart_isr:
	incl	rx_irqs
	movl	rx_count, %ecx
	movl	rx_target, %ebx
	movl	rx_hash, %edi
	movw	uart_base, %si			/* SI = RBR, DX = LSR */
	leaw	UART_LSR(%si), %bp
1:	cmpl	%ebx, %ecx
	jae	3f
	movw	%bp, %dx
	inb	%dx, %al
	testb	$LSR_DR, %al
	jz	4f
	movw	%si, %dx
	inb	%dx, %al
	movzbl	%al, %eax
	xorl	%eax, %edi
	imull	$FNV_PRIME, %edi
	incl	%ecx
	jmp	1b
3:	UART_OUT UART_IER, 0x00			/* done: stop interrupting */
4:	movl	%ecx, rx_count
	movl	%edi, rx_hash
	ret

	.section .rodata
.Lkey_n:
	.asciz	"n="

	.bss
	.balign	4
rx_target:
	.skip	4
rx_count:
	.skip	4
rx_irqs:
	.skip	4
rx_hash:
	.skip	4
