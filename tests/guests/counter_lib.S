/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * Shared runtime of the counter* guests (save/restore test guests).  Not a
 * guest itself: each counter guest does `.include "counter_lib.S"` at its
 * end (build.py lists it as an extra dependency of those guests).
 *
 * Paging: the guests run with IA-32e (4-level) paging on, but all of their
 * own code (and common.S) keeps running as 32-bit code in compatibility
 * mode (CS 0x08); only the interrupt entry stubs are 64-bit code (CS 0x18).
 * Legacy 32-bit and PAE paging are not used because kvm_pvm (the KVM of
 * the development host) answers a MOV to CR0 that sets PG with #GP unless
 * EFER.LME is set, and it cannot emulate IRET with paging off.
 *
 * ctr_setup()        reads `debugcon=`, `every=` and `limit=` from the
 *                    cmdline, loads ctr_gdt, builds the page tables, turns
 *                    paging on (ctr_paging_on), loads the 64-bit IDT
 *                    (an exception or unexpected vector prints
 *                    `counter: unexpected vector V err E eip I cr2 C`
 *                    and exits with value 2), initialises COM1 (polled, IER 0)
 *                    and puts the local APIC in virtual-wire mode (SVR
 *                    enabled, LVT0 ExtINT).  IF stays clear.
 * ctr_timer_setup()  remaps the 8259 pair to vectors 0x20-0x2F, unmasks
 *                    only IRQ 0, programs PIT channel 0 in mode 2 with
 *                    divisor 11932 (~100 Hz).  IF stays clear.
 * ctr_load_gdt()     lgdt ctr_gdt and reload all segment registers.
 * ctr_paging_on()    CR4.PAE, CR3 = ctr_pml4, EFER.LME, CR0.PG (called in
 *                    32-bit protected mode; returns in compatibility mode).
 * ctr_load_idt()     lidt of the shared 64-bit IDT (done in 64-bit mode).
 * ctr_putc(AL), ctr_puts(ESI), ctr_putdec(EAX)
 *                    print on COM1 (LSR.THRE polled before each byte) and,
 *                    if `debugcon=1`, on the debug console too.
 *                    All registers preserved.
 * ctr_com1_wait()    spin until LSR.THRE is set.
 * ctr_wait_tick()    one idle step: if ticks - ctr_last_tick < ctr_every,
 *                    `sti; hlt` and return CF=0; else set ctr_last_tick =
 *                    ticks and return CF=1.  IF is set on return.
 *
 * Identity map: 0-2 MiB through one 4 KiB page table, 2 MiB-1 GiB as
 * 2 MiB pages, 0xFEC00000-0xFEFFFFFF (IOAPIC, local APIC) as two 2 MiB
 * pages with PCD|PWT.  Nothing writes the page tables once paging is on.
 */

	.equ	COM1_BASE,	0x3f8
	.equ	COM1_THR,	COM1_BASE + 0
	.equ	COM1_IER,	COM1_BASE + 1
	.equ	COM1_FCR,	COM1_BASE + 2
	.equ	COM1_LCR,	COM1_BASE + 3
	.equ	COM1_MCR,	COM1_BASE + 4
	.equ	COM1_LSR,	COM1_BASE + 5
	.equ	COM1_LSR_THRE,	0x20

	.equ	CTR_PIC1_CMD,	0x20
	.equ	CTR_PIC1_DATA,	0x21
	.equ	CTR_PIC2_CMD,	0xa0
	.equ	CTR_PIC2_DATA,	0xa1
	.equ	CTR_PIC_EOI,	0x20

	.equ	CTR_PIT_CH0,	0x40
	.equ	CTR_PIT_CMD,	0x43
	.equ	CTR_PIT_DIVISOR, 11932		/* 1193182 Hz / 11932 = ~100 Hz */

	.equ	CTR_LAPIC_SVR,	0xfee000f0
	.equ	CTR_LAPIC_LVT0,	0xfee00350

	.equ	CTR_CODE64_SEL,	0x18		/* 64-bit code in ctr_gdt */
	.equ	CTR_MSR_EFER,	0xc0000080
	.equ	CTR_EXIT_UNEXPECTED, 2		/* exit value on a stray vector */

/*
 * Entry stub for vector v (64-bit code): push a dummy error code where the
 * CPU pushes none, then the vector, and go to ctr_unexpected64.
 */
.macro CTR_STUB v
	.pushsection .rodata
	.long	.Lctr_stub\@
	.popsection
.Lctr_stub\@:
	.if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
	.else
	pushq	$0
	.endif
	pushq	$\v
	jmp	ctr_unexpected64
