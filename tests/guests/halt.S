/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * halt: print a line, then halt with interrupts disabled forever.
 *
 *   halting
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	PUTS_LIT "halting\n"
	cli
1:	hlt
	jmp	1b
