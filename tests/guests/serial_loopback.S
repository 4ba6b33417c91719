/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * serial_loopback: the 16550's internal loopback, polled (no interrupts).
 *
 *   uart <port hex4> irq <dec>
 *   loopback ok                      or   loopback FAIL <detail>
 *
 * 1. MCR = LOOP|OUT2|OUT1|RTS|DTR (0x1F): MSR & 0xF0 must be 0xF0.
 * 2. Eight distinct bytes through THR -> RBR, LSR.DR checked before each
 *    read: all eight written first with the FIFO on, one at a time with
 *    `fifo=0`.  Then LSR.DR must be clear.
 * 3. MCR = LOOP (0x10): MSR must read 0x0F (status 0; DCTS, DDSR, TERI and
 *    DDCD all reported), and 0x00 on the next read (deltas cleared).
 * 4. Overrun: with the FIFO on, 17 bytes; with `fifo=0`, 2 bytes.  LSR must
 *    show OE (with DR) and the next LSR read must not.  The receiver then
 *    holds the first 16 bytes (FIFO: the 17th is lost) or the second byte
 *    (16450: the new byte overwrites RBR), and LSR.DR is clear after them.
 *
 * Details:  msr <got hex2> want <hex2>
 *           no data lsr <hex2> before byte <i>
 *           byte <i> wrote <hex2> read <hex2>
 *           data left lsr <hex2>
 *           overrun lsr <hex2> then <hex2>
 * Exit 0 if ok, 1 on FAIL (or if the UART setup failed).
 */

	.include "guest.inc"
	.include "serial_lib.S"

	.text
	.globl	main
main:
	pushl	%ebx
	pushl	%esi
	pushl	%edi
	call	serial_setup
	testl	%eax, %eax
	jnz	.Lret

	/* 1. all modem outputs looped back */
	UART_OUT UART_MCR, 0x1f
	UART_IN	UART_MSR
	andl	$0xf0, %eax
	movl	$0xf0, %ebx
	cmpl	%ebx, %eax
	jne	.Lfail_msr

	/* drain anything left over */
	call	lb_drain

	/* 2. eight bytes */
	cmpl	$0, uart_fifo
	je	.L16450
	xorl	%edi, %edi
1:	movb	lb_bytes(%edi), %al
	call	lb_put
	incl	%edi
	cmpl	$8, %edi
	jb	1b
	xorl	%edi, %edi
2:	call	lb_get_check
	jnz	.Lfail_out
	incl	%edi
	cmpl	$8, %edi
	jb	2b
	jmp	3f
.L16450:
	xorl	%edi, %edi
1:	movb	lb_bytes(%edi), %al
	call	lb_put
	call	lb_get_check
	jnz	.Lfail_out
	incl	%edi
	cmpl	$8, %edi
	jb	1b
3:	call	lb_check_empty
	jnz	.Lfail_out

	/* 3. outputs off: status 0, every delta reported, then cleared */
	UART_OUT UART_MCR, 0x10
	UART_IN	UART_MSR
	movzbl	%al, %eax
	movl	$0x0f, %ebx
	cmpl	%ebx, %eax
	jne	.Lfail_msr
	UART_IN	UART_MSR
	movzbl	%al, %eax
	xorl	%ebx, %ebx
	cmpl	%ebx, %eax
	jne	.Lfail_msr

	/* 4. overrun */
	movl	$2, %esi			/* bytes to write: capacity + 1 */
	cmpl	$0, uart_fifo
	je	1f
	movl	$17, %esi
1:	xorl	%edi, %edi
2:	movl	%edi, %eax
	imull	$0x35, %eax
	addb	$0x11, %al			/* byte i = i * 0x35 + 0x11 */
	call	lb_put
	incl	%edi
	cmpl	%esi, %edi
	jb	2b
	UART_IN	UART_LSR
	movzbl	%al, %ebx
	UART_IN	UART_LSR
	movzbl	%al, %ecx
	movl	%ebx, %eax
	andl	$LSR_OE | LSR_DR, %eax
	cmpl	$LSR_OE | LSR_DR, %eax
	jne	.Lfail_overrun
	testl	$LSR_OE, %ecx
	jnz	.Lfail_overrun
	/* what survived */
	cmpl	$0, uart_fifo
	je	3f
	xorl	%edi, %edi			/* FIFO: bytes 0..15 */
	movl	$16, %esi
	jmp	4f
