/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * nvme_disk: an NVMe 1.4 host driver (PCI class 01:08:02) that polls its
 * completion queues.  It enables the controller with an admin queue,
 * identifies it and namespace 1, creates one I/O queue pair, writes n=
 * blocks of a pattern with up to depth= commands in flight (buf= bytes
 * each, through PRP lists), flushes, reads them back and compares, then
 * deallocates the first half with Dataset Management and reads zeros
 * there, zeroes a few blocks with Write Zeroes, checks that a read past
 * the end is refused, and shuts the controller down.  It prints
 *
 *   nvme version 1.4.0
 *   nvme model M serial S
 *   nvme capacity C blocks of B
 *   nvme queue depth D dbbuf X
 *   nvme wrote N
 *   nvme flushed
 *   nvme read N ok             (or: nvme mismatch at block B word W)
 *   nvme discarded K
 *   nvme discard reads zero
 *   nvme write-zeroes ok
 *   nvme out-of-range refused
 *   nvme shutdown ok
 *   nvme done
 *
 * With ro=1 it only expects a write to be refused (Namespace Is Write
 * Protected) and prints `nvme write refused`.  With dbbuf=1 (the
 * default) it configures doorbell buffers when the controller offers
 * them and then rings the I/O queue's doorbells only when EventIdx asks
 * for it, as Linux does.  Blocks are 512 bytes (the image's default).
 */
#include "virtio.h"

#define CLASS_NVME		0x010802u
#define PAGE			4096u

#define REG_CAP			0x00
#define REG_VS			0x08
#define REG_CC			0x14
#define REG_CSTS		0x1c
#define REG_AQA			0x24
#define REG_ASQ			0x28
#define REG_ACQ			0x30
#define DOORBELLS		0x1000

#define CC_EN			1u
#define CC_ENTRY_SIZES		(6u << 16 | 4u << 20)
#define CC_SHN_NORMAL		(1u << 14)
#define CSTS_RDY		1u
#define CSTS_CFS		2u
#define CSTS_SHST(c)		(((c) >> 2) & 3u)

#define OP_CREATE_SQ		0x01
#define OP_CREATE_CQ		0x05
#define OP_IDENTIFY		0x06
#define OP_SET_FEATURES		0x09
#define OP_DOORBELL_BUFFERS	0x7c
#define OP_FLUSH		0x00
#define OP_WRITE		0x01
#define OP_READ			0x02
#define OP_WRITE_ZEROES		0x08
#define OP_DSM			0x09

#define SC_LBA_OUT_OF_RANGE	0x80
#define SC_WRITE_PROTECTED	0x20
#define FEAT_NUMBER_OF_QUEUES	0x07
#define DSM_DEALLOCATE		(1u << 2)

#define ADMIN_ENTRIES		16
#define IO_ENTRIES		64
#define MAX_SLOTS		32
#define BLOCK			512u
#define BLOCK_WORDS		(BLOCK / 4)
#define PATTERN_MUL		0x9E3779B1u
#define PATTERN_XOR		0xA5A5A5A5u
#define TIMEOUT_SPINS		400000000u

struct sqe {
	uint32_t cdw0;		/* opcode, CID << 16 */
	uint32_t nsid;
	uint64_t reserved;
	uint64_t mptr;
	uint64_t prp1;
	uint64_t prp2;
	uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct cqe {
	uint32_t dw0;
	uint32_t dw1;
	uint16_t sq_head;
	uint16_t sqid;
	uint16_t cid;
	uint16_t status;	/* phase in bit 0 */
};

struct queue {
	uint16_t qid, size, tail, head, phase;
	volatile struct sqe *sq;
	volatile struct cqe *cq;
};

struct slot {
	uint32_t *data;
	uint64_t *prp_list;
	uint32_t block, count;
	int busy;
};

static uint32_t bar;
static struct queue admin, io;
static struct slot slots[MAX_SLOTS];
static uint32_t nslots, block_shift = 9;
static volatile uint32_t *shadow, *eventidx;	/* doorbell buffers, or 0 */

static uint32_t reg32(uint32_t off) { return mmio_read32(bar + off); }
static void set_reg32(uint32_t off, uint32_t v) { mmio_write32(bar + off, v); }

static uint32_t find_nvme(void)
{
	uint32_t devfn;

	for (devfn = 0; devfn < 256; devfn++) {
		uint32_t bdf = devfn << 8;

		if ((pci_read32(bdf, 0) & 0xffff) == 0xffff)
			continue;
		if (pci_read32(bdf, 0x08) >> 8 == CLASS_NVME)
			return bdf;
	}
	fail("nvme: no controller (class 01:08:02) on bus 0");
}

static void wait_csts(uint32_t mask, uint32_t want, const char *what)
{
	uint32_t spins;

	for (spins = 0; spins < TIMEOUT_SPINS; spins++) {
		uint32_t csts = reg32(REG_CSTS);

		if (csts & CSTS_CFS) {
			con_puts("nvme: controller fatal status while ");
			fail(what);
		}
		if ((csts & mask) == want)
			return;
		cpu_pause();
	}
	con_puts("nvme: timed out ");
	fail(what);
}

/* Ring doorbell index i (2 qid for a tail, 2 qid + 1 for a head). */
static void doorbell(uint32_t index, uint16_t value)
{
	if (shadow && index > 1) {
		uint16_t old = (uint16_t)shadow[index], event;

		shadow[index] = value;
		__asm__ volatile("lock; addl $0, (%%esp)" ::: "memory", "cc");
		event = (uint16_t)eventidx[index];
		if ((uint16_t)(value - event - 1) >= (uint16_t)(value - old))
			return;	/* the controller is still looking: no need */
	}
	set_reg32(DOORBELLS + 4 * index, value);
}

static volatile struct sqe *next_sqe(struct queue *q, uint8_t opcode, uint16_t cid)
{
	volatile struct sqe *e = &q->sq[q->tail];

	memset((void *)e, 0, sizeof(*e));
	e->cdw0 = opcode | (uint32_t)cid << 16;
	return e;
}

static void submit(struct queue *q)
{
	q->tail = (uint16_t)((q->tail + 1) % q->size);
	barrier();
	doorbell(2u * q->qid, q->tail);
}

/* The next completion of q (waiting for it); its status field (0: success). */
static uint16_t reap(struct queue *q, uint16_t *cid)
{
	volatile struct cqe *e = &q->cq[q->head];
	uint32_t spins = 0;
	uint16_t status;

	while ((e->status & 1) != q->phase) {
		if (++spins == TIMEOUT_SPINS)
			fail("nvme: timed out waiting for a completion");
		cpu_pause();
	}
	barrier();
	status = e->status >> 1;
	if (cid)
		*cid = e->cid;
	if (++q->head == q->size) {
		q->head = 0;
		q->phase ^= 1;
	}
	doorbell(2u * q->qid + 1, q->head);
	return status;
}

static uint16_t admin_command(void)
{
	submit(&admin);
	return reap(&admin, 0);
}

static void check(uint16_t status, const char *what)
{
	if (status) {
		con_puts("nvme: ");
		con_puts(what);
		con_puts(" failed, status ");
		con_hex(status, 4);
		con_putc('\n');
		guest_exit(1);
	}
}

static void put_field(const uint8_t *p, uint32_t n)
{
	while (n && p[n - 1] == ' ')
		n--;
	while (n--)
		con_putc((char)*p++);
}

static void enable(void)
{
	set_reg32(REG_CC, 0);
	wait_csts(CSTS_RDY, 0, "disabling");
	admin.qid = 0;
	admin.size = ADMIN_ENTRIES;
	admin.phase = 1;
	admin.sq = mem_zalloc(ADMIN_ENTRIES * sizeof(struct sqe), PAGE);
	admin.cq = mem_zalloc(ADMIN_ENTRIES * sizeof(struct cqe), PAGE);
	set_reg32(REG_AQA, (ADMIN_ENTRIES - 1) << 16 | (ADMIN_ENTRIES - 1));
	set_reg32(REG_ASQ, (uint32_t)admin.sq);
	set_reg32(REG_ASQ + 4, 0);
	set_reg32(REG_ACQ, (uint32_t)admin.cq);
	set_reg32(REG_ACQ + 4, 0);
	set_reg32(REG_CC, CC_EN | CC_ENTRY_SIZES);
	wait_csts(CSTS_RDY, CSTS_RDY, "enabling");
}

/* Identify; returns the controller's OACS.  Prints model, serial, capacity. */
static uint64_t identify(uint16_t *oacs)
{
	uint8_t *id = mem_zalloc(PAGE, PAGE);
	volatile struct sqe *e;
	uint64_t blocks;
	uint32_t lbaf;

	e = next_sqe(&admin, OP_IDENTIFY, 1);
	e->prp1 = (uint32_t)id;
	e->cdw10 = 1;
	check(admin_command(), "identify controller");
	con_puts("nvme model ");
	put_field(id + 24, 40);
	con_puts(" serial ");
	put_field(id + 4, 20);
	con_putc('\n');
	*oacs = (uint16_t)(id[256] | id[257] << 8);

	e = next_sqe(&admin, OP_IDENTIFY, 2);
	e->nsid = 1;
	e->prp1 = (uint32_t)id;
	e->cdw10 = 0;
	check(admin_command(), "identify namespace");
	blocks = *(uint64_t *)id;
	lbaf = *(uint32_t *)(id + 128 + 4 * (id[26] & 0xf));
	block_shift = (lbaf >> 16) & 0xff;
	con_puts("nvme capacity ");
	con_dec((uint32_t)blocks);
	con_puts(" blocks of ");
	con_dec(1u << block_shift);
	con_putc('\n');
	if (block_shift != 9)
		fail("nvme: this guest wants 512-byte blocks");
	return blocks;
}

static void create_io_queue(int dbbuf, uint16_t oacs)
{
	volatile struct sqe *e;

	e = next_sqe(&admin, OP_SET_FEATURES, 3);
	e->cdw10 = FEAT_NUMBER_OF_QUEUES;
	e->cdw11 = 0;	/* one submission and one completion queue */
	check(admin_command(), "set features (number of queues)");

	if (dbbuf && (oacs & (1u << 8))) {
		shadow = mem_zalloc(PAGE, PAGE);
		eventidx = mem_zalloc(PAGE, PAGE);
		e = next_sqe(&admin, OP_DOORBELL_BUFFERS, 4);
		e->prp1 = (uint32_t)shadow;
		e->prp2 = (uint32_t)eventidx;
		check(admin_command(), "doorbell buffer config");
	}

	io.qid = 1;
	io.size = IO_ENTRIES;
	io.phase = 1;
	io.sq = mem_zalloc(IO_ENTRIES * sizeof(struct sqe), PAGE);
	io.cq = mem_zalloc(IO_ENTRIES * sizeof(struct cqe), PAGE);
	e = next_sqe(&admin, OP_CREATE_CQ, 5);
	e->prp1 = (uint32_t)io.cq;
	e->cdw10 = (IO_ENTRIES - 1) << 16 | 1;
	e->cdw11 = 1;	/* physically contiguous, no interrupts: we poll */
	check(admin_command(), "create I/O completion queue");
	e = next_sqe(&admin, OP_CREATE_SQ, 6);
	e->prp1 = (uint32_t)io.sq;
	e->cdw10 = (IO_ENTRIES - 1) << 16 | 1;
	e->cdw11 = 1u << 16 | 1;	/* completion queue 1, contiguous */
	check(admin_command(), "create I/O submission queue");
}

/* Start an I/O command on slot k (its CID); data from the slot's buffer. */
static void start_io(uint32_t k, uint8_t opcode, uint32_t block, uint32_t count,
		     uint32_t cdw12_flags)
{
	struct slot *s = &slots[k];
	volatile struct sqe *e = next_sqe(&io, opcode, (uint16_t)k);
	uint32_t bytes = count << block_shift, pages = (bytes + PAGE - 1) / PAGE, i;

	s->block = block;
	s->count = count;
	s->busy = 1;
	e->nsid = 1;
	e->prp1 = (uint32_t)s->data;
	if (pages == 2) {
		e->prp2 = (uint32_t)s->data + PAGE;
	} else if (pages > 2) {
		for (i = 1; i < pages; i++)
			s->prp_list[i - 1] = (uint32_t)s->data + i * PAGE;
		e->prp2 = (uint32_t)s->prp_list;
	}
	e->cdw10 = block;
	e->cdw11 = 0;
	e->cdw12 = cdw12_flags | (count ? count - 1 : 0);
	submit(&io);
}

static struct slot *finish_io(uint16_t *status)
{
	uint16_t cid;

	*status = reap(&io, &cid);
	if (cid >= nslots || !slots[cid].busy) {
		con_puts("nvme: completion for a command not in flight: ");
		con_dec(cid);
		con_putc('\n');
		guest_exit(1);
	}
	slots[cid].busy = 0;
	return &slots[cid];
}

static void fill(uint32_t *p, uint32_t block, uint32_t count)
{
	uint32_t i, w;

	for (i = 0; i < count; i++, block++, p += BLOCK_WORDS) {
		uint32_t c = block * PATTERN_MUL ^ PATTERN_XOR;

		for (w = 0; w < BLOCK_WORDS; w++)
			p[w] = c ^ w;
	}
}

/* Index of the first bad word (block * 128 + word from p), or -1. */
static int32_t compare(const uint32_t *p, uint32_t block, uint32_t count, int zero)
{
	uint32_t i, w;

	for (i = 0; i < count; i++, p += BLOCK_WORDS) {
		uint32_t c = (block + i) * PATTERN_MUL ^ PATTERN_XOR;

		for (w = 0; w < BLOCK_WORDS; w++)
			if (p[w] != (zero ? 0 : c ^ w))
				return (int32_t)(i * BLOCK_WORDS + w);
	}
	return -1;
}

static void bad_status(const char *what, uint16_t status, uint32_t block)
{
	con_puts("nvme ");
	con_puts(what);
	con_puts(" status ");
	con_hex(status, 4);
	con_puts(" block ");
	con_dec(block);
	con_putc('\n');
	guest_exit(1);
}

/* Write (or read and compare) blocks [0, total) in per-request pieces. */
static void run_pass(int write, uint32_t total, uint32_t per_req, int zero)
{
	uint32_t next = 0, done = 0, k, bad_block = 0xffffffffu, bad_word = 0;

	for (k = 0; k < nslots && next < total; k++) {
		uint32_t cnt = total - next < per_req ? total - next : per_req;

		if (write)
			fill(slots[k].data, next, cnt);
		start_io(k, write ? OP_WRITE : OP_READ, next, cnt, 0);
		next += cnt;
	}
	while (done < total) {
		uint16_t status;
		struct slot *s = finish_io(&status);
		int32_t bad;

		if (status)
			bad_status(write ? "write" : "read", status, s->block);
		if (!write) {
			bad = compare(s->data, s->block, s->count, zero);
			if (bad >= 0 && s->block + (uint32_t)bad / BLOCK_WORDS < bad_block) {
				bad_block = s->block + (uint32_t)bad / BLOCK_WORDS;
				bad_word = (uint32_t)bad % BLOCK_WORDS;
			}
		}
		done += s->count;
		if (next < total) {
			uint32_t cnt = total - next < per_req ? total - next : per_req;
			uint32_t k2 = (uint32_t)(s - slots);

			if (write)
				fill(s->data, next, cnt);
			start_io(k2, write ? OP_WRITE : OP_READ, next, cnt, 0);
			next += cnt;
		}
	}
	if (bad_block != 0xffffffffu) {
		con_puts("nvme mismatch at block ");
		con_dec(bad_block);
		con_puts(" word ");
		con_dec(bad_word);
		con_putc('\n');
		guest_exit(1);
	}
}

/* One command on slot 0, waited for; its status. */
static uint16_t one(uint8_t opcode, uint32_t block, uint32_t count, uint32_t cdw11)
{
	uint16_t status;
	volatile struct sqe *e;

	if (opcode == OP_DSM || opcode == OP_FLUSH || opcode == OP_WRITE_ZEROES) {
		e = next_sqe(&io, opcode, 0);
		e->nsid = 1;
		e->prp1 = (uint32_t)slots[0].data;
		e->cdw10 = opcode == OP_DSM ? 0 : block;	/* DSM: one range */
		e->cdw11 = cdw11;
		e->cdw12 = count - 1;
		slots[0].busy = 1;
		slots[0].block = block;
		slots[0].count = 0;
		submit(&io);
	} else {
		start_io(0, opcode, block, count, 0);
	}
	finish_io(&status);
	return status;
}

static void discard_and_zero(uint32_t total)
{
	uint32_t half = total / 2, *range = slots[0].data;

	range[0] = 0;		/* context attributes */
	range[1] = half;	/* blocks */
	range[2] = 0;		/* starting LBA, low and high */
	range[3] = 0;
	check(one(OP_DSM, 0, 1, DSM_DEALLOCATE), "dataset management");
	con_puts("nvme discarded ");
	con_dec(half);
	con_putc('\n');
	memset(slots[0].data, 0xee, 8 * BLOCK);
	check(one(OP_READ, 0, 8, 0), "read after discard");
	if (compare(slots[0].data, 0, 8, 1) >= 0)
		fail("nvme discard kept data");
	con_puts("nvme discard reads zero\n");

	check(one(OP_WRITE_ZEROES, half, 8, 0), "write zeroes");
	memset(slots[0].data, 0xee, 8 * BLOCK);
	check(one(OP_READ, half, 8, 0), "read after write zeroes");
	if (compare(slots[0].data, half, 8, 1) >= 0)
		fail("nvme write zeroes left data");
	con_puts("nvme write-zeroes ok\n");
}

static void shutdown(void)
{
	set_reg32(REG_CC, reg32(REG_CC) | CC_SHN_NORMAL);
	wait_csts(3u << 2, 2u << 2, "shutting down");
	con_puts("nvme shutdown ok\n");
}

int main(void)
{
	uint32_t total, bufsz, depth, ro, dbbuf, k, vs, bdf;
	uint16_t oacs, status;
	uint64_t capacity;

	opt_init();
	total = opt_num("n=", 2048);
	bufsz = opt_num("buf=", 65536);
	depth = opt_num("depth=", 8);
	ro = opt_num("ro=", 0);
	dbbuf = opt_num("dbbuf=", 1);
	if (bufsz < BLOCK || bufsz % PAGE || bufsz > 512u * PAGE)
		fail("nvme: buf= must be a multiple of 4096 up to 2 MiB");
	if (depth == 0 || depth > MAX_SLOTS || depth >= IO_ENTRIES)
		fail("nvme: depth= must be 1..32");
	if (total < 16)
		fail("nvme: n= must be at least 16");

	bdf = find_nvme();
	pci_write32(bdf, 0x04, pci_read32(bdf, 0x04) | 0x6);	/* memory, bus master */
	bar = pci_read32(bdf, 0x10) & ~0xfu;
	if (pci_read32(bdf, 0x14))
		fail("nvme: BAR 0 is above 4 GiB (paging is off)");
	vs = reg32(REG_VS);
	con_puts("nvme version ");
	con_dec(vs >> 16);
	con_putc('.');
	con_dec((vs >> 8) & 0xff);
	con_putc('.');
	con_dec(vs & 0xff);
	con_putc('\n');
	if ((reg32(REG_CAP + 4) & 0xf) != 0)
		fail("nvme: doorbell stride is not 4 bytes");
	if ((reg32(REG_CAP) & 0xffff) + 1u < IO_ENTRIES)
		fail("nvme: the controller's queues are too small");

	enable();
	capacity = identify(&oacs);
	if (total > capacity)
		fail("nvme: n= is beyond the capacity");
	create_io_queue((int)dbbuf, oacs);
	nslots = depth;
	for (k = 0; k < nslots; k++) {
		slots[k].data = mem_alloc(bufsz, PAGE);
		slots[k].prp_list = mem_zalloc(PAGE, PAGE);
	}
	con_puts("nvme queue depth ");
	con_dec(nslots);
	con_puts(" dbbuf ");
	con_dec(shadow ? 1 : 0);
	con_putc('\n');

	if (ro) {
		fill(slots[0].data, 0, 8);
		status = one(OP_WRITE, 0, 8, 0);
		if ((status & 0xff) != SC_WRITE_PROTECTED)
			bad_status("write not refused:", status, 0);
		con_puts("nvme write refused\n");
	} else {
		run_pass(1, total, bufsz / BLOCK, 0);
		con_puts("nvme wrote ");
		con_dec(total);
		con_putc('\n');
		check(one(OP_FLUSH, 0, 1, 0), "flush");
		con_puts("nvme flushed\n");
		run_pass(0, total, bufsz / BLOCK, 0);
		con_puts("nvme read ");
		con_dec(total);
		con_puts(" ok\n");
		discard_and_zero(total);
	}
	status = one(OP_READ, (uint32_t)capacity - 1, 2, 0);
	if ((status & 0xff) != SC_LBA_OUT_OF_RANGE)
		bad_status("read past the end not refused:", status, (uint32_t)capacity - 1);
	con_puts("nvme out-of-range refused\n");
	shutdown();
	con_puts("nvme done\n");
	return 0;
}
