/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * msr: unknown MSRs (hvf -w) and x2APIC (hvf -x).
 *
 *   cpuid x2apic B                 (CPUID.1:ECX bit 21, 0 or 1)
 *   apic base HHHHHHHHLLLLLLLL     (IA32_APIC_BASE, a known MSR)
 *   rdmsr 1234 = HHHHHHHHLLLLLLLL  (an MSR no CPU has)
 *   wrmsr 1234 done                (a write of 0xdeadbeef12345678 to it)
 *   rdmsr 1234 = HHHHHHHHLLLLLLLL  (read again)
 *
 * With `x2apic=1` it instead turns x2APIC mode on (IA32_APIC_BASE EN|EXTD, whatever
 * CPUID says) and reads the local APIC's ID and version through their MSRs:
 *
 *   x2apic id N version HHHHHHHH
 *
 * An exception (#GP from an MSR access the CPU refuses) prints `exception V` and
 * exits with 2; otherwise the exit value is 0.  No IRET: the handler never returns.
 */

	.include "guest.inc"

	.equ	MSR_UNKNOWN,	0x1234
	.equ	MSR_APIC_BASE,	0x1b
	.equ	MSR_X2APIC_ID,	0x802
	.equ	MSR_X2APIC_VER,	0x803
	.equ	APIC_BASE_EN_EXTD, 0xc00
	.equ	VECTORS,	32

	.text
	.globl	main
main:
	call	build_idt

	movl	$1, %eax
	xorl	%ecx, %ecx
	cpuid
	PUTS_LIT "cpuid x2apic "
	shrl	$21, %ecx
	andl	$1, %ecx
	PUT_DEC	%ecx
	PUTS_LIT "\n"

	movl	$.Lx2apic_key, %esi
	xorl	%eax, %eax
	call	cmdline_num
	testl	%eax, %eax
	jnz	x2apic_mode

	PUTS_LIT "apic base "
	movl	$MSR_APIC_BASE, %ecx
	rdmsr
	call	puthex64
	PUTS_LIT "\n"

	call	read_unknown
	movl	$MSR_UNKNOWN, %ecx
	movl	$0x12345678, %eax
	movl	$0xdeadbeef, %edx
	wrmsr
	PUTS_LIT "wrmsr 1234 done\n"
	call	read_unknown
	xorl	%eax, %eax
	ret

read_unknown:
	movl	$MSR_UNKNOWN, %ecx
	rdmsr
	PUTS_LIT "rdmsr 1234 = "
	call	puthex64
	PUTS_LIT "\n"
	ret

x2apic_mode:
	movl	$MSR_APIC_BASE, %ecx
	rdmsr
	orl	$APIC_BASE_EN_EXTD, %eax
	wrmsr
	movl	$MSR_X2APIC_ID, %ecx
	rdmsr
	PUTS_LIT "x2apic id "
	PUT_DEC	%eax
	movl	$MSR_X2APIC_VER, %ecx
	rdmsr
	PUTS_LIT " version "
	PUT_HEX	%eax, 8
	PUTS_LIT "\n"
	xorl	%eax, %eax
	ret

/* Interrupt gates 0..31 -> exception_stubs (16 bytes each), then lidt. */
build_idt:
	pushal
	xorl	%ecx, %ecx
	movl	$idt, %edi
1:	movl	%ecx, %eax
	shll	$4, %eax			/* 16 bytes a stub */
	addl	$exception_stubs, %eax
	movw	%ax, (%edi)
	movw	$CODE_SEL, 2(%edi)
	movw	$0x8e00, 4(%edi)
	shrl	$16, %eax
	movw	%ax, 6(%edi)
	addl	$8, %edi
	incl	%ecx
	cmpl	$VECTORS, %ecx
	jb	1b
	lidt	idt_desc
	popal
	ret

	.balign	16
exception_stubs:
	.set	.Lvec, 0
	.rept	VECTORS
	.balign	16
	movl	$.Lvec, %ebx
	jmp	exception
	.set	.Lvec, .Lvec + 1
	.endr

exception:
	PUTS_LIT "exception "
	PUT_DEC	%ebx
	PUTS_LIT "\n"
	movl	$2, %eax
	jmp	exit

	.section .rodata
.Lx2apic_key:
	.asciz	"x2apic="

	.data
	.balign	8
idt_desc:
	.word	VECTORS * 8 - 1
	.long	idt

	.bss
	.balign	8
idt:
	.skip	VECTORS * 8
