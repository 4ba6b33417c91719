/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * io: port I/O widths and string I/O against the scratch register.
 *
 *   io ok | io FAIL <op> wrote <hex> read <hex>
 *   rep outsb through the debug console ok!     (40 bytes via rep outsb)
 *   string io ok | string io FAIL
 *
 * Exits 0 if everything passed, 1 otherwise.
 */

	.include "guest.inc"

	.equ	OUTSB_LEN, 40

	.text
	.globl	main
main:
	xorl	%ebp, %ebp			/* failure flag */
	movw	$SCRATCH_PORT, %dx

	/* 32-bit round trip */
	movl	$0x12345678, %eax
	outl	%eax, %dx
	xorl	%eax, %eax
	inl	%dx, %eax
	cmpl	$0x12345678, %eax
	je	1f
	PUTS_LIT "io FAIL outl wrote 12345678 read "
	PUT_HEX	%eax, 8
	jmp	.Lio_fail
1:
	/* 16-bit round trip */
	movw	$0xbeef, %ax
	outw	%ax, %dx
	xorl	%eax, %eax
	inw	%dx, %ax
	cmpw	$0xbeef, %ax
	je	2f
	PUTS_LIT "io FAIL outw wrote beef read "
	PUT_HEX	%eax, 4
	jmp	.Lio_fail
2:
	/* 8-bit round trip */
	movb	$0x5a, %al
	outb	%al, %dx
	xorl	%eax, %eax
	inb	%dx, %al
	cmpb	$0x5a, %al
	je	3f
	PUTS_LIT "io FAIL outb wrote 5a read "
	PUT_HEX	%eax, 2
	jmp	.Lio_fail
3:
	PUTS_LIT "io ok\n"
	jmp	.Lstring

.Lio_fail:
	PUTS_LIT "\n"
	movl	$1, %ebp

.Lstring:
	xorl	%ebx, %ebx			/* string I/O failure flag */

	/* rep outsb: 40 bytes to the debug console */
	movl	$outsb_msg, %esi
	movl	$OUTSB_LEN, %ecx
	movw	$DEBUGCON_PORT, %dx
	rep outsb
	testl	%ecx, %ecx
	jz	1f
	orl	$1, %ebx
1:	cmpl	$outsb_msg + OUTSB_LEN, %esi
	je	2f
	orl	$2, %ebx
2:
	/* rep outsl: 4 dwords to the scratch register; the last one sticks */
	movl	$outsl_data, %esi
	movl	$4, %ecx
	movw	$SCRATCH_PORT, %dx
	rep outsl
	testl	%ecx, %ecx
	jz	1f
	orl	$4, %ebx
1:	cmpl	$outsl_data + 16, %esi
	je	2f
	orl	$8, %ebx
2:	xorl	%eax, %eax
	inl	%dx, %eax
	cmpl	outsl_data + 12, %eax
	je	3f
	orl	$0x10, %ebx
3:
	/* rep insb: 4 bytes, each the low byte of the scratch value */
	movl	$0xcccccccc, insb_buf
	movl	$0xcccccccc, insb_buf + 4	/* guard */
	movl	$insb_buf, %edi
	movl	$4, %ecx
	rep insb
	testl	%ecx, %ecx
	jz	1f
	orl	$0x20, %ebx
1:	cmpl	$insb_buf + 4, %edi
	je	2f
	orl	$0x40, %ebx
2:	cmpl	$0xf7f7f7f7, insb_buf		/* low byte of outsl_data[3] */
	je	3f
	orl	$0x80, %ebx
3:	cmpl	$0xcccccccc, insb_buf + 4
	je	4f
	orl	$0x100, %ebx
4:
	testl	%ebx, %ebx
	jnz	5f
	PUTS_LIT "string io ok\n"
	jmp	6f
5:	PUTS_LIT "string io FAIL\n"
	movl	$1, %ebp
6:
	movl	%ebp, %eax
	ret

	.section .rodata
outsb_msg:
	.ascii	"rep outsb through the debug console ok!\n"
outsb_msg_end:
	.if	outsb_msg_end - outsb_msg - OUTSB_LEN
	.error	"outsb message must be exactly 40 bytes"
	.endif

	.balign	4
outsl_data:
	.long	0x11111111, 0x22222222, 0x33333333, 0xa5c3e1f7

	.bss
	.balign	4
insb_buf:
	.skip	8
