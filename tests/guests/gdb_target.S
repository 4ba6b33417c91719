/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * gdb_target: a guest for the -G gdb stub test, with symbols to break on.
 *
 *   gdb_target start
 *   gdb_target ticks N             (N = calls of gdb_tick, 3)
 *   gdb_target value V             (V = gdb_value, 8 hex digits; a debugger may set it)
 *   gdb_target done
 *
 * then exits with gdb_exit (0 unless a debugger changed it).  gdb_step_here
 * loads EAX with 0x1234 in its first instruction, to single-step over.
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	PUTS_LIT "gdb_target start\n"
	movl	$3, %ecx
1:	call	gdb_tick
	loop	1b
	.globl	gdb_step_here
gdb_step_here:
	movl	$0x1234, %eax
	movl	%eax, gdb_result
	.globl	gdb_hw_here
gdb_hw_here:
	PUTS_LIT "gdb_target ticks "
	PUT_DEC	gdb_ticks
	PUTS_LIT "\ngdb_target value "
	PUT_HEX	gdb_value, 8
	PUTS_LIT "\ngdb_target done\n"
	movl	gdb_exit, %eax
	ret

	.globl	gdb_tick
gdb_tick:
	incl	gdb_ticks
	ret

	.data
	.balign	4
	.globl	gdb_value
gdb_value:	.long	0x11111111
	.globl	gdb_exit
gdb_exit:	.long	0
	.globl	gdb_ticks
gdb_ticks:	.long	0
	.globl	gdb_result
gdb_result:	.long	0
