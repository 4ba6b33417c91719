/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * hello: print the multiboot information and exit with `exit=N`.
 *
 *   hello
 *   cmdline <string>
 *   mem lower <KiB dec> upper <KiB dec>             (if MB_FLAG_MEM)
 *   mmap <base hex16> <len hex16> <type dec>        (per entry, if MB_FLAG_MMAP)
 *   module <start hex8> <end hex8> <string>         (per module, if MB_FLAG_MODS)
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	PUTS_LIT "hello\n"

	PUTS_LIT "cmdline "
	call	cmdline_ptr
	movl	%eax, %esi
	call	puts				/* NULL prints nothing */
	PUTS_LIT "\n"

	movl	mb_info, %ebx
	testl	%ebx, %ebx
	jz	.Ldone

	testl	$MB_FLAG_MEM, MBI_FLAGS(%ebx)
	jz	1f
	PUTS_LIT "mem lower "
	PUT_DEC	MBI_MEM_LOWER(%ebx)
	PUTS_LIT " upper "
	PUT_DEC	MBI_MEM_UPPER(%ebx)
	PUTS_LIT "\n"
1:
	testl	$MB_FLAG_MMAP, MBI_FLAGS(%ebx)
	jz	.Lmods
	movl	MBI_MMAP_ADDR(%ebx), %esi	/* entry: size, base64, len64, type */
	movl	MBI_MMAP_LENGTH(%ebx), %edi
	addl	%esi, %edi			/* end of map */
2:	cmpl	%edi, %esi
	jae	.Lmods
	PUTS_LIT "mmap "
	movl	4(%esi), %eax
	movl	8(%esi), %edx
	call	puthex64
	PUTS_LIT " "
	movl	12(%esi), %eax
	movl	16(%esi), %edx
	call	puthex64
	PUTS_LIT " "
	PUT_DEC	20(%esi)
	PUTS_LIT "\n"
	movl	(%esi), %eax			/* size excludes the size field */
	leal	4(%esi,%eax), %esi
	jmp	2b

.Lmods:
	testl	$MB_FLAG_MODS, MBI_FLAGS(%ebx)
	jz	.Ldone
	movl	MBI_MODS_COUNT(%ebx), %ecx
	movl	MBI_MODS_ADDR(%ebx), %edi	/* entry: start, end, string, rsvd */
3:	testl	%ecx, %ecx
	jz	.Ldone
	PUTS_LIT "module "
	PUT_HEX	(%edi), 8
	PUTS_LIT " "
	PUT_HEX	4(%edi), 8
	PUTS_LIT " "
	movl	8(%edi), %esi
	call	puts
	PUTS_LIT "\n"
	addl	$16, %edi
	decl	%ecx
	jmp	3b

.Ldone:
	pushl	%esi
	.pushsection .rodata
.Lexit_key:
	.asciz	"exit="
	.popsection
	movl	$.Lexit_key, %esi
	xorl	%eax, %eax
	call	cmdline_num
	popl	%esi
	ret
