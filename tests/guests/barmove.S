/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * barmove: relocate the BARs of the test plugin device 1dd1:0001
 * (BAR0 = 16 bytes of I/O, BAR1 = 4 KiB of 32-bit memory; a dword read
 * at offset 0 of either returns 0x21465648) and check that decoding
 * follows the BARs and the command register.
 *
 *   io <addr hex4> <value hex8>
 *   io moved <new hex4> new <value hex8> old <value at old addr hex8>
 *   mem <addr hex8> <value hex8>
 *   mem moved <new hex8> new <value hex8> old <value at old addr hex8>
 *   io decode off <value at new addr hex8>
 *
 * or "barmove: device not found" and exit 1.
 */

	.include "guest.inc"

	.equ	PCI_COMMAND,	0x04
	.equ	PCI_BAR0,	0x10
	.equ	PCI_BAR1,	0x14
	.equ	CMD_IO,		0x1
	.equ	CMD_MEM,	0x2

	.text
	.globl	main
main:
	/* Look at every slot/function of bus 0 for 1dd1:0001. */
	xorl	%ebx, %ebx
1:	xorl	%ecx, %ecx
	call	pci_cfg_read
	cmpl	$0x00011dd1, %eax
	je	.Lfound
	addl	$0x100, %ebx			/* next function */
	cmpl	$0x10000, %ebx			/* past 00:1f.7 */
	jb	1b
	PUTS_LIT "barmove: device not found\n"
	movl	$1, %eax
	ret

.Lfound:
	/* Enable I/O and memory decode (status half written as 0: no W1C). */
	movl	$PCI_COMMAND, %ecx
	call	pci_cfg_read
	andl	$0xffff, %eax
	orl	$(CMD_IO | CMD_MEM), %eax
	call	pci_cfg_write

	/* ---- I/O BAR ---- */
	movl	$PCI_BAR0, %ecx
	call	pci_cfg_read
	andl	$0xfffffffc, %eax
	movl	%eax, %esi			/* old I/O base */
	PUTS_LIT "io "
	PUT_HEX	%esi, 4
	PUTS_LIT " "
	movl	%esi, %edx
	inl	%dx, %eax
	PUT_HEX	%eax, 8
	PUTS_LIT "\n"

	leal	0x100(%esi), %eax
	call	pci_cfg_write
	call	pci_cfg_read
	andl	$0xfffffffc, %eax
	movl	%eax, %edi			/* new I/O base, as read back */
	PUTS_LIT "io moved "
	PUT_HEX	%edi, 4
	PUTS_LIT " new "
	movl	%edi, %edx
	inl	%dx, %eax
	PUT_HEX	%eax, 8
	PUTS_LIT " old "
	movl	%esi, %edx
	inl	%dx, %eax
	PUT_HEX	%eax, 8
	PUTS_LIT "\n"

	/* ---- memory BAR ---- */
	pushl	%edi				/* keep the new I/O base */
	movl	$PCI_BAR1, %ecx
	call	pci_cfg_read
	andl	$0xfffffff0, %eax
	movl	%eax, %esi			/* old memory base */
	PUTS_LIT "mem "
	PUT_HEX	%esi, 8
	PUTS_LIT " "
	PUT_HEX	(%esi), 8
	PUTS_LIT "\n"

	leal	0x100000(%esi), %eax
	call	pci_cfg_write
	call	pci_cfg_read
	andl	$0xfffffff0, %eax
	movl	%eax, %edi			/* new memory base */
	PUTS_LIT "mem moved "
	PUT_HEX	%edi, 8
	PUTS_LIT " new "
	PUT_HEX	(%edi), 8
	PUTS_LIT " old "
	PUT_HEX	(%esi), 8
	PUTS_LIT "\n"
	popl	%edi

	/* ---- I/O decode off ---- */
	movl	$PCI_COMMAND, %ecx
	call	pci_cfg_read
	andl	$(0xffff & ~CMD_IO), %eax
	call	pci_cfg_write
	PUTS_LIT "io decode off "
	movl	%edi, %edx
	inl	%dx, %eax
	PUT_HEX	%eax, 8
	PUTS_LIT "\n"

	xorl	%eax, %eax
	ret
