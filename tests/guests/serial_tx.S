/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * serial_tx: transmit `n=` bytes (default 65536) of the pattern
 * byte[i] = (i * 7 + (i >> 8)) & 0xff through THR, polled (IER 0).
 *
 *   uart <port hex4> irq <dec>
 *   tx done <n>
 *
 * mode=rep (default): per chunk of up to 4096 bytes, fill a 4 KiB buffer,
 *   wait for LSR.THRE once, then one `rep outsb`.
 * mode=byte: one `outb` per byte, waiting for LSR.THRE before every burst
 *   of 16 bytes (the FIFO size), or before every byte with `fifo=0`.
 * Any other mode= value means rep.  mode=rep relies on hvf's THR never
 * filling up: a real 16550 (or QEMU's) drops most of each 4 KiB burst.
 * Exit 0 (1 if the UART setup failed).
 */

	.include "guest.inc"
	.include "serial_lib.S"

	.equ	TX_CHUNK, 4096

	.text
	.globl	main
main:
	pushl	%ebx
	pushl	%esi
	pushl	%edi
	pushl	%ebp
	call	serial_setup
	testl	%eax, %eax
	jnz	.Lret

	movl	$.Lkey_n, %esi
	movl	$65536, %eax
	call	serial_cmdline_num
	movl	%eax, %ebp			/* n */

	movl	$.Lkey_mode_byte, %esi
	call	serial_cmdline_find
	testl	%eax, %eax
	jz	.Lrep
	movb	(%eax), %al			/* "mode=byte" must end the word */
	testb	%al, %al
	jz	.Lbyte
	cmpb	$' ', %al
	je	.Lbyte

.Lrep:
	xorl	%ebx, %ebx			/* i */
1:	movl	%ebp, %ecx
	subl	%ebx, %ecx
	jz	.Ldone
	cmpl	$TX_CHUNK, %ecx
	jbe	2f
	movl	$TX_CHUNK, %ecx
2:	/*
	 * Fill tx_buf[0..ECX) with pattern(EBX + j).  EBX is a multiple of
	 * 256: within a run of 256 the byte grows by 7, and 256 * 7 wraps to
	 * 0, so the next run starts 1 higher.
	 */
	pushl	%ecx
	movl	%ecx, %edx			/* bytes left to fill */
	movl	$tx_buf, %edi
	call	tx_pattern			/* AL = pattern(EBX) */
3:	movl	$256, %ecx
	cmpl	%ecx, %edx
	jae	4f
	movl	%edx, %ecx
4:	subl	%ecx, %edx
5:	stosb
	addb	$7, %al
	loop	5b
	incb	%al
	testl	%edx, %edx
	jnz	3b
	popl	%ecx
	call	tx_wait_thre
	movw	uart_base, %dx
	movl	$tx_buf, %esi
	addl	%ecx, %ebx
	rep outsb
	jmp	1b

.Lbyte:
	xorl	%ebx, %ebx			/* i */
	movw	uart_base, %si			/* SI = THR port */
	xorl	%edi, %edi			/* burst - 1: 0 without the FIFO */
	cmpl	$0, uart_fifo
	je	1f
	movl	$15, %edi
1:	cmpl	%ebp, %ebx
	jae	.Ldone
	testl	%edi, %ebx
	jnz	2f
	call	tx_wait_thre
2:	call	tx_pattern
	movw	%si, %dx
	outb	%al, %dx
	incl	%ebx
	jmp	1b

.Ldone:
	PUTS_LIT "tx done "
	PUT_DEC	%ebp
	PUTS_LIT "\n"
	xorl	%eax, %eax
.Lret:
	popl	%ebp
	popl	%edi
	popl	%esi
	popl	%ebx
	ret

/* tx_pattern(EBX = i) -> AL = (i * 7 + (i >> 8)) & 0xff; keeps the rest. */
tx_pattern:
	pushl	%edx
	leal	(,%ebx,8), %eax
	subl	%ebx, %eax
	movl	%ebx, %edx
	shrl	$8, %edx
	addl	%edx, %eax
	popl	%edx
	ret

/* tx_wait_thre(): spin until LSR.THRE; keeps all registers. */
tx_wait_thre:
	pushl	%eax
	pushl	%edx
	movw	uart_base, %dx
	addw	$UART_LSR, %dx
1:	inb	%dx, %al
	testb	$LSR_THRE, %al
	jz	1b
	popl	%edx
	popl	%eax
	ret

/* serial_tx takes no UART interrupts (IER stays 0). */
	.globl	uart_isr
uart_isr:
	ret

	.section .rodata
.Lkey_n:
	.asciz	"n="
.Lkey_mode_byte:
	.asciz	"mode=byte"

	.bss
	.balign	16
tx_buf:
	.skip	TX_CHUNK
