/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * Shared 16550 UART / 8259 / IDT support for the serial_* guests.  Not a
 * guest itself: each serial guest does `.include "serial_lib.S"` at its end
 * (build.py lists it as an extra dependency of those guests).
 *
 * The including guest must define `uart_isr`: called from the interrupt
 * stub for the UART's vector (all registers saved by the stub, so it may
 * clobber any general register), before the EOI is sent.
 *
 * serial_setup() -> EAX = 0, or 1 after printing an error line.
 *   Chooses the UART from the cmdline:
 *     pci=N            the N-th (1 = first) 131f:2000 function on bus 0,
 *                      in slot/function order: I/O decode on, port =
 *                      BAR0 & ~3, irq = config byte 0x3C
 *     port=P irq=I     otherwise (decimal, or hex with a 0x prefix);
 *                      port defaults to 0x3f8, irq to 3 for ports 0x2f8 and
 *                      0x2e8, else 4
 *     fifo=0           leave the FIFO off (FCR 0x00) instead of FCR 0xC7
 *   prints `uart <port hex4> irq <dec>`, programs the 8259 pair (vectors
 *   0x20/0x28, cascade on IRQ2, only the UART's IRQ and IRQ2 unmasked),
 *   loads the IDT and initialises the UART with IER 0: DLAB, divisor 1,
 *   LCR 0x03, FCR, MCR 0x0B.  Leaves EFLAGS.IF clear.
 */

	.equ	UART_RBR,	0
	.equ	UART_THR,	0
	.equ	UART_IER,	1
	.equ	UART_IIR,	2
	.equ	UART_FCR,	2
	.equ	UART_LCR,	3
	.equ	UART_MCR,	4
	.equ	UART_LSR,	5
	.equ	UART_MSR,	6
	.equ	UART_SCR,	7
	.equ	UART_DLL,	0
	.equ	UART_DLM,	1

	.equ	LSR_DR,		0x01
	.equ	LSR_OE,		0x02
	.equ	LSR_THRE,	0x20

	.equ	PIC1_CMD,	0x20
	.equ	PIC1_DATA,	0x21
	.equ	PIC2_CMD,	0xa0
	.equ	PIC2_DATA,	0xa1
	.equ	PIC_EOI,	0x20
	.equ	IRQ_VECTOR_BASE, 0x20
	.equ	IDT_ENTRIES,	48

	.equ	PCI_UART_ID,	0x2000131f	/* device:vendor dword */

/* UART_OUT reg, imm8 / UART_IN reg: byte access to uart_base + reg (AL, DX) */
.macro UART_OUT reg, val
	movw	uart_base, %dx
	addw	$\reg, %dx
	movb	$\val, %al
	outb	%al, %dx
.endm

.macro UART_IN reg
	movw	uart_base, %dx
	addw	$\reg, %dx
	inb	%dx, %al
.endm

	.text

	.globl	serial_setup
serial_setup:
	pushl	%ebx
	pushl	%ecx
	pushl	%edx
	pushl	%esi
	pushl	%edi

	/* Which UART? */
	movl	$.Lkey_pci, %esi
	xorl	%eax, %eax
	call	serial_cmdline_num
	testl	%eax, %eax
	jz	.Lsetup_legacy
	call	serial_find_pci			/* the EAX-th one */
	testl	%eax, %eax
	jnz	.Lsetup_fail
	jmp	.Lsetup_have_uart
.Lsetup_legacy:
	movl	$.Lkey_port, %esi
	movl	$0x3f8, %eax
	call	serial_cmdline_num
	movl	%eax, uart_base
	movl	$4, %ebx			/* default IRQ by port */
	cmpl	$0x2f8, %eax
	je	1f
	cmpl	$0x2e8, %eax
	jne	2f
1:	movl	$3, %ebx
2:	movl	$.Lkey_irq, %esi
	movl	%ebx, %eax
	call	serial_cmdline_num
	movl	%eax, uart_irq
.Lsetup_have_uart:
	PUTS_LIT "uart "
	PUT_HEX	uart_base, 4
	PUTS_LIT " irq "
	PUT_DEC	uart_irq
	PUTS_LIT "\n"
	cmpl	$15, uart_irq
	jbe	1f
	PUTS_LIT "uart: irq out of range\n"
	jmp	.Lsetup_fail
1:	cmpl	$2, uart_irq
	jne	1f
	PUTS_LIT "uart: irq 2 is the cascade\n"
	jmp	.Lsetup_fail
1:
	movl	$.Lkey_fifo, %esi
	movl	$1, %eax
	call	serial_cmdline_num
	movl	%eax, uart_fifo

	call	serial_build_idt
	call	serial_init_pic
	call	serial_init_uart
	xorl	%eax, %eax
	jmp	.Lsetup_out
.Lsetup_fail:
	movl	$1, %eax
.Lsetup_out:
	popl	%edi
	popl	%esi
	popl	%edx
	popl	%ecx
	popl	%ebx
	ret

/*
 * serial_find_pci(EAX = N >= 1) -> EAX = 0 with uart_base/uart_irq set from
 * the N-th 131f:2000 function on bus 0 (in slot/function order), or 1 after
 * printing `uart: pci 131f:2000 not found`.
 */
serial_find_pci:
	pushl	%ebx
	pushl	%ecx
	pushl	%edx
	movl	%eax, %edx			/* matches still to skip + 1 */
	xorl	%ebx, %ebx			/* bus 0, dev/fn 0..255 */
1:	xorl	%ecx, %ecx
	call	pci_cfg_read
	cmpl	$PCI_UART_ID, %eax
	jne	4f
	decl	%edx
	jz	2f
4:	addl	$0x100, %ebx
	cmpl	$0x10000, %ebx
	jb	1b
	PUTS_LIT "uart: pci 131f:2000 not found\n"
	movl	$1, %eax
	jmp	3f
2:	movl	$0x04, %ecx			/* command | status << 16 */
	call	pci_cfg_read
	andl	$0xffff, %eax			/* no write-1-to-clear status bits */
	orl	$0x0001, %eax			/* I/O space decode */
	call	pci_cfg_write
	movl	$0x10, %ecx
	call	pci_cfg_read
	andl	$0xfffffffc, %eax
	movl	%eax, uart_base
	movl	$0x3c, %ecx
	call	pci_cfg_read
	movzbl	%al, %eax
	movl	%eax, uart_irq
	xorl	%eax, %eax
3:	popl	%edx
	popl	%ecx
	popl	%ebx
	ret

/* serial_build_idt(): gates 0..47 -> isr_stubs, then lidt. */
serial_build_idt:
	pushal
	xorl	%ecx, %ecx
	movl	$serial_idt, %edi
1:	leal	isr_stubs(,%ecx,8), %eax
	movw	%ax, (%edi)
	movw	$CODE_SEL, 2(%edi)
	movw	$0x8e00, 4(%edi)		/* present, DPL 0, 32-bit interrupt gate */
	shrl	$16, %eax
	movw	%ax, 6(%edi)
	addl	$8, %edi
	incl	%ecx
	cmpl	$IDT_ENTRIES, %ecx
	jb	1b
	lidt	serial_idt_desc
	popal
	ret

/* serial_init_pic(): ICW1-4 on both 8259s, mask all but the UART and IRQ2. */
serial_init_pic:
	pushal
	movb	$0x11, %al			/* ICW1: edge (ELCR rules), cascade, ICW4 */
	outb	%al, $PIC1_CMD
	outb	%al, $PIC2_CMD
	movb	$IRQ_VECTOR_BASE, %al		/* ICW2: vector bases */
	outb	%al, $PIC1_DATA
	movb	$IRQ_VECTOR_BASE + 8, %al
	outb	%al, $PIC2_DATA
	movb	$0x04, %al			/* ICW3: slave on IRQ2 */
	outb	%al, $PIC1_DATA
	movb	$0x02, %al			/* ICW3: slave identity 2 */
	outb	%al, $PIC2_DATA
	movb	$0x01, %al			/* ICW4: 8086 mode, normal EOI */
	outb	%al, $PIC1_DATA
	outb	%al, $PIC2_DATA

	movl	uart_irq, %ecx
	movl	$0xffff, %eax
	btrl	%ecx, %eax
	btrl	$2, %eax			/* cascade (harmless for IRQ < 8) */
	outb	%al, $PIC1_DATA
	movb	%ah, %al
	outb	%al, $PIC2_DATA
	popal
	ret

/* serial_init_uart(): IER 0, divisor 1, 8N1, FCR, MCR DTR|RTS|OUT2. */
serial_init_uart:
	pushal
	UART_OUT UART_IER, 0x00
	UART_OUT UART_LCR, 0x83			/* DLAB */
	UART_OUT UART_DLL, 0x01
	UART_OUT UART_DLM, 0x00
	UART_OUT UART_LCR, 0x03			/* 8N1, DLAB off */
	movb	$0xc7, %al			/* FIFO on, reset both, trigger 14 */
	cmpl	$0, uart_fifo
	jne	1f
	xorl	%eax, %eax
1:	movw	uart_base, %dx
	addw	$UART_FCR, %dx
	outb	%al, %dx
	UART_OUT UART_MCR, 0x0b
	UART_IN	UART_LSR			/* clear stale OE */
	UART_IN	UART_MSR			/* clear stale deltas */
	UART_IN	UART_IIR
	popal
	ret

/*
 * Interrupt entry: one 8-byte stub per vector pushes its number.  CPU
 * exceptions print `exception <vec dec>` and exit 3.  The UART's IRQ calls
 * uart_isr and sends EOI (slave too for IRQ >= 8).  The handlers return
 * with popfl/sti/ret, not IRET (see .Lisr_out).  IRQ7/IRQ15 without
 * their in-service bit are spurious and ignored (IRQ15 EOIs the master for
 * the cascade).  Any other IRQ prints `stray irq <dec>` and is EOId.
 */
	.balign	8
isr_stubs:
	.set	.Lvec, 0
	.rept	IDT_ENTRIES
	.balign	8
	pushl	$.Lvec
	jmp	isr_common
	.set	.Lvec, .Lvec + 1
	.endr

isr_common:
	pushal
	cld
	movl	32(%esp), %eax			/* vector */
	cmpl	$IRQ_VECTOR_BASE, %eax
	jb	.Lisr_exception
	subl	$IRQ_VECTOR_BASE, %eax		/* IRQ number */
	cmpl	uart_irq, %eax
	jne	.Lisr_other
	call	uart_isr
	movl	uart_irq, %eax
	call	serial_pic_eoi
	jmp	.Lisr_out
.Lisr_other:
	movl	%eax, %ecx
	andl	$7, %ecx
	cmpl	$7, %ecx
	jne	.Lisr_stray
	/* IRQ7 or IRQ15: real only if its in-service bit is set. */
	movb	$0x0b, %al			/* OCW3: read ISR */
	movw	$PIC1_CMD, %dx
	cmpl	$IRQ_VECTOR_BASE + 8, 32(%esp)
	jb	1f
	movw	$PIC2_CMD, %dx
1:	outb	%al, %dx
	inb	%dx, %al
	testb	$0x80, %al
	jnz	.Lisr_stray
	cmpw	$PIC2_CMD, %dx
	jne	.Lisr_out			/* spurious IRQ7: no EOI */
	movb	$PIC_EOI, %al			/* spurious IRQ15: EOI the cascade */
	outb	%al, $PIC1_CMD
	jmp	.Lisr_out
.Lisr_stray:
	movl	32(%esp), %eax
	subl	$IRQ_VECTOR_BASE, %eax
	PUTS_LIT "stray irq "
	PUT_DEC	%eax
	PUTS_LIT "\n"
	call	serial_pic_eoi
.Lisr_out:
	popal
	addl	$4, %esp			/* vector */
	/*
	 * Return without IRET: some hosts' KVM (kvm_pvm) cannot emulate a
	 * protected-mode IRET and fails the run with an internal error.  The
	 * frame is same-privilege (EIP, CS, EFLAGS), so rebuild it as
	 * EFLAGS-without-IF, EIP and return with popfl (+ sti) and ret; STI's
	 * interrupt shadow covers the RET, so returns never nest.
	 */
	pushl	%eax
	movl	4(%esp), %eax			/* EIP */
	xchgl	%eax, 12(%esp)			/* EFLAGS slot <- EIP */
	movl	%eax, 8(%esp)			/* CS slot <- EFLAGS */
	popl	%eax
	addl	$4, %esp			/* now: EFLAGS, EIP */
	btrl	$9, (%esp)			/* IF off; CF = old IF */
	jc	1f
	popfl
	ret
1:	popfl
	sti
	ret
.Lisr_exception:
	PUTS_LIT "exception "
	PUT_DEC	%eax
	PUTS_LIT "\n"
	movl	$3, %eax
	jmp	exit

/* serial_pic_eoi(EAX = IRQ): non-specific EOI (slave first for IRQ >= 8). */
serial_pic_eoi:
	pushl	%eax
	cmpl	$8, %eax
	movb	$PIC_EOI, %al
	jb	1f
	outb	%al, $PIC2_CMD
1:	outb	%al, $PIC1_CMD
	popl	%eax
	ret

/*
 * serial_cmdline_find(ESI = key such as "n=") -> EAX = the text after the
 * key, or 0.  The key counts only at the start of a space-separated word.
 */
	.globl	serial_cmdline_find
serial_cmdline_find:
	pushl	%ebx
	pushl	%ecx
	pushl	%edx
	pushl	%edi
	call	cmdline_ptr
	testl	%eax, %eax
	jz	.Lfind_out
	movl	%eax, %edi			/* scan position */
	movl	%eax, %ebx			/* start */
.Lfind_scan:
	cmpb	$0, (%edi)
	je	.Lfind_none
	cmpl	%ebx, %edi
	je	.Lfind_try
	cmpb	$' ', -1(%edi)
	jne	.Lfind_next
.Lfind_try:
	movl	%esi, %eax
	movl	%edi, %ecx
1:	movb	(%eax), %dl
	testb	%dl, %dl
	jz	.Lfind_found
	cmpb	(%ecx), %dl
	jne	.Lfind_next
	incl	%eax
	incl	%ecx
	jmp	1b
.Lfind_next:
	incl	%edi
	jmp	.Lfind_scan
.Lfind_found:
	movl	%ecx, %eax
	jmp	.Lfind_out
.Lfind_none:
	xorl	%eax, %eax
.Lfind_out:
	popl	%edi
	popl	%edx
	popl	%ecx
	popl	%ebx
	ret

/*
 * serial_cmdline_num(ESI = key, EAX = default) -> EAX: the key's value,
 * decimal or hex after `0x`; no digits -> 0; key absent -> default.
 */
	.globl	serial_cmdline_num
serial_cmdline_num:
	pushl	%ebx
	pushl	%ecx
	pushl	%edx
	movl	%eax, %ebx			/* default */
	call	serial_cmdline_find
	testl	%eax, %eax
	jz	.Lnum_default
	movl	%eax, %ecx			/* cursor */
	xorl	%eax, %eax
	cmpb	$'0', (%ecx)
	jne	.Lnum_dec
	movb	1(%ecx), %dl
	orb	$0x20, %dl
	cmpb	$'x', %dl
	jne	.Lnum_dec
	addl	$2, %ecx
.Lnum_hex:
	movzbl	(%ecx), %edx
	subl	$'0', %edx
	cmpl	$9, %edx
	jbe	1f
	movzbl	(%ecx), %edx
	orl	$0x20, %edx			/* lowercase */
	subl	$'a', %edx
	cmpl	$5, %edx
	ja	.Lnum_out
	addl	$10, %edx
1:	shll	$4, %eax
	addl	%edx, %eax
	incl	%ecx
	jmp	.Lnum_hex
.Lnum_dec:
	movzbl	(%ecx), %edx
	subl	$'0', %edx
	cmpl	$9, %edx
	ja	.Lnum_out
	imull	$10, %eax
	addl	%edx, %eax
	incl	%ecx
	jmp	.Lnum_dec
.Lnum_default:
	movl	%ebx, %eax
.Lnum_out:
	popl	%edx
	popl	%ecx
	popl	%ebx
	ret

	.section .rodata
.Lkey_pci:
	.asciz	"pci="
.Lkey_port:
	.asciz	"port="
.Lkey_irq:
	.asciz	"irq="
.Lkey_fifo:
	.asciz	"fifo="

	.data
	.balign	4
	.globl	uart_base, uart_irq, uart_fifo
uart_base:
	.long	0x3f8
uart_irq:
	.long	4
uart_fifo:
	.long	1
	.balign	4
	.word	0
serial_idt_desc:
	.word	IDT_ENTRIES * 8 - 1
	.long	serial_idt

	.bss
	.balign	8
serial_idt:
	.skip	IDT_ENTRIES * 8
