/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * triplefault: load an empty IDT (limit 0) and execute int3.  Vector 3 is
 * outside the IDT -> #GP, which is outside too -> #DF -> triple fault.
 * Under hvf this ends the run with exit status 3.
 *
 *   about to fault
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	PUTS_LIT "about to fault\n"
	lidt	empty_idt_desc
	int3
	/* Not reached. */
	PUTS_LIT "still alive\n"
	movl	$1, %eax
	ret

	.section .rodata
	.balign	4
	.word	0
empty_idt_desc:
	.word	0				/* limit 0 */
	.long	0				/* base 0 */