.endm

	.text

/* ------------------------------------------------------------------ */

	.globl	ctr_setup
ctr_setup:
	pushal
	movl	$.Lctr_key_debugcon, %esi
	xorl	%eax, %eax
	call	cmdline_num
	movl	%eax, ctr_debugcon
	movl	$.Lctr_key_every, %esi
	movl	$10, %eax
	call	cmdline_num
	testl	%eax, %eax
	jnz	1f
	incl	%eax				/* every=0 reads as 1 */
1:	movl	%eax, ctr_every
	movl	$.Lctr_key_limit, %esi
	xorl	%eax, %eax
	call	cmdline_num
	movl	%eax, ctr_limit

	call	ctr_load_gdt
	call	ctr_build_page_tables
	call	ctr_paging_on
	call	ctr_build_idt
	call	ctr_load_idt

	/* COM1: IER 0, 115200 8N1, FIFO on and cleared, DTR|RTS (no OUT2). */
	movw	$COM1_IER, %dx
	movb	$0x00, %al
	outb	%al, %dx
	movw	$COM1_LCR, %dx
	movb	$0x80, %al			/* DLAB */
	outb	%al, %dx
	movw	$COM1_BASE, %dx
	movb	$0x01, %al			/* DLL */
	outb	%al, %dx
	movw	$COM1_IER, %dx
	movb	$0x00, %al			/* DLM */
	outb	%al, %dx
	movw	$COM1_LCR, %dx
	movb	$0x03, %al
	outb	%al, %dx
	movw	$COM1_FCR, %dx
	movb	$0xc7, %al
	outb	%al, %dx
	movw	$COM1_MCR, %dx
	movb	$0x03, %al
	outb	%al, %dx

	/* Local APIC: software enable (spurious vector 0xff), LINT0 ExtINT. */
	movl	CTR_LAPIC_SVR, %eax
	orl	$0x1ff, %eax
	movl	%eax, CTR_LAPIC_SVR
	movl	$0x00000700, CTR_LAPIC_LVT0
	popal
	ret

	.globl	ctr_load_gdt
ctr_load_gdt:
	pushl	%eax
	lgdt	ctr_gdt_desc
	ljmp	$CODE_SEL, $1f
1:	movw	$DATA_SEL, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %fs
	movw	%ax, %gs
	movw	%ax, %ss
	popl	%eax
	ret

/* ------------------------------------------------------------------ */
/* Paging                                                              */

ctr_build_page_tables:
	pushal
	movl	$ctr_pt0, %edi			/* 0-2 MiB: 4 KiB pages, RW|P */
	movl	$0x003, %eax
	movl	$512, %ecx
1:	movl	%eax, (%edi)
	movl	$0, 4(%edi)
	addl	$8, %edi
	addl	$0x1000, %eax
	loop	1b
	movl	$ctr_pd0 + 8, %edi		/* 2 MiB-1 GiB: PS|RW|P */
	movl	$0x00200083, %eax
	movl	$511, %ecx
2:	movl	%eax, (%edi)
	movl	$0, 4(%edi)
	addl	$8, %edi
	addl	$0x00200000, %eax
	loop	2b
	movl	$ctr_pt0 + 0x003, ctr_pd0
	/* 0xFEC00000 and 0xFEE00000: PS|PCD|PWT|RW|P in the 3-4 GiB PD */
	movl	$0xfec00000 + 0x09b, ctr_pd3 + 0x1f6 * 8
	movl	$0xfee00000 + 0x09b, ctr_pd3 + 0x1f7 * 8
	movl	$ctr_pd0 + 0x003, ctr_pdpt
	movl	$ctr_pd3 + 0x003, ctr_pdpt + 3 * 8
	movl	$ctr_pdpt + 0x003, ctr_pml4
	popal
	ret

	.globl	ctr_paging_on
ctr_paging_on:
	pushl	%eax
	pushl	%ecx
	pushl	%edx
	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	$ctr_pml4, %eax
	movl	%eax, %cr3
	movl	$CTR_MSR_EFER, %ecx
	rdmsr
	orl	$0x100, %eax			/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000000, %eax		/* PG: IA-32e, compatibility mode */
	movl	%eax, %cr0
	jmp	1f
1:	popl	%edx
	popl	%ecx
	popl	%eax
	ret

/* ------------------------------------------------------------------ */
/* IDT (64-bit gates)                                                  */

/* ctr_set_gate(EAX = vector, EDX = 64-bit handler below 4 GiB). */
	.globl	ctr_set_gate
