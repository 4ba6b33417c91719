/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kvm_loop: the smallest useful KVM VMM, the baseline of bench/exit_cost.
 *
 *   kvm_loop GUEST.elf N
 *
 * Boots a multiboot v1 ELF32 guest (tests/guests/outloop.elf) the way hvf
 * does: in-kernel irqchip and PIT, one memory slot of guest RAM, one vCPU
 * with the supported CPUID, flat 32-bit protected mode with EAX=0x2BADB002
 * and EBX pointing at a multiboot info block whose command line is "n=N".
 *
 * The exit loop handles exactly what the guest does:
 *   out to 0xE0..0xE3  the scratch register (the value is stored)
 *   out to 0x402       debug console (bytes are collected, printed at the end)
 *   out to 0xF4        stop; the value is the guest's exit value
 * Anything else is reported and the program fails (exit 2).
 *
 * Only the KVM_RUN loop is timed (CLOCK_MONOTONIC).  Output, one line each:
 *   exits <total exits to userspace>
 *   scratch_writes <outs to 0xE0>
 *   loop_ns <nanoseconds from the first KVM_RUN to the stop>
 *   ns_per_exit <loop_ns / exits>
 *   exit_value <value written to 0xF4>
 *   debugcon <what the guest printed, newlines as \n>
 */

#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GUEST_RAM_SIZE	(256ULL << 20)	/* hvf's default -m */
#define GDT_ADDR	0x500
#define MBI_ADDR	0x9000
#define CMDLINE_ADDR	0x9100
#define TSS_ADDR	0xfffbd000ULL
#define IDMAP_ADDR	0xfffbc000ULL

#define PORT_SCRATCH	0xe0
#define PORT_DEBUGCON	0x402
#define PORT_EXIT	0xf4

#define MB_BOOT_MAGIC	0x2badb002u
#define MB_FLAG_CMDLINE	(1u << 2)

static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("kvm_loop: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(2);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *name)
{
	int rc = ioctl(fd, req, arg);

	if (rc < 0)
		die("%s: %s", name, strerror(errno));
	return rc;
}

/* Copy the PT_LOAD segments of an ELF32 i386 image into guest RAM. */
static uint32_t load_elf32(const char *path, uint8_t *ram)
{
	struct stat st;
	uint8_t *img;
	Elf32_Ehdr *eh;
	uint32_t entry;
	int fd, i;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0)
		die("%s: %s", path, strerror(errno));
	if ((size_t)st.st_size < sizeof(*eh))
		die("%s: too small for an ELF image", path);
	img = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (img == MAP_FAILED)
		die("%s: mmap: %s", path, strerror(errno));
	close(fd);

	eh = (Elf32_Ehdr *)img;
	if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
	    eh->e_ident[EI_CLASS] != ELFCLASS32 ||
	    eh->e_ident[EI_DATA] != ELFDATA2LSB || eh->e_machine != EM_386)
		die("%s: not an ELF32 i386 image", path);
	if (eh->e_phentsize != sizeof(Elf32_Phdr) ||
	    eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf32_Phdr) >
	    (uint64_t)st.st_size)
		die("%s: bad program header table", path);

	for (i = 0; i < eh->e_phnum; i++) {
		Elf32_Phdr *ph = (Elf32_Phdr *)(img + eh->e_phoff) + i;

		if (ph->p_type != PT_LOAD)
			continue;
		if (ph->p_filesz > ph->p_memsz ||
		    (uint64_t)ph->p_offset + ph->p_filesz > (uint64_t)st.st_size ||
		    (uint64_t)ph->p_paddr + ph->p_memsz > GUEST_RAM_SIZE)
			die("%s: segment %d does not fit", path, i);
		memcpy(ram + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
		memset(ram + ph->p_paddr + ph->p_filesz, 0,
		       ph->p_memsz - ph->p_filesz);
	}
	entry = eh->e_entry;
	munmap(img, st.st_size);
	return entry;
}

static void put32(uint8_t *ram, uint64_t addr, uint32_t v)
{
	memcpy(ram + addr, &v, sizeof(v));
}

static void flat_segment(struct kvm_segment *seg, uint16_t sel, uint8_t type)
{
	memset(seg, 0, sizeof(*seg));
	seg->base = 0;
	seg->limit = 0xffffffff;
	seg->selector = sel;
	seg->type = type;
	seg->present = 1;
	seg->dpl = 0;
	seg->db = 1;
	seg->s = 1;
	seg->l = 0;
	seg->g = 1;
}

static struct kvm_cpuid2 *supported_cpuid(int kvm)
{
	struct kvm_cpuid2 *cpuid;
	int nent = 64;

	for (;;) {
		cpuid = calloc(1, sizeof(*cpuid) +
			       nent * sizeof(struct kvm_cpuid_entry2));
		if (cpuid == NULL)
			die("out of memory");
		cpuid->nent = nent;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
			return cpuid;
		if (errno != E2BIG)
			die("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
		free(cpuid);
		nent *= 2;
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	static const uint64_t gdt[4] = {
		0, 0,
		0x00cf9b000000ffffULL,	/* 0x10: flat 32-bit code */
		0x00cf93000000ffffULL,	/* 0x18: flat 32-bit data */
	};
	struct kvm_userspace_memory_region region;
	struct kvm_pit_config pit;
	struct kvm_cpuid2 *cpuid;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	uint64_t idmap = IDMAP_ADDR;
	uint64_t exits = 0, scratch_writes = 0, t0, t1;
	volatile uint32_t scratch = 0;
	char cmdline[64], con[256];
	size_t conlen = 0, i;
	uint32_t entry, exit_value = 0;
	uint8_t *ram;
	char *end;
	long mmap_size;
	int kvm, vm, vcpu, stopped = 0;
	unsigned long n;

	if (argc != 3)
		die("usage: kvm_loop GUEST.elf N");
	errno = 0;
	n = strtoul(argv[2], &end, 10);
	if (errno || *end || end == argv[2] || n > 0xffffffffUL)
		die("bad N '%s'", argv[2]);

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm: %s", strerror(errno));
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		die("unexpected KVM API version");
	vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	xioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap, "KVM_SET_IDENTITY_MAP_ADDR");
	if (ioctl(vm, KVM_SET_TSS_ADDR, (unsigned long)TSS_ADDR) < 0)
		die("KVM_SET_TSS_ADDR: %s", strerror(errno));
	xioctl(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
	memset(&pit, 0, sizeof(pit));
	xioctl(vm, KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");

	ram = mmap(NULL, GUEST_RAM_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		die("guest RAM: %s", strerror(errno));
	memset(&region, 0, sizeof(region));
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = GUEST_RAM_SIZE;
	region.userspace_addr = (uintptr_t)ram;
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region,
	       "KVM_SET_USER_MEMORY_REGION");

	/* Guest image, GDT, multiboot info with only a command line. */
	entry = load_elf32(argv[1], ram);
	memcpy(ram + GDT_ADDR, gdt, sizeof(gdt));
	snprintf(cmdline, sizeof(cmdline), "n=%lu", n);
	memcpy(ram + CMDLINE_ADDR, cmdline, strlen(cmdline) + 1);
	memset(ram + MBI_ADDR, 0, 88);
	put32(ram, MBI_ADDR + 0, MB_FLAG_CMDLINE);	/* flags */
	put32(ram, MBI_ADDR + 16, CMDLINE_ADDR);	/* cmdline */

	vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	cpuid = supported_cpuid(kvm);
	xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
	free(cpuid);
	mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (long)sizeof(*run))
		die("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run: %s", strerror(errno));

	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	flat_segment(&sregs.cs, 0x10, 0xb);
	flat_segment(&sregs.ds, 0x18, 0x3);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = GDT_ADDR;
	sregs.gdt.limit = sizeof(gdt) - 1;
	sregs.cr0 = 0x11;	/* PE | ET */
	sregs.cr3 = 0;
	sregs.cr4 = 0;
	sregs.efer = 0;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rax = MB_BOOT_MAGIC;
	regs.rbx = MBI_ADDR;
	regs.rip = entry;
	regs.rflags = 0x2;
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	t0 = now_ns();
	while (!stopped) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN: %s", strerror(errno));
		}
		exits++;
		if (run->exit_reason == KVM_EXIT_IO &&
		    run->io.direction == KVM_EXIT_IO_OUT && run->io.count == 1) {
			const uint8_t *data = (const uint8_t *)run + run->io.data_offset;
			uint32_t value = 0;

			if (run->io.size > sizeof(value))
				die("bad I/O size %u", run->io.size);
			memcpy(&value, data, run->io.size);
			switch (run->io.port) {
			case PORT_SCRATCH:
				scratch = value;
				scratch_writes++;
				continue;
			case PORT_DEBUGCON:
				if (conlen < sizeof(con) - 1)
					con[conlen++] = (char)value;
				continue;
			case PORT_EXIT:
				exit_value = value;
				stopped = 1;
				continue;
			}
			die("unexpected out of size %u to port %#x",
			    run->io.size, run->io.port);
		}
		if (run->exit_reason == KVM_EXIT_IO)
			die("unexpected %s of size %u count %u at port %#x",
			    run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
			    run->io.size, run->io.count, run->io.port);
		die("unexpected exit reason %u", run->exit_reason);
	}
	t1 = now_ns();
	(void)scratch;

	printf("exits %llu\n", (unsigned long long)exits);
	printf("scratch_writes %llu\n", (unsigned long long)scratch_writes);
	printf("loop_ns %llu\n", (unsigned long long)(t1 - t0));
	printf("ns_per_exit %.1f\n", exits ? (double)(t1 - t0) / exits : 0.0);
	printf("exit_value %u\n", exit_value);
	fputs("debugcon ", stdout);
	for (i = 0; i < conlen; i++) {
		if (con[i] == '\n')
			fputs("\\n", stdout);
		else
			putchar(con[i]);
	}
	putchar('\n');
	return 0;
}
