/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * nvme_bench: bench/disk's NVMe guest.  It is the NVMe test guest's driver
 * (tests/guests/nvme_disk.c: controller enable, identify, one polled I/O
 * queue pair with doorbell buffers where offered, PRP lists), included here
 * with its own main() renamed, and this main(): with bench=seqread,
 * seqwrite or randread it moves n= 512-byte blocks in buf= requests,
 * depth= in flight, the data never touched, and prints
 *
 *   nvme bench go
 *   nvme bench end
 *   nvme bench OP R requests S sectors tsc T irqs 0
 *   nvme done
 *
 * (T: TSC cycles from the first submission to the last completion, hex;
 * the driver polls, so no interrupts).  seq* from block 0 up, back to 0
 * before a request would pass the end; randread at buf-aligned blocks from
 * xorshift32, as virtio_blk's bench= mode.
 */
#define main nvme_disk_main
#include "../../tests/guests/nvme_disk.c"
#undef main

static const char *const ops[] = { "seqread", "seqwrite", "randread" };

static uint32_t bench_op(void)
{
	const char *v = opt_find("bench=");
	uint32_t op, i;

	for (op = 0; v && op < 3; op++) {
		for (i = 0; ops[op][i] && v[i] == ops[op][i]; i++)
			;
		if (!ops[op][i] && (v[i] == ' ' || v[i] == 0))
			return op;
	}
	fail("nvme: bench= takes seqread, seqwrite or randread");
}

int main(void)
{
	uint32_t op, total, bufsz, depth, per_req, requests, blocks, k;
	uint32_t posted, done = 0, next = 0, x = 2463534242u, bdf;
	uint64_t capacity, t0, t1;
	uint16_t oacs, status;

	opt_init();
	op = bench_op();
	total = opt_num("n=", 2048);
	bufsz = opt_num("buf=", 65536);
	depth = opt_num("depth=", 8);
	if (bufsz % PAGE || bufsz == 0 || bufsz > 512u * PAGE)
		fail("nvme: buf= must be a multiple of 4096 up to 2 MiB");
	if (depth == 0 || depth > MAX_SLOTS || depth >= IO_ENTRIES)
		fail("nvme: depth= must be 1..32");
	per_req = bufsz / BLOCK;
	if (total == 0 || total % per_req)
		fail("nvme: n= must be a multiple of buf= / 512");
	requests = total / per_req;

	bdf = find_nvme();
	pci_write32(bdf, 0x04, pci_read32(bdf, 0x04) | 0x6);	/* memory, bus master */
	bar = pci_read32(bdf, 0x10) & ~0xfu;
	if (pci_read32(bdf, 0x14))
		fail("nvme: BAR 0 is above 4 GiB (paging is off)");
	if ((reg32(REG_CAP + 4) & 0xf) != 0)
		fail("nvme: doorbell stride is not 4 bytes");
	if ((reg32(REG_CAP) & 0xffff) + 1u < IO_ENTRIES)
		fail("nvme: the controller's queues are too small");
	enable();
	capacity = identify(&oacs);
	blocks = capacity >> 32 ? 0xffffffffu : (uint32_t)capacity;
	if (blocks < per_req)
		fail("nvme: the namespace is smaller than buf=");
	create_io_queue((int)opt_num("dbbuf=", 1), oacs);
	nslots = depth;
	for (k = 0; k < nslots; k++) {
		slots[k].data = mem_alloc(bufsz, PAGE);
		slots[k].prp_list = mem_zalloc(PAGE, PAGE);
	}

	con_puts("nvme bench go\n");
	t0 = rdtsc();
	for (posted = 0; posted < requests || done < requests;) {
		uint32_t block;

		if (posted < requests && posted - done < nslots) {
			if (op == 2) {
				x ^= x << 13;
				x ^= x >> 17;
				x ^= x << 5;
				block = x % (blocks / per_req) * per_req;
			} else {
				block = next;
				next = next + 2 * per_req > blocks ? 0 : next + per_req;
			}
			for (k = 0; slots[k].busy; k++)
				;
			start_io(k, op == 1 ? OP_WRITE : OP_READ, block, per_req, 0);
			posted++;
			continue;
		}
		finish_io(&status);
		if (status)
			bad_status(ops[op], status, 0);
		done++;
	}
	t1 = rdtsc();
	con_puts("nvme bench end\n");
	con_puts("nvme bench ");
	con_puts(ops[op]);
	con_putc(' ');
	con_dec(requests);
	con_puts(" requests ");
	con_dec(total);
	con_puts(" sectors tsc ");
	con_hex64(t1 - t0);
	con_puts(" irqs 0\n");
	shutdown();
	con_puts("nvme done\n");
	return 0;
}
