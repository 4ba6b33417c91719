/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * gdb_long: 64-bit code for the -G gdb stub test.  The guest turns on 4-level paging
 * (the first GiB identity-mapped with 2 MiB pages, and the GiB at 0x40000000 an alias
 * of it: linear 0x40000000 + x is physical x), enters 64-bit mode, prints
 *
 *   gdb_long waiting
 *
 * and spins until a debugger sets gdb_go, then runs
 *
 *   gdb_long_here:  movabs $0x1122334455667788, %rax
 *
 * prints, reading gdb_value through the alias (a debugger may have changed it),
 *
 *   gdb_long value HHHHHHHH
 *
 * and exits with 0.
 */

	.include "guest.inc"

	.equ	ALIAS,		0x40000000
	.equ	CODE64_SEL,	0x18
	.equ	MSR_EFER,	0xc0000080

	.text
	.globl	main
main:
	PUTS_LIT "gdb_long start\n"
	/* PD: 512 x 2 MiB identity; PDPT[0] and PDPT[1] (the alias) both point to it. */
	movl	$pd, %edi
	xorl	%ecx, %ecx
1:	movl	%ecx, %eax
	shll	$21, %eax
	orl	$0x83, %eax			/* present, writable, 2 MiB page */
	movl	%eax, (%edi,%ecx,8)
	incl	%ecx
	cmpl	$512, %ecx
	jb	1b
	movl	$pd, %eax
	orl	$3, %eax
	movl	%eax, pdpt
	movl	%eax, pdpt + 8
	movl	$pdpt, %eax
	orl	$3, %eax
	movl	%eax, pml4

	lgdt	gdt_desc			/* CODE_SEL and DATA_SEL stay the same */
	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$0x100, %eax			/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000000, %eax		/* PG: long mode, 32-bit code for now */
	movl	%eax, %cr0
	ljmp	$CODE64_SEL, $long_mode

	.code64
long_mode:
	leaq	wait_msg(%rip), %rsi
	call	puts64
	.globl	gdb_long_wait
gdb_long_wait:
	cmpl	$0, gdb_go(%rip)
	je	gdb_long_wait
	.globl	gdb_long_here
gdb_long_here:
	movabsq	$0x1122334455667788, %rax
	.globl	gdb_long_next
gdb_long_next:
	leaq	value_msg(%rip), %rsi
	call	puts64
	movl	$(ALIAS + gdb_value), %ebx
	movl	(%rbx), %eax
	movl	$8, %ecx
2:	roll	$4, %eax
	movl	%eax, %ebx
	andl	$0xf, %ebx
	leaq	hex_digits(%rip), %rdx
	movb	(%rdx,%rbx), %bl
	movw	$DEBUGCON_PORT, %dx
	xchgl	%eax, %ebx
	outb	%al, %dx
	xchgl	%eax, %ebx
	loop	2b
	leaq	newline(%rip), %rsi
	call	puts64
	xorl	%eax, %eax
	movw	$EXIT_PORT, %dx
	outl	%eax, %dx
3:	hlt
	jmp	3b

/* puts64(RSI = NUL-terminated string) on the debug console. */
puts64:
	movw	$DEBUGCON_PORT, %dx
1:	lodsb
	testb	%al, %al
	jz	2f
	outb	%al, %dx
	jmp	1b
2:	ret
	.code32

	.section .rodata
wait_msg:	.asciz	"gdb_long waiting\n"
value_msg:	.asciz	"gdb_long value "
newline:	.asciz	"\n"
hex_digits:	.ascii	"0123456789abcdef"

	.data
	.balign	8
gdt:	.quad	0
	.quad	0x00cf9a000000ffff		/* CODE_SEL: 32-bit code */
	.quad	0x00cf92000000ffff		/* DATA_SEL */
	.quad	0x00af9a000000ffff		/* CODE64_SEL: 64-bit code */
gdt_desc:
	.word	4 * 8 - 1
	.long	gdt
	.balign	4
	.globl	gdb_value
gdb_value:	.long	0x5a5a5a5a
	.globl	gdb_go
gdb_go:		.long	0

	.bss
	.balign	4096
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4096
