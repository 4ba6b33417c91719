/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * strictio: access an unassigned I/O port (0x1234).
 *
 *   read 1234 XX                  (expected: ff)
 *   wrote 1234
 *
 * Exits 0 (if the hypervisor lets it get that far).
 */

	.include "guest.inc"

	.equ	UNASSIGNED_PORT, 0x1234

	.text
	.globl	main
main:
	movw	$UNASSIGNED_PORT, %dx
	xorl	%eax, %eax
	inb	%dx, %al
	PUTS_LIT "read 1234 "
	PUT_HEX	%eax, 2
	PUTS_LIT "\n"
	movw	$UNASSIGNED_PORT, %dx
	movb	$0x5a, %al
	outb	%al, %dx
	PUTS_LIT "wrote 1234\n"
	xorl	%eax, %eax
	ret
