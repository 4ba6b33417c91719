/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * demo_hello: the demo disk's multiboot kernel (hvf.testing.grubdisk). Unlike the
 * other guests it prints on COM1 (0x3F8, polled; lines end in CR LF), where the firmware and the boot
 * loader print too, then powers off through ACPI (PM1a_CNT 0x604: hvf exits with 1):
 *
 *   hvf demo kernel: hello from a multiboot kernel on COM1
 *   loader <boot loader name>                       (if the loader gives one)
 *   cmdline <string>                                (if the loader gives one)
 *   memory <KiB dec> KiB low, <KiB dec> KiB high    (if the loader gives them)
 *   powering off
 */

	.include "guest.inc"

	.equ	COM1,		0x3f8
	.equ	MB_FLAG_LOADER,	(1 << 9)
	.equ	MBI_LOADER_NAME, 64
	.equ	PM1A_CNT,	0x604
	.equ	SLP_S5,		0x3400		/* SLP_EN | SLP_TYP 5 */

	.text
	.globl	main
main:
	movl	$s_hello, %esi
	call	com1_puts
	movl	mb_info, %ebx
	testl	%ebx, %ebx
	jz	.Loff

	testl	$MB_FLAG_LOADER, MBI_FLAGS(%ebx)
	jz	1f
	movl	$s_loader, %esi
	call	com1_puts
	movl	MBI_LOADER_NAME(%ebx), %esi
	call	com1_puts
	call	com1_newline
1:	testl	$MB_FLAG_CMDLINE, MBI_FLAGS(%ebx)
	jz	2f
	movl	$s_cmdline, %esi
	call	com1_puts
	movl	MBI_CMDLINE(%ebx), %esi
	call	com1_puts
	call	com1_newline
2:	testl	$MB_FLAG_MEM, MBI_FLAGS(%ebx)
	jz	.Loff
	movl	$s_memory, %esi
	call	com1_puts
	movl	MBI_MEM_LOWER(%ebx), %eax
	call	com1_putdec
	movl	$s_low, %esi
	call	com1_puts
	movl	MBI_MEM_UPPER(%ebx), %eax
	call	com1_putdec
	movl	$s_high, %esi
	call	com1_puts

.Loff:
	movl	$s_off, %esi
	call	com1_puts
	movw	$PM1A_CNT, %dx
	movw	$SLP_S5, %ax
	outw	%ax, %dx
	xorl	%eax, %eax			/* no ACPI PM: the exit port, then halt */
	ret

/* com1_putc(AL): wait for THR empty, send */
com1_putc:
	pushl	%edx
	pushl	%eax
	movw	$COM1 + 5, %dx
1:	inb	%dx, %al
	testb	$0x20, %al
	jz	1b
	popl	%eax
	movw	$COM1, %dx
	outb	%al, %dx
	popl	%edx
	ret

/* com1_puts(ESI = NUL-terminated string; NULL prints nothing) */
com1_puts:
	pushl	%eax
	pushl	%esi
	testl	%esi, %esi
	jz	2f
1:	lodsb
	testb	%al, %al
	jz	2f
	call	com1_putc
	jmp	1b
2:	popl	%esi
	popl	%eax
	ret

com1_newline:
	pushl	%esi
	movl	$s_newline, %esi
	call	com1_puts
	popl	%esi
	ret

/* com1_putdec(EAX) */
com1_putdec:
	pushal
	movl	$10, %ebx
	xorl	%ecx, %ecx
1:	xorl	%edx, %edx
	divl	%ebx
	pushl	%edx
	incl	%ecx
	testl	%eax, %eax
	jnz	1b
2:	popl	%eax
	addb	$'0', %al
	call	com1_putc
	loop	2b
	popal
	ret

	.section .rodata
s_hello:	.asciz	"hvf demo kernel: hello from a multiboot kernel on COM1\r\n"
s_loader:	.asciz	"loader "
s_cmdline:	.asciz	"cmdline "
s_memory:	.asciz	"memory "
s_low:		.asciz	" KiB low, "
s_high:		.asciz	" KiB high\r\n"
s_off:		.asciz	"powering off\r\n"
s_newline:	.asciz	"\r\n"
