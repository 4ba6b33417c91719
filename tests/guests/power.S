/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * power: the ways a PC guest powers off or resets, chosen with action=N:
 *   1  reset through the reset control register (outb 0x06 to 0xCF9)
 *   2  reset through the keyboard controller (outb 0xFE to 0x64)
 *   3  reset through system control port A (outb 0x01 to 0x92)
 *   4  ACPI S5: enable ACPI (0xA0 to SMI_CMD 0xB2), write SLP_TYP=5|SLP_EN to PM1a_CNT
 *   5  wait for the power button: enable ACPI and PWRBTN_EN, print "ready", poll
 *      PM1a_STS until PWRBTN_STS (bit 8) is set, print "power button", then do S5.
 * Prints "action N" first.  If the machine is still running afterwards it prints
 * "still running" and exits through pc-testdev with 0x7f.
 */

	.include "guest.inc"

	.equ	SMI_CMD,	0xb2
	.equ	PM1A_STS,	0x600
	.equ	PM1A_EN,	0x602
	.equ	PM1A_CNT,	0x604
	.equ	SLP_S5,		(5 << 10) | (1 << 13)

	.text
	.globl	main
main:
	movl	$key_action, %esi
	xorl	%eax, %eax
	call	cmdline_num
	movl	%eax, %ebx
	PUTS_LIT "action "
	PUT_DEC	%ebx
	PUTS_LIT "\n"
	cmpl	$1, %ebx
	je	reset_cf9
	cmpl	$2, %ebx
	je	reset_kbc
	cmpl	$3, %ebx
	je	reset_port92
	cmpl	$4, %ebx
	je	soft_off
	cmpl	$5, %ebx
	je	power_button
	jmp	still_running

reset_cf9:
	movw	$0xcf9, %dx
	movb	$0x06, %al
	outb	%al, %dx
	jmp	still_running

reset_kbc:
	movb	$0xfe, %al
	outb	%al, $0x64
	jmp	still_running

reset_port92:
	movb	$0x01, %al
	outb	%al, $0x92
	jmp	still_running

enable_acpi:
	movb	$0xa0, %al
	outb	%al, $SMI_CMD
	ret

soft_off:
	call	enable_acpi
	movw	$PM1A_CNT, %dx
	movw	$SLP_S5, %ax
	outw	%ax, %dx
	jmp	still_running

power_button:
	call	enable_acpi
	movw	$PM1A_EN, %dx
	movw	$0x0100, %ax			/* PWRBTN_EN */
	outw	%ax, %dx
	PUTS_LIT "ready\n"
1:	movw	$PM1A_STS, %dx
	inw	%dx, %ax
	testw	$0x0100, %ax
	jnz	2f
	movl	$2000, %ecx
	call	delay
	jmp	1b
2:	movw	$0x0100, %ax			/* write 1 to clear PWRBTN_STS */
	outw	%ax, %dx
	PUTS_LIT "power button\n"
	jmp	soft_off

still_running:
	PUTS_LIT "still running\n"
	movl	$0x7f, %eax
	ret

	.section .rodata
key_action:
	.asciz	"action="