3:	movl	$1, %edi			/* 16450: byte 1 only */
	movl	$2, %esi
4:	movl	%edi, %eax
	imull	$0x35, %eax
	addb	$0x11, %al
	call	lb_get_check_al
	jnz	.Lfail_out
	incl	%edi
	cmpl	%esi, %edi
	jb	4b
	call	lb_check_empty
	jnz	.Lfail_out

	PUTS_LIT "loopback ok\n"
	xorl	%eax, %eax
	jmp	.Lret

.Lfail_msr:
	PUTS_LIT "loopback FAIL msr "
	PUT_HEX	%eax, 2
	PUTS_LIT " want "
	PUT_HEX	%ebx, 2
	PUTS_LIT "\n"
	jmp	.Lfail_out
.Lfail_overrun:
	PUTS_LIT "loopback FAIL overrun lsr "
	PUT_HEX	%ebx, 2
	PUTS_LIT " then "
	PUT_HEX	%ecx, 2
	PUTS_LIT "\n"
.Lfail_out:
	movl	$1, %eax
.Lret:
	popl	%edi
	popl	%esi
	popl	%ebx
	ret

/* lb_put(AL): write THR. */
lb_put:
	pushl	%edx
	movw	uart_base, %dx
	outb	%al, %dx
	popl	%edx
	ret

/* lb_get_check(EDI = index): expect lb_bytes[EDI]; see lb_get_check_al. */
lb_get_check:
	movb	lb_bytes(%edi), %al
	/* fall through */
/*
 * lb_get_check_al(AL = expected, EDI = index): LSR.DR must be set, then RBR
 * must read AL.  Returns ZF=1 if so; otherwise prints the FAIL line and
 * returns ZF=0.  Preserves all registers but EFLAGS.
 */
lb_get_check_al:
	pushal
	movzbl	%al, %ebx			/* expected */
	UART_IN	UART_LSR
	testb	$LSR_DR, %al
	jnz	1f
	movzbl	%al, %eax
	PUTS_LIT "loopback FAIL no data lsr "
	PUT_HEX	%eax, 2
	PUTS_LIT " before byte "
	PUT_DEC	%edi
	PUTS_LIT "\n"
	jmp	8f
1:	UART_IN	UART_RBR
	movzbl	%al, %eax
	cmpl	%ebx, %eax
	je	9f
	PUTS_LIT "loopback FAIL byte "
	PUT_DEC	%edi
	PUTS_LIT " wrote "
	PUT_HEX	%ebx, 2
	PUTS_LIT " read "
	PUT_HEX	%eax, 2
	PUTS_LIT "\n"
8:	orl	$1, %eax			/* ZF = 0 */
	popal
	ret
9:	popal
	cmpl	%eax, %eax			/* ZF = 1 */
	ret

/* lb_check_empty(): ZF=1 if LSR.DR is clear, else prints FAIL, ZF=0. */
lb_check_empty:
	pushal
	UART_IN	UART_LSR
	movzbl	%al, %eax
	testb	$LSR_DR, %al
	jz	9f
	PUTS_LIT "loopback FAIL data left lsr "
	PUT_HEX	%eax, 2
	PUTS_LIT "\n"
	orl	$1, %eax
	popal
	ret
9:	popal
	cmpl	%eax, %eax
	ret

/* lb_drain(): read RBR while LSR.DR (at most 32 times). */
lb_drain:
	pushal
	movl	$32, %ecx
1:	UART_IN	UART_LSR
	testb	$LSR_DR, %al
	jz	2f
	UART_IN	UART_RBR
	loop	1b
2:	popal
	ret

/* The loopback guest takes no UART interrupts (IER stays 0). */
	.globl	uart_isr
uart_isr:
	ret

	.section .rodata
lb_bytes:
	.byte	0x00, 0xff, 0x55, 0xaa, 0x01, 0x80, 0x7e, 0xc3