ctr_set_gate:
	pushl	%ebx
	pushl	%edx
	movl	%eax, %ebx
	shll	$4, %ebx
	addl	$ctr_idt, %ebx
	movw	%dx, (%ebx)
	movw	$CTR_CODE64_SEL, 2(%ebx)
	movw	$0x8e00, 4(%ebx)		/* present, DPL 0, interrupt gate */
	shrl	$16, %edx
	movw	%dx, 6(%ebx)
	movl	$0, 8(%ebx)
	movl	$0, 12(%ebx)
	popl	%edx
	popl	%ebx
	ret

/* Vectors 0-47 and 0xff get gates; the rest stay not-present (-> #NP). */
ctr_build_idt:
	pushal
	xorl	%eax, %eax
1:	movl	ctr_stub_table(,%eax,4), %edx
	call	ctr_set_gate
	incl	%eax
	cmpl	$48, %eax
	jb	1b
	movl	$0x20, %eax
	movl	$ctr_pit_isr64, %edx
	call	ctr_set_gate
	movl	$0x27, %eax			/* spurious IRQ 7 */
	movl	$ctr_iret64, %edx
	call	ctr_set_gate
	movl	$0x2f, %eax			/* spurious IRQ 15 */
	call	ctr_set_gate
	movl	$0xff, %eax			/* local APIC spurious vector */
	call	ctr_set_gate
	popal
	ret

/* lidt in 64-bit mode, so that the whole 10-byte IDTR is defined. */
	.globl	ctr_load_idt
ctr_load_idt:
	pushl	%eax
	ljmp	$CTR_CODE64_SEL, $1f
	.code64
1:	lidt	ctr_idt_desc(%rip)
	pushq	$CODE_SEL
	leaq	2f(%rip), %rax
	pushq	%rax
	lretq
	.code32
2:	popl	%eax
	ret

/* ------------------------------------------------------------------ */
/* 64-bit interrupt entry points                                       */

	.code64
ctr_pit_isr64:
	pushq	%rax
	incl	ctr_ticks(%rip)
	movb	$CTR_PIC_EOI, %al
	outb	%al, $CTR_PIC1_CMD
	popq	%rax
ctr_iret64:
	iretq

	.pushsection .rodata
	.balign	4
ctr_stub_table:
	.popsection
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	CTR_STUB \v
	.endr
	.irp v, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
	CTR_STUB \v
	.endr

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.  Print and exit
 * from 32-bit code. */
ctr_unexpected64:
	movl	(%rsp), %ebx			/* vector */
	movl	8(%rsp), %ecx			/* error code */
	movl	16(%rsp), %edx			/* RIP (low half) */
	pushq	$CODE_SEL
	leaq	ctr_unexpected32(%rip), %rax
	pushq	%rax
	lretq
	.code32

ctr_unexpected32:
	cli
	movl	$.Lctr_msg_vec, %esi
	call	ctr_puts
	movl	%ebx, %eax
	call	ctr_putdec
	movl	$.Lctr_msg_err, %esi
	call	ctr_puts
	movl	%ecx, %eax
	call	ctr_puthex32
	movl	$.Lctr_msg_eip, %esi
	call	ctr_puts
	movl	%edx, %eax
	call	ctr_puthex32
	movl	$.Lctr_msg_cr2, %esi
	call	ctr_puts
	movl	%cr2, %eax
	call	ctr_puthex32
	movb	$'\n', %al
	call	ctr_putc
	movl	$CTR_EXIT_UNEXPECTED, %eax
	jmp	exit

/* ------------------------------------------------------------------ */
/* 8259 + PIT                                                          */

	.globl	ctr_timer_setup
ctr_timer_setup:
	pushl	%eax
	movb	$0x11, %al			/* ICW1: edge, cascade, ICW4 */
	outb	%al, $CTR_PIC1_CMD
	outb	%al, $CTR_PIC2_CMD
	movb	$0x20, %al			/* ICW2: vector bases */
	outb	%al, $CTR_PIC1_DATA
	movb	$0x28, %al
	outb	%al, $CTR_PIC2_DATA
	movb	$0x04, %al			/* ICW3: slave on IRQ 2 */
	outb	%al, $CTR_PIC1_DATA
	movb	$0x02, %al
	outb	%al, $CTR_PIC2_DATA
	movb	$0x01, %al			/* ICW4: 8086 mode */
	outb	%al, $CTR_PIC1_DATA
	outb	%al, $CTR_PIC2_DATA
	movb	$0xfe, %al			/* only IRQ 0 */
	outb	%al, $CTR_PIC1_DATA
	movb	$0xff, %al
	outb	%al, $CTR_PIC2_DATA

	movb	$0x34, %al			/* ch 0, lo/hi, mode 2, binary */
	outb	%al, $CTR_PIT_CMD
	movb	$(CTR_PIT_DIVISOR & 0xff), %al
	outb	%al, $CTR_PIT_CH0
	movb	$(CTR_PIT_DIVISOR >> 8), %al
	outb	%al, $CTR_PIT_CH0
	popl	%eax
	ret

	.globl	ctr_wait_tick
