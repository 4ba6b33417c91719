/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * Common runtime for the hvf test guests, linked into every guest:
 * multiboot v1 header, 32-bit entry (own GDT, stack, zeroed .bss),
 * debug-console output helpers, cmdline parsing, PCI config helpers and
 * the exit path.
 *
 * A guest provides `main`; it is called with the multiboot info pointer
 * saved in `mb_info` (0 if the boot magic was wrong) and returns the exit
 * value in EAX, which is written to the exit port.
 */

	.include "guest.inc"

/* ------------------------------------------------------------------ */
/* Multiboot v1 header: page-align modules + memory info, ELF layout.  */

	.equ	MB_HEADER_FLAGS, 0x00000003

	.section .multiboot, "a"
	.balign	4
mb_header:
	.long	MB_HEADER_MAGIC
	.long	MB_HEADER_FLAGS
	.long	-(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

/* ------------------------------------------------------------------ */
/* Entry                                                                */

	.text
	.globl	_start
_start:
	/* 32-bit protected mode, flat segments, paging off (loader contract). */
	cli
	cld
	movl	%eax, %esi			/* boot magic */
	movl	%ebx, %ebp			/* multiboot info */

	lgdt	gdt_desc
	ljmp	$CODE_SEL, $1f
1:	movw	$DATA_SEL, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %fs
	movw	%ax, %gs
	movw	%ax, %ss

	/* Zero .bss (the stack lives there too; nothing is on it yet). */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	xorl	%eax, %eax
	rep stosb

	movl	$stack_top, %esp
	xorl	%eax, %eax
	pushl	%eax
	popfl					/* known EFLAGS: IF=0, DF=0 */

	movl	%esi, mb_magic
	movl	%ebp, mb_info
	cmpl	$MB_BOOT_MAGIC, %esi
	je	2f
	movl	$0, mb_info
	PUTS_LIT "bad multiboot magic "
	PUT_HEX	%esi, 8
	PUTS_LIT "\n"
2:
	xorl	%ebp, %ebp
	call	main
	/* fall through: exit with main's return value */

/* exit(EAX = value): write to the exit port; never returns. */
	.globl	exit
exit:
	movw	$EXIT_PORT, %dx
	outl	%eax, %dx
	/* Only reached if no exit device is present. */
	.globl	halt_forever
halt_forever:
	cli
1:	hlt
	jmp	1b

/* ------------------------------------------------------------------ */
/* Output helpers (debug console, port 0x402)                          */

/* putc(AL) */
	.globl	putc
putc:
	pushl	%edx
	movw	$DEBUGCON_PORT, %dx
	outb	%al, %dx
	popl	%edx
	ret

/* puts(ESI = NUL-terminated string); a NULL pointer prints nothing. */
	.globl	puts
puts:
	pushl	%eax
	pushl	%edx
	pushl	%esi
	testl	%esi, %esi
	jz	2f
	movw	$DEBUGCON_PORT, %dx
1:	lodsb
	testb	%al, %al
	jz	2f
	outb	%al, %dx
	jmp	1b
2:	popl	%esi
	popl	%edx
	popl	%eax
	ret

/* puthexn(EAX = value, ECX = number of digits 1..8): lowercase, padded. */
	.globl	puthexn
puthexn:
	pushal
	movl	%eax, %esi
	movl	%ecx, %ebx
	movl	$8, %ecx
	subl	%ebx, %ecx
	shll	$2, %ecx
	shll	%cl, %esi			/* first wanted digit on top */
	movl	%ebx, %ecx
	movw	$DEBUGCON_PORT, %dx
1:	roll	$4, %esi
	movl	%esi, %eax
	andl	$0xf, %eax
	movb	hex_digits(%eax), %al
	outb	%al, %dx
	loop	1b
	popal
	ret

/* puthex32(EAX): exactly 8 lowercase hex digits. */
	.globl	puthex32
puthex32:
	pushl	%ecx
	movl	$8, %ecx
	call	puthexn
	popl	%ecx
	ret

/* puthex64(EDX:EAX): exactly 16 lowercase hex digits. */
	.globl	puthex64
puthex64:
	pushl	%eax
	movl	%edx, %eax
	call	puthex32
	popl	%eax
	call	puthex32
	ret

/* putdec(EAX): unsigned decimal, no padding. */
	.globl	putdec
putdec:
	pushal
	movl	$10, %ebx
	xorl	%ecx, %ecx
1:	xorl	%edx, %edx
	divl	%ebx
	addl	$'0', %edx
	pushl	%edx
	incl	%ecx
	testl	%eax, %eax
	jnz	1b
	movw	$DEBUGCON_PORT, %dx
2:	popl	%eax
	outb	%al, %dx
	loop	2b
	popal
	ret

/* ------------------------------------------------------------------ */
/* Multiboot command line                                              */

/* cmdline_ptr() -> EAX = cmdline string, or 0 if none was passed. */
	.globl	cmdline_ptr
cmdline_ptr:
	movl	mb_info, %eax
	testl	%eax, %eax
	jz	1f
	testl	$MB_FLAG_CMDLINE, MBI_FLAGS(%eax)
	jz	2f
	movl	MBI_CMDLINE(%eax), %eax
1:	ret
2:	xorl	%eax, %eax
	ret

/*
 * cmdline_num(ESI = key such as "exit=", EAX = default) -> EAX.
 * Finds the key at the start of a space-separated word of the cmdline
 * and parses the decimal digits after it (no digits -> 0).  Returns the
 * default if the key does not occur.
 */
	.globl	cmdline_num
cmdline_num:
	pushl	%ebx
	pushl	%ecx
	pushl	%edx
	pushl	%edi
	pushl	%eax				/* default, at (%esp) */
	call	cmdline_ptr
	testl	%eax, %eax
	jz	.Lnum_default
	movl	%eax, %edi			/* scan position */
	movl	%eax, %ebx			/* start of cmdline */
.Lnum_scan:
	cmpb	$0, (%edi)
	je	.Lnum_default
	cmpl	%ebx, %edi
	je	.Lnum_try
	cmpb	$' ', -1(%edi)
	jne	.Lnum_next
.Lnum_try:
	movl	%esi, %eax			/* key cursor */
	movl	%edi, %ecx			/* cmdline cursor */
1:	movb	(%eax), %dl
	testb	%dl, %dl
	jz	.Lnum_found
	cmpb	(%ecx), %dl
	jne	.Lnum_next
	incl	%eax
	incl	%ecx
	jmp	1b
.Lnum_next:
	incl	%edi
	jmp	.Lnum_scan
.Lnum_found:
	xorl	%eax, %eax
2:	movzbl	(%ecx), %edx
	subl	$'0', %edx
	cmpl	$9, %edx
	ja	.Lnum_out
	imull	$10, %eax
	addl	%edx, %eax
	incl	%ecx
	jmp	2b
.Lnum_default:
	movl	(%esp), %eax
.Lnum_out:
	addl	$4, %esp
	popl	%edi
	popl	%edx
	popl	%ecx
	popl	%ebx
	ret

/* ------------------------------------------------------------------ */
/* PCI configuration mechanism #1                                      */

/*
 * pci_cfg_read(EBX = bus<<16 | dev<<11 | fn<<8, ECX = register) -> EAX
 * pci_cfg_write(EBX, ECX, EAX = value)
 * Dword accesses; the low two bits of the register are ignored.
 */
	.globl	pci_cfg_read
pci_cfg_read:
	pushl	%edx
	call	pci_cfg_select
	movw	$PCI_DATA_PORT, %dx
	inl	%dx, %eax
	popl	%edx
	ret

	.globl	pci_cfg_write
pci_cfg_write:
	pushl	%edx
	call	pci_cfg_select
	movw	$PCI_DATA_PORT, %dx
	outl	%eax, %dx
	popl	%edx
	ret

/* pci_cfg_select(EBX, ECX): write the address register (keeps EAX). */
	.globl	pci_cfg_select
pci_cfg_select:
	pushl	%eax
	movl	%ecx, %eax
	andl	$0xfc, %eax
	orl	%ebx, %eax
	orl	$0x80000000, %eax
	movw	$PCI_ADDR_PORT, %dx
	outl	%eax, %dx
	popl	%eax
	ret

/* ------------------------------------------------------------------ */
/* Misc                                                                */

/* delay(ECX = iterations of PAUSE) */
	.globl	delay
delay:
	pushl	%ecx
	testl	%ecx, %ecx
	jz	2f
1:	pause
	loop	1b
2:	popl	%ecx
	ret

/* ------------------------------------------------------------------ */

	.section .rodata
hex_digits:
	.ascii	"0123456789abcdef"

	.data
	/* In .data: the CPU sets descriptor accessed bits. */
	.balign	8
	.globl	gdt
gdt:
	.quad	0x0000000000000000		/* null */
	.quad	0x00cf9a000000ffff		/* 0x08: flat 4 GiB code, 32-bit */
	.quad	0x00cf92000000ffff		/* 0x10: flat 4 GiB data */
gdt_end:
	.balign	4
	.word	0
	.globl	gdt_desc
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt


	.balign	4
	.globl	mb_magic
mb_magic:
	.long	0
	.globl	mb_info
mb_info:
	.long	0

	.bss
	.balign	16
stack_bottom:
	.skip	16384
	.globl	stack_top
stack_top:
