/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * hello: a first guest for hvf (`python -m hvf.testing.guests hello` builds it).
 * It greets on the debug console (port 0x402), shows the command line and the
 * memory it was given, and ends the VM through pc-testdev with `exit=N`
 * (default 0), so hvf exits with status 2N+1: 1 is bhyve's "powered off".
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	pushl	%esi
	PUTS_LIT "Hello from a guest of hvf!\n"
	PUTS_LIT "command line: "
	call	cmdline_ptr
	movl	%eax, %esi
	call	puts
	movl	mb_info, %esi
	testl	%esi, %esi
	jz	1f
	testl	$MB_FLAG_MEM, MBI_FLAGS(%esi)
	jz	1f
	PUTS_LIT "\nmemory: "
	movl	MBI_MEM_UPPER(%esi), %eax
	shrl	$10, %eax
	incl	%eax				/* the first MiB */
	PUT_DEC	%eax
	PUTS_LIT " MiB"
1:	.pushsection .rodata
.Lexit_key:
	.asciz	"exit="
	.popsection
	movl	$.Lexit_key, %esi
	xorl	%eax, %eax
	call	cmdline_num
	PUTS_LIT "\ngoodbye: exit value "
	PUT_DEC	%eax
	PUTS_LIT "\n"
	popl	%esi
	ret