ctr_wait_tick:
	pushl	%eax
	cli
	movl	ctr_ticks, %eax
	subl	ctr_last_tick, %eax
	cmpl	ctr_every, %eax
	jae	1f
	sti
	hlt					/* STI shadow: no lost wake-up */
	popl	%eax
	clc
	ret
1:	movl	ctr_ticks, %eax
	movl	%eax, ctr_last_tick
	sti
	popl	%eax
	stc
	ret

/* ------------------------------------------------------------------ */
/* Output: COM1 (polled) and optionally the debug console              */

	.globl	ctr_com1_wait
ctr_com1_wait:
	pushl	%eax
	pushl	%edx
	movw	$COM1_LSR, %dx
1:	inb	%dx, %al
	testb	$COM1_LSR_THRE, %al
	jnz	2f
	pause
	jmp	1b
2:	popl	%edx
	popl	%eax
	ret

	.globl	ctr_putc
ctr_putc:
	pushl	%edx
	call	ctr_com1_wait
	movw	$COM1_THR, %dx
	outb	%al, %dx
	cmpl	$0, ctr_debugcon
	je	1f
	movw	$DEBUGCON_PORT, %dx
	outb	%al, %dx
1:	popl	%edx
	ret

	.globl	ctr_puts
ctr_puts:
	pushl	%eax
	pushl	%esi
1:	lodsb
	testb	%al, %al
	jz	2f
	call	ctr_putc
	jmp	1b
2:	popl	%esi
	popl	%eax
	ret

/* ctr_putdec(EAX): unsigned decimal. */
	.globl	ctr_putdec
ctr_putdec:
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
2:	popl	%eax
	call	ctr_putc
	loop	2b
	popal
	ret

/* ctr_puthex32(EAX): 8 lowercase hex digits. */
ctr_puthex32:
	pushal
	movl	%eax, %ebx
	movl	$8, %ecx
1:	roll	$4, %ebx
	movl	%ebx, %eax
	andl	$0xf, %eax
	movb	.Lctr_hex(%eax), %al
	call	ctr_putc
	loop	1b
	popal
	ret

/* ------------------------------------------------------------------ */

	.section .rodata
.Lctr_key_debugcon:
	.asciz	"debugcon="
.Lctr_key_every:
	.asciz	"every="
.Lctr_key_limit:
	.asciz	"limit="
.Lctr_msg_vec:
	.asciz	"counter: unexpected vector "
.Lctr_msg_err:
	.asciz	" err "
.Lctr_msg_eip:
	.asciz	" eip "
.Lctr_msg_cr2:
	.asciz	" cr2 "
.Lctr_hex:
	.ascii	"0123456789abcdef"

	.data
	.balign	4
	.globl	ctr_ticks, ctr_last_tick, ctr_every, ctr_limit, ctr_debugcon
ctr_ticks:
	.long	0
ctr_last_tick:
	.long	0
ctr_every:
	.long	10
ctr_limit:
	.long	0
ctr_debugcon:
	.long	0

	/* In .data: the CPU sets descriptor accessed bits. */
	.balign	8
	.globl	ctr_gdt
ctr_gdt:
	.quad	0x0000000000000000		/* null */
	.quad	0x00cf9a000000ffff		/* 0x08: flat code, 32-bit */
	.quad	0x00cf92000000ffff		/* 0x10: flat data */
	.quad	0x00af9a000000ffff		/* 0x18: code, 64-bit (L=1) */
ctr_gdt_end:
	.balign	4
	.word	0
	.globl	ctr_gdt_desc
ctr_gdt_desc:					/* 6 bytes (32-bit lgdt) */
	.word	ctr_gdt_end - ctr_gdt - 1
	.long	ctr_gdt
	.balign	8
	.word	0, 0, 0
ctr_idt_desc:					/* 10 bytes (64-bit lidt) */
	.word	256 * 16 - 1
	.long	ctr_idt, 0

	.bss
	.balign	4096
ctr_pml4:
	.skip	4096
ctr_pdpt:
	.skip	4096
ctr_pd0:
	.skip	4096
ctr_pd3:
	.skip	4096
ctr_pt0:
	.skip	4096
ctr_idt:
	.skip	256 * 16
