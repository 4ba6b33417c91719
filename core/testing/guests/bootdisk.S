/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * bootdisk: a 16-bit boot program for firmware disk-boot tests (hvf.testing.bootdisk).
 *
 * The firmware loads it at 0000:7C00 (as an MBR, or as an El Torito no-emulation boot
 * image) with DL = the boot drive. It talks to the disk only through int 13h:
 *
 *   1. loads the rest of itself (PARAM_STAGE 512-byte sectors from LBA 1, to 0x7E00;
 *      none for a CD, whose whole image the firmware loads);
 *   2. prints `bootdisk TAG drive DD sector N` on COM1 (polling the UART at 0x3F8);
 *   3. reads PARAM_DATA_COUNT sectors from PARAM_DATA_LBA with extended reads (AH=42h,
 *      32 KiB per call) and checks every dword: the one at byte offset o of the area
 *      is SEED + o/4. Prints `bootdisk TAG read N bytes ok`, or
 *      `bootdisk TAG read FAIL lba XXXXXXXX status SS` (int 13h error, status AH) or
 *      `bootdisk TAG read FAIL lba XXXXXXXX mismatch` (first bad sector);
 *   4. unless PARAM_WRITE_COUNT is 0, writes that many sectors at PARAM_WRITE_LBA with
 *      one extended write (AH=43h), dword at offset o = ~SEED + o/4, and prints
 *      `bootdisk TAG wrote N sectors at lba XXXXXXXX` or
 *      `bootdisk TAG write FAIL lba XXXXXXXX status SS`;
 *   5. prints `bootdisk TAG done`, writes 0 (all passed) or 1 to port 0xF4 (pc-testdev:
 *      hvf exits with 1 or 3), then powers off through ACPI PM1a_CNT at 0x604
 *      (hvf exits with 1), then halts.
 *
 * Lines end in CR LF. The parameters sit at offset 0x10 of the first sector (magic "HVFBOOT1"), patched by
 * the image builder; hex is lowercase.
 */

	.code16
	.text
	.globl	_start

	.equ	LOAD,		0x7c00
	.equ	COM1,		0x3f8
	.equ	BUF_SEG,	0x1000		/* 32 KiB transfer buffer at 0x10000 */
	.equ	CHUNK,		0x8000
	.equ	TESTDEV_EXIT,	0xf4
	.equ	PM1A_CNT,	0x604
	.equ	SLP_S5,		0x3400		/* SLP_EN | SLP_TYP 5 */

_start:
	jmp	entry
	.org	0x10
params:
	.ascii	"HVFBOOT1"
tag:	.fill	16, 1, 0		/* NUL-padded ASCII */
stage:	.word	0			/* 512-byte sectors after this one (LBA 1..) */
sector:	.word	512			/* the medium's sector size */
data_lba:	.long	0
data_count:	.long	0		/* sectors */
seed:	.long	0
write_lba:	.long	0
write_count:	.word	0		/* sectors, at most 32 KiB */
	.word	0

entry:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	$LOAD, %sp
	ljmp	$0, $1f				/* CS:IP may be 07C0:0000 */
1:	sti
	cld
	movb	%dl, drive
	movw	stage, %cx
	jcxz	2f
	movw	%cx, dap_count
	movw	$LOAD + 0x200, dap_off
	movw	$0, dap_seg
	movl	$1, dap_lba
	movb	$0x42, %ah
	call	disk
	jnc	2f
	movb	$'!', %al			/* no COM1 helpers before stage 2 */
	call	putc
	jmp	finish_fail
2:	jmp	main

/* putc(AL) on COM1, waiting for THR empty */
putc:
	pushw	%dx
	pushw	%ax
	movw	$COM1 + 5, %dx
1:	inb	%dx, %al
	testb	$0x20, %al
	jz	1b
	popw	%ax
	movw	$COM1, %dx
	outb	%al, %dx
	popw	%dx
	ret

