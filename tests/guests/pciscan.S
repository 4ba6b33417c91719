/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * pciscan: enumerate bus 0 through configuration mechanism #1.
 *
 *   pci 00:SS.F VVVV:DDDD class CCSSPP hdr HH pin P line LL
 *     bar N orig XXXXXXXX mask XXXXXXXX        (header type 0, N = 0..5)
 *   narrow XX XXXX                              (inb/inw of 00:00.0 vendor)
 *   scan done
 *
 * HH is the whole header-type byte (bit 7 = multifunction).  Each BAR is
 * sized by saving it, writing 0xffffffff, reading back and restoring.
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	xorl	%edi, %edi			/* slot */
1:	movl	%edi, %ebx
	shll	$11, %ebx
	call	scan_function
	testl	%eax, %eax
	js	4f				/* function 0 absent */
	testb	$0x80, %al
	jz	4f				/* single function */
	movl	$1, %esi			/* functions 1..7 */
2:	movl	%edi, %ebx
	shll	$11, %ebx
	movl	%esi, %eax
	shll	$8, %eax
	orl	%eax, %ebx
	call	scan_function
	incl	%esi
	cmpl	$8, %esi
	jb	2b
4:	incl	%edi
	cmpl	$32, %edi
	jb	1b

	/* Narrow (1- and 2-byte) data port reads of 00:00.0's vendor ID. */
	xorl	%ebx, %ebx
	xorl	%ecx, %ecx
	call	pci_cfg_select
	movw	$PCI_DATA_PORT, %dx
	xorl	%eax, %eax
	inb	%dx, %al
	movl	%eax, %esi
	call	pci_cfg_select
	movw	$PCI_DATA_PORT, %dx
	xorl	%eax, %eax
	inw	%dx, %ax
	PUTS_LIT "narrow "
	PUT_HEX	%esi, 2
	PUTS_LIT " "
	PUT_HEX	%eax, 4
	PUTS_LIT "\n"

	PUTS_LIT "scan done\n"
	xorl	%eax, %eax
	ret

/*
 * scan_function(EBX = bus/dev/fn address bits): print the function and
 * size its BARs.  Returns EAX = header type byte, or -1 if not present.
 * Preserves EBX, ESI, EDI, EBP.
 */
scan_function:
	pushl	%esi
	pushl	%edi
	xorl	%ecx, %ecx
	call	pci_cfg_read
	cmpw	$0xffff, %ax
	jne	1f
	movl	$-1, %eax
	jmp	9f
1:	movl	%eax, %esi			/* device:vendor */

	PUTS_LIT "pci 00:"
	movl	%ebx, %eax
	shrl	$11, %eax
	andl	$0x1f, %eax
	PUT_HEX	%eax, 2
	PUTS_LIT "."
	movl	%ebx, %eax
	shrl	$8, %eax
	andl	$7, %eax
	PUT_HEX	%eax, 1
	PUTS_LIT " "
	PUT_HEX	%esi, 4
	PUTS_LIT ":"
	movl	%esi, %eax
	shrl	$16, %eax
	PUT_HEX	%eax, 4

	PUTS_LIT " class "
	movl	$0x08, %ecx
	call	pci_cfg_read
	shrl	$8, %eax			/* class:subclass:prog-if */
	PUT_HEX	%eax, 6

	PUTS_LIT " hdr "
	movl	$0x0c, %ecx
	call	pci_cfg_read
	shrl	$16, %eax
	movzbl	%al, %edi			/* header type */
	PUT_HEX	%edi, 2

	PUTS_LIT " pin "
	movl	$0x3c, %ecx
	call	pci_cfg_read
	movl	%eax, %esi
	shrl	$8, %eax
	PUT_HEX	%eax, 1
	PUTS_LIT " line "
	PUT_HEX	%esi, 2
	PUTS_LIT "\n"

	movl	%edi, %eax
	andl	$0x7f, %eax
	jnz	8f				/* BARs only for header type 0 */

	xorl	%esi, %esi			/* BAR index */
2:	leal	0x10(,%esi,4), %ecx
	call	pci_cfg_read
	movl	%eax, %edx			/* original */
	movl	$0xffffffff, %eax
	call	pci_cfg_write
	call	pci_cfg_read			/* mask */
	xchgl	%eax, %edx
	call	pci_cfg_write			/* restore */
	PUTS_LIT "  bar "
	PUT_DEC	%esi
	PUTS_LIT " orig "
	PUT_HEX	%eax, 8
	PUTS_LIT " mask "
	PUT_HEX	%edx, 8
	PUTS_LIT "\n"
	incl	%esi
	cmpl	$6, %esi
	jb	2b

8:	movl	%edi, %eax
9:	popl	%edi
	popl	%esi
	ret
