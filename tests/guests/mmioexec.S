/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * mmioexec: jump into the PCI hole, where there is no memory to fetch the next
 * instruction from.  KVM's instruction emulator cannot fetch it and reports an
 * emulation failure on every host, so hvf must stop with status 4 and a report.
 *
 *   jumping into mmio
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	PUTS_LIT "jumping into mmio\n"
	movl	$0xd0000000, %eax
	jmp	*%eax
