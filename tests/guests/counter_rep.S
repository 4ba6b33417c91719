/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * counter_rep: numbered blocks sent to COM1 with one `rep outsb` each, for
 * saving a VM in the middle of string I/O.  Paging on as in `counter`;
 * no interrupts (IF=0, PIT and 8259 left alone).
 *
 *   counter start                  (byte by byte, LSR.THRE polled)
 *   blk 000001 <64 pattern bytes>\n
 *   blk 000002 <64 pattern bytes>\n
 *   ...
 *
 * Block N (N = 1, 2, 3, ...): "blk ", N in decimal zero-padded to 6 digits
 * (more digits from 1000000 on), " ", then 64 bytes with byte i (0..63) =
 * 0x30 + ((7 * N + i) mod 64), then "\n": 76 bytes for N < 1000000.  The
 * whole block is one `rep outsb` (ECX = block length, DX = 0x3F8), issued
 * after LSR.THRE reads as set.  With `debugcon=1` the block is then sent
 * again with a second `rep outsb` to the debug console.  Between blocks it
 * spins for `delay=` PAUSEs (default 2000).  Exits with 0 after block
 * `limit=` (default 0 = forever).
 */

	.include "guest.inc"

	.equ	PATTERN_LEN,	64
	.equ	NUM_WIDTH,	6

	.text
	.globl	main
main:
	call	ctr_setup
	movl	$.Ldelay_key, %esi
	movl	$2000, %eax
	call	cmdline_num
	movl	%eax, delay_iters
	movl	$.Lstart_msg, %esi
	call	ctr_puts

.Lloop:
	incl	block
	movl	block, %ebx
	call	build_block			/* ECX = length */
	movl	%ecx, %ebp
	call	ctr_com1_wait
	movl	$blk_buf, %esi
	movw	$COM1_THR, %dx
	rep outsb
	cmpl	$0, ctr_debugcon
	je	1f
	movl	$blk_buf, %esi
	movl	%ebp, %ecx
	movw	$DEBUGCON_PORT, %dx
	rep outsb
1:	movl	ctr_limit, %eax
	testl	%eax, %eax
	jz	2f
	cmpl	%eax, block
	jae	.Ldone
2:	movl	delay_iters, %ecx
	call	delay
	jmp	.Lloop

.Ldone:
	xorl	%eax, %eax
	ret

/* build_block(EBX = N) -> blk_buf filled, ECX = length. */
build_block:
	pushl	%eax
	pushl	%ebx
	pushl	%edx
	pushl	%esi
	pushl	%edi
	movl	$blk_buf, %edi
	movl	$0x206b6c62, (%edi)		/* "blk " */
	addl	$4, %edi

	/* decimal digits of N, least significant first, onto the stack */
	movl	%ebx, %eax
	movl	$10, %esi
	xorl	%ecx, %ecx
1:	xorl	%edx, %edx
	divl	%esi
	addl	$'0', %edx
	pushl	%edx
	incl	%ecx
	testl	%eax, %eax
	jnz	1b
	movl	$NUM_WIDTH, %edx		/* leading zeros */
	subl	%ecx, %edx
	jle	3f
2:	movb	$'0', (%edi)
	incl	%edi
	decl	%edx
	jnz	2b
3:	popl	%eax
	movb	%al, (%edi)
	incl	%edi
	loop	3b
	movb	$' ', (%edi)
	incl	%edi

	/* pattern: byte i = 0x30 + ((7N + i) & 63) */
	leal	(,%ebx,8), %eax
	subl	%ebx, %eax			/* 7N */
	movl	$PATTERN_LEN, %ecx
4:	movl	%eax, %edx
	andl	$63, %edx
	addl	$0x30, %edx
	movb	%dl, (%edi)
	incl	%edi
	incl	%eax
	loop	4b
	movb	$'\n', (%edi)
	incl	%edi

	movl	%edi, %ecx
	subl	$blk_buf, %ecx
	popl	%edi
	popl	%esi
	popl	%edx
	popl	%ebx
	popl	%eax
	ret

	.section .rodata
.Lstart_msg:
	.asciz	"counter start\n"
.Ldelay_key:
	.asciz	"delay="

	.data
	.balign	4
block:
	.long	0
delay_iters:
	.long	0

	.bss
	.balign	16
blk_buf:
	.skip	128

	.include "counter_lib.S"