/* int 13h function AH with the DAP; CF and AH as the BIOS left them */
disk:
	movb	drive, %dl
	movw	$dap, %si
	movb	$0, %al
	int	$0x13
	ret

finish_fail:
	movl	$1, %eax
	outl	%eax, $TESTDEV_EXIT
	movw	$PM1A_CNT, %dx
	movw	$SLP_S5, %ax
	outw	%ax, %dx
	cli
3:	hlt
	jmp	3b

	.balign	4
dap:	.byte	0x10, 0
dap_count:	.word	0
dap_off:	.word	0
dap_seg:	.word	0
dap_lba:	.long	0, 0
drive:	.byte	0

	.org	0x1b8, 0x90			/* disk signature and partition table follow */
	.org	0x1fe
	.word	0xaa55

/* ---- stage 2 (0x7E00) ---- */

/* puts(SI = NUL-terminated string) */
puts:
	pushw	%ax
	pushw	%si
1:	lodsb
	testb	%al, %al
	jz	2f
	call	putc
	jmp	1b
2:	popw	%si
	popw	%ax
	ret

/* prefix: "bootdisk TAG " */
prefix:
	pushw	%si
	movw	$s_bootdisk, %si
	call	puts
	movw	$tag, %si
	call	puts
	movb	$' ', %al
	call	putc
	popw	%si
	ret

/* puthex(EAX = value, CX = digits) */
puthex:
	pushl	%eax
	pushl	%ebx
	pushw	%cx
	movl	%eax, %ebx
	movw	%cx, %ax
	negw	%cx
	addw	$8, %cx
	shlw	$2, %cx
	shll	%cl, %ebx			/* first digit on top */
	movw	%ax, %cx
1:	roll	$4, %ebx
	movb	%bl, %al
	andb	$0xf, %al
	addb	$'0', %al
	cmpb	$'9', %al
	jbe	2f
	addb	$'a' - '9' - 1, %al
2:	call	putc
	loop	1b
	popw	%cx
	popl	%ebx
	popl	%eax
	ret

/* putdec(EAX) */
putdec:
	pushal
	movl	$10, %ebx
	xorw	%cx, %cx
1:	xorl	%edx, %edx
	divl	%ebx
	pushw	%dx
	incw	%cx
	testl	%eax, %eax
	jnz	1b
2:	popw	%ax
	addb	$'0', %al
	call	putc
	loop	2b
	popal
	ret

newline:
	movw	$s_newline, %si
	jmp	puts

/* " lba XXXXXXXX" for EAX */
put_lba:
	movw	$s_lba, %si
	call	puts
	movw	$8, %cx
	jmp	puthex

/* " status SS" for AH, then a newline; sets the failure flag */
put_status:
	movw	$s_status, %si
	call	puts
	movb	%ah, %al
	movzbl	%al, %eax
	movw	$2, %cx
	call	puthex
	movb	$1, failed
	jmp	newline

main:
	call	prefix
	movw	$s_drive, %si
	call	puts
	movzbl	drive, %eax
	movw	$2, %cx
	call	puthex
	movw	$s_sector, %si
	call	puts
	movzwl	sector, %eax
	call	putdec
	call	newline

	/* ---- read and check ---- */
	movw	$CHUNK, %ax
	xorw	%dx, %dx
	divw	sector
	movw	%ax, chunk			/* sectors per call */
	movl	data_lba, %eax
	movl	%eax, dap_lba
	movl	data_count, %eax
	movl	%eax, remaining
	movl	seed, %ebx			/* expected next dword */
read_loop:
	movl	remaining, %eax
	testl	%eax, %eax
	jz	read_done
	movzwl	chunk, %ecx
	cmpl	%ecx, %eax
	jae	1f
	movw	%ax, %cx
