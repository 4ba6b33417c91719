/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * acpi_pmtimer: find the ACPI tables as an OS without firmware services does
 * and read the PM timer they describe.
 *
 *   rsdp <hex8>                    (the 16-byte aligned "RSD PTR " in 0xE0000-0xFFFFF
 *                                   whose first 20 bytes sum to 0)
 *   fadt <hex8>                    (the "FACP" entry of the RSDT; both checksummed)
 *   pm_tmr <port hex4> bits <24|32>
 *   pm_tmr <t0 hex8> <t1 hex8>     (two readings; t1 is the first that differs from t0)
 *
 * Any failure prints `acpi: <what>` and exits 1; a timer that does not move in
 * 1000000 reads prints `acpi: pm timer stuck`.  Exit 0 on success.
 */

	.include "guest.inc"

	.equ	SCAN_START,	0xe0000
	.equ	SCAN_END,	0x100000
	.equ	RSDP_RSDT,	16
	.equ	SDT_LENGTH,	4
	.equ	SDT_HEADER,	36
	.equ	FADT_PM_TMR_BLK, 76
	.equ	FADT_FLAGS,	112
	.equ	FADT_TMR_VAL_EXT, (1 << 8)
	.equ	TIMER_READS,	1000000

	.text
	.globl	main
main:
	pushl	%ebx
	pushl	%esi
	pushl	%edi
	movl	$SCAN_START, %esi
1:	cmpl	$SCAN_END, %esi
	jae	.Lno_rsdp
	cmpl	$0x20445352, (%esi)		/* "RSD " */
	jne	2f
	cmpl	$0x20525450, 4(%esi)		/* "PTR " */
	jne	2f
	movl	$20, %ecx
	call	sum_bytes
	testb	%al, %al
	jz	3f
2:	addl	$16, %esi
	jmp	1b
3:	PUTS_LIT "rsdp "
	PUT_HEX	%esi, 8
	PUTS_LIT "\n"

	movl	RSDP_RSDT(%esi), %ebx		/* the RSDT */
	cmpl	$0x54445352, (%ebx)		/* "RSDT" */
	jne	.Lbad_rsdt
	movl	%ebx, %esi
	movl	SDT_LENGTH(%ebx), %ecx
	call	sum_bytes
	testb	%al, %al
	jnz	.Lbad_rsdt
	leal	SDT_HEADER(%ebx), %edi		/* entries */
	movl	SDT_LENGTH(%ebx), %ecx
	addl	%ebx, %ecx			/* end of entries */
4:	cmpl	%ecx, %edi
	jae	.Lno_fadt
	movl	(%edi), %esi
	cmpl	$0x50434146, (%esi)		/* "FACP" */
	je	5f
	addl	$4, %edi
	jmp	4b
5:	movl	SDT_LENGTH(%esi), %ecx
	call	sum_bytes
	testb	%al, %al
	jnz	.Lbad_fadt
	PUTS_LIT "fadt "
	PUT_HEX	%esi, 8
	PUTS_LIT "\npm_tmr "
	movl	FADT_PM_TMR_BLK(%esi), %edx
	testl	%edx, %edx
	jz	.Lno_timer
	PUT_HEX	%edx, 4
	PUTS_LIT " bits "
	testl	$FADT_TMR_VAL_EXT, FADT_FLAGS(%esi)
	jz	6f
	PUTS_LIT "32\n"
	jmp	7f
6:	PUTS_LIT "24\n"

7:	inl	%dx, %eax
	movl	%eax, %ebx			/* t0 */
	movl	$TIMER_READS, %ecx
8:	inl	%dx, %eax
	cmpl	%ebx, %eax
	jne	9f
	loop	8b
	PUTS_LIT "acpi: pm timer stuck\n"
	jmp	.Lfail
9:	PUTS_LIT "pm_tmr "
	PUT_HEX	%ebx, 8
	PUTS_LIT " "
	PUT_HEX	%eax, 8
	PUTS_LIT "\n"
	xorl	%eax, %eax
	jmp	.Lout

.Lno_rsdp:
	PUTS_LIT "acpi: no rsdp\n"
	jmp	.Lfail
.Lbad_rsdt:
	PUTS_LIT "acpi: bad rsdt\n"
	jmp	.Lfail
.Lno_fadt:
	PUTS_LIT "acpi: no fadt\n"
	jmp	.Lfail
.Lbad_fadt:
	PUTS_LIT "acpi: bad fadt checksum\n"
	jmp	.Lfail
.Lno_timer:
	PUTS_LIT "acpi: no pm timer\n"
.Lfail:
	movl	$1, %eax
.Lout:
	popl	%edi
	popl	%esi
	popl	%ebx
	ret

/* sum_bytes(ESI = start, ECX = count) -> AL = their sum (mod 256); keeps ESI. */
sum_bytes:
	pushl	%ecx
	pushl	%esi
	xorl	%eax, %eax
1:	addb	(%esi), %al
	incl	%esi
	loop	1b
	popl	%esi
	popl	%ecx
	ret
