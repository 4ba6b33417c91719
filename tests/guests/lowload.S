/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * lowload: linked at 0x8000 (build.py), below where a fixed boot information
 * area would sit; prints where it and the boot information ended up.
 *
 *   lowload main <hex8> end <hex8> mbi <hex8>
 *   cmdline <string>
 *
 * `end` is the end of .bss (the image's last byte + 1), `mbi` the address in
 * EBX at entry.  Exit value: `exit=N` (default 0).
 */

	.include "guest.inc"

	.text
	.globl	main
main:
	PUTS_LIT "lowload main "
	PUT_HEX	$main, 8
	PUTS_LIT " end "
	PUT_HEX	$__bss_end, 8
	PUTS_LIT " mbi "
	PUT_HEX	mb_info, 8
	PUTS_LIT "\ncmdline "
	call	cmdline_ptr
	pushl	%esi
	movl	%eax, %esi
	call	puts
	PUTS_LIT "\n"
	.pushsection .rodata
.Lexit_key:
	.asciz	"exit="
	.popsection
	movl	$.Lexit_key, %esi
	xorl	%eax, %eax
	call	cmdline_num
	popl	%esi
	ret