1:	movw	%cx, this_count
	movw	%cx, dap_count
	movw	$0, dap_off
	movw	$BUF_SEG, dap_seg
	movb	$0x42, %ah
	call	disk
	jc	read_error
	/* check this_count * sector / 4 dwords at BUF_SEG:0 */
	movzwl	this_count, %eax
	movzwl	sector, %ecx
	mull	%ecx
	shrl	$2, %eax
	movw	%ax, %cx			/* at most 8192 */
	pushw	%ds
	movw	$BUF_SEG, %ax
	movw	%ax, %ds
	xorw	%si, %si
2:	lodsl
	cmpl	%ebx, %eax
	jne	3f
	incl	%ebx
	loop	2b
	popw	%ds
	movzwl	this_count, %eax
	addl	%eax, dap_lba
	subl	%eax, remaining
	jmp	read_loop
3:	popw	%ds
	jmp	read_mismatch

read_error:
	pushw	%ax
	call	prefix
	movw	$s_readfail, %si
	call	puts
	movl	dap_lba, %eax
	call	put_lba
	popw	%ax
	call	put_status
	jmp	write

read_mismatch:
	call	prefix
	movw	$s_readfail, %si
	call	puts
	movl	%ebx, %eax			/* dword index -> sector */
	subl	seed, %eax
	shll	$2, %eax
	xorl	%edx, %edx
	movzwl	sector, %ecx
	divl	%ecx
	addl	data_lba, %eax
	call	put_lba
	movw	$s_mismatch, %si
	call	puts
	movb	$1, failed
	jmp	write

read_done:
	call	prefix
	movw	$s_read, %si
	call	puts
	movl	data_count, %eax
	movzwl	sector, %ecx
	mull	%ecx
	call	putdec
	movw	$s_bytes_ok, %si
	call	puts

	/* ---- write ---- */
write:
	movw	write_count, %ax
	testw	%ax, %ax
	jz	done
	movw	%ax, dap_count
	mulw	sector
	shrw	$2, %ax
	movw	%ax, %cx			/* dwords */
	movl	seed, %eax
	notl	%eax
	pushw	%es
	movw	$BUF_SEG, %dx
	movw	%dx, %es
	xorw	%di, %di
1:	stosl
	incl	%eax
	loop	1b
	popw	%es
	movw	$0, dap_off
	movw	$BUF_SEG, dap_seg
	movl	write_lba, %eax
	movl	%eax, dap_lba
	movb	$0x43, %ah
	call	disk
	jc	write_error
	call	prefix
	movw	$s_wrote, %si
	call	puts
	movzwl	write_count, %eax
	call	putdec
	movw	$s_sectors_at, %si
	call	puts
	movl	write_lba, %eax
	call	put_lba
	call	newline
	jmp	done

write_error:
	pushw	%ax
	call	prefix
	movw	$s_writefail, %si
	call	puts
	movl	write_lba, %eax
	call	put_lba
	popw	%ax
	call	put_status

done:
	call	prefix
	movw	$s_done, %si
	call	puts
	cmpb	$0, failed
	jne	finish_fail
	xorl	%eax, %eax
	outl	%eax, $TESTDEV_EXIT
	movw	$PM1A_CNT, %dx
	movw	$SLP_S5, %ax
	outw	%ax, %dx
	cli
4:	hlt
	jmp	4b

s_bootdisk:	.asciz	"bootdisk "
s_drive:	.asciz	"drive "
s_sector:	.asciz	" sector "
s_read:		.asciz	"read "
s_bytes_ok:	.asciz	" bytes ok\r\n"
s_readfail:	.asciz	"read FAIL"
s_mismatch:	.asciz	" mismatch\r\n"
s_lba:		.asciz	" lba "
s_status:	.asciz	" status "
s_wrote:	.asciz	"wrote "
s_sectors_at:	.asciz	" sectors at"
s_writefail:	.asciz	"write FAIL"
s_done:		.asciz	"done\r\n"
s_newline:	.asciz	"\r\n"

	.balign	4
remaining:	.long	0
chunk:		.word	0
this_count:	.word	0
failed:		.byte	0

	.balign	512, 0
