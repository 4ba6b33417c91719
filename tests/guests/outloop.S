/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * outloop: `n=NNN` (decimal, default 100000) dword writes to the scratch
 * port 0xe0 in a tight loop -- an exit-latency benchmark.
 *
 *   outloop done
 */

	.include "guest.inc"

	.equ	DEFAULT_N, 100000

	.text
	.globl	main
main:
	movl	$n_key, %esi
	movl	$DEFAULT_N, %eax
	call	cmdline_num
	movl	%eax, %ecx
	movw	$SCRATCH_PORT, %dx
	testl	%ecx, %ecx
	jz	2f
1:	outl	%eax, %dx
	decl	%ecx
	jnz	1b
2:	PUTS_LIT "outloop done\n"
	xorl	%eax, %eax
	ret

	.section .rodata
n_key:
	.asciz	"n="
