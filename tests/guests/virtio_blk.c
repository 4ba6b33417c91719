/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * virtio_blk: a virtio 1.x block driver (PCI 1af4:1042, virtio 1.x
 * section 5.2).  It writes n= sectors of a pattern, flushes, reads them
 * back and compares, asks for the device ID, and prints
 *
 *   blk capacity C
 *   blk wrote N
 *   blk flushed N            (the flush completed: the N sectors are durable)
 *   blk read N ok            (or: blk mismatch at sector S word W)
 *   blk discarded N          (discard=1: then `blk zero N ok` after reading
 *                             the discarded sectors back as zeros)
 *   blk id STRING
 *   blk done
 *
 * queues=Q (VIRTIO_BLK_F_MQ) spreads the requests over Q queues, slot k on
 * queue k % Q.
 *
 * With ro=1 it only expects a write to be refused with IOERR and prints
 * `blk write refused`.  Requests are three-descriptor chains (header,
 * data, status), built here on the library's rings; see README.md.
 *
 * bench=seqread|seqwrite|randread (bench/disk) moves n= sectors in buf=
 * requests, depth= in flight, without touching the data, between
 *
 *   blk bench go
 *   blk bench end
 *   blk bench OP R requests S sectors tsc T irqs I
 *
 * (T: TSC cycles, hex; I: interrupts taken meanwhile), then `blk done`.
 * seq* from sector 0 up, back to 0 before a request would pass the end;
 * randread at buf-aligned sectors from xorshift32.  n= may exceed the
 * capacity here.
 */
#include "virtio.h"

#define VIRTIO_DEV_BLK		0x1042
#define BLK_VECTOR_BASE		0x60

#define VIRTIO_BLK_F_BLK_SIZE	(1ull << 6)
#define VIRTIO_BLK_F_FLUSH	(1ull << 9)
#define VIRTIO_BLK_F_MQ		(1ull << 12)
#define VIRTIO_BLK_F_DISCARD	(1ull << 13)

#define BLK_T_IN		0
#define BLK_T_OUT		1
#define BLK_T_FLUSH		4
#define BLK_T_GET_ID		8
#define BLK_T_DISCARD		11

#define BLK_S_OK		0
#define BLK_S_IOERR		1

#define SECTOR			512
#define SECTOR_WORDS		(SECTOR / 4)
#define ID_BYTES		20
#define PATTERN_MUL		0x9E3779B1u
#define PATTERN_XOR		0xA5A5A5A5u
#define MAX_SLOTS		(VQ_MAX_SIZE / 3)
#define MAX_QUEUES		8

struct blk_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

struct blk_discard {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

struct slot {
	struct vq *q;		/* its queue, and its chain's first descriptor there */
	uint16_t head;
	volatile struct blk_hdr *hdr;
	volatile uint8_t *status;
	uint32_t *data;
	uint32_t sector;	/* first sector of the request */
	uint32_t len;		/* data bytes */
	uint32_t type;
	int busy;
};

static struct vio_dev blk;
static struct vq *qs[MAX_QUEUES];
static uint32_t nqueues = 1;
static struct slot slots[MAX_SLOTS];
static uint32_t nslots;

/* Post slot k as a chain at descriptors 3k (header), 3k+1 (data), 3k+2 (status). */
static void submit(uint32_t k, uint32_t type, uint32_t sector, uint32_t len)
{
	struct slot *s = &slots[k];
	struct vq *q = s->q;
	uint16_t head = s->head;
	volatile struct vring_desc *d = &q->desc[head];

	s->type = type;
	s->sector = sector;
	s->len = len;
	s->busy = 1;
	s->hdr->type = type;
	s->hdr->reserved = 0;
	s->hdr->sector = sector;
	*s->status = 0xff;

	d[0].addr = (uint32_t)s->hdr;
	d[0].len = sizeof(struct blk_hdr);
	d[0].flags = VRING_DESC_F_NEXT;
	if (len) {
		d[0].next = (uint16_t)(head + 1);
		d[1].addr = (uint32_t)s->data;
		d[1].len = len;
		d[1].flags = VRING_DESC_F_NEXT |
			     (type == BLK_T_OUT || type == BLK_T_DISCARD ? 0 :
			      VRING_DESC_F_WRITE);
		d[1].next = (uint16_t)(head + 2);
	} else {
		d[0].next = (uint16_t)(head + 2);
	}
	d[2].addr = (uint32_t)s->status;
	d[2].len = 1;
	d[2].flags = VRING_DESC_F_WRITE;
	d[2].next = 0;

	q->avail->ring[q->avail_idx & (q->size - 1)] = head;
	q->avail_idx++;
	q->pending++;
}

/* A completed slot on queue qi, or -1 if its used ring has nothing new. */
static int reap_queue(uint32_t qi)
{
	struct vq *q = qs[qi];
	uint16_t used_idx = q->used->idx;
	uint32_t id, k;

	if (used_idx == q->last_used)
		return -1;
	if ((uint16_t)(used_idx - q->last_used) > q->size)
		fail("virtio-blk: used idx ran ahead of the ring");
	barrier();
	id = q->used->ring[q->last_used & (q->size - 1)].id;
	q->last_used++;
	k = id / 3 * nqueues + qi;
	if (id % 3 || k >= nslots || !slots[k].busy) {
		con_puts("virtio-blk: used ring returned a descriptor not in flight: ");
		con_dec(id);
		con_putc('\n');
		guest_exit(1);
	}
	slots[k].busy = 0;
	return (int)k;
}

static int reap(void)
{
	uint32_t qi;
	int k;

	for (qi = 0; qi < nqueues; qi++)
		if ((k = reap_queue(qi)) >= 0)
			return k;
	return -1;
}

static int wait_slot(void)
{
	uint32_t qi;
	int k;

	for (qi = 0; qi < nqueues; qi++)
		vq_kick(qs[qi]);
	while ((k = reap()) < 0)
		vio_wait(&blk);
	return k;
}

static void bad_status(const char *what, const struct slot *s)
{
	con_puts("blk ");
	con_puts(what);
	con_puts(" status ");
	con_dec(*s->status);
	con_puts(" sector ");
	con_dec(s->sector);
	con_putc('\n');
	guest_exit(1);
}

static void fill(uint32_t *p, uint32_t sector, uint32_t count)
{
	uint32_t i, w;

	for (i = 0; i < count; i++, sector++, p += SECTOR_WORDS) {
		uint32_t c = sector * PATTERN_MUL ^ PATTERN_XOR;

		for (w = 0; w < SECTOR_WORDS; w += 4) {
			p[w] = c ^ w;
			p[w + 1] = c ^ (w + 1);
			p[w + 2] = c ^ (w + 2);
			p[w + 3] = c ^ (w + 3);
		}
	}
}

/* Index of the first bad word (sector * 128 + word from p), or -1. */
static int32_t check(const uint32_t *p, uint32_t sector, uint32_t count)
{
	uint32_t i, w;

	for (i = 0; i < count; i++, p += SECTOR_WORDS) {
		uint32_t c = (sector + i) * PATTERN_MUL ^ PATTERN_XOR;

		for (w = 0; w < SECTOR_WORDS; w += 4) {
			if (((p[w] ^ c) ^ w) | ((p[w + 1] ^ c) ^ (w + 1)) |
			    ((p[w + 2] ^ c) ^ (w + 2)) | ((p[w + 3] ^ c) ^ (w + 3)))
				break;
		}
		if (w < SECTOR_WORDS) {
			while ((p[w] ^ c) == w)
				w++;
			return (int32_t)(i * SECTOR_WORDS + w);
		}
	}
	return -1;
}

static uint64_t read_capacity(void)
{
	uint8_t gen;
	uint32_t lo, hi;

	do {
		gen = vio_config_generation(&blk);
		lo = vio_cfg_read32(&blk, 0);
		hi = vio_cfg_read32(&blk, 4);
	} while (gen != vio_config_generation(&blk));
	return (uint64_t)hi << 32 | lo;
}

static void run_rw(uint32_t total, uint32_t per_req)
{
	uint32_t next, done, k, bad_sector = 0xffffffffu, bad_word = 0;
	int32_t bad;

	/* Writes, up to nslots in flight. */
	for (next = 0, k = 0; k < nslots && next < total; k++) {
		uint32_t cnt = total - next < per_req ? total - next : per_req;

		fill(slots[k].data, next, cnt);
		submit(k, BLK_T_OUT, next, cnt * SECTOR);
		next += cnt;
	}
	for (done = 0; done < total;) {
		struct slot *s = &slots[wait_slot()];

		if (*s->status != BLK_S_OK)
			bad_status("write", s);
		done += s->len / SECTOR;
		if (next < total) {
			uint32_t cnt = total - next < per_req ? total - next : per_req;

			fill(s->data, next, cnt);
			submit((uint32_t)(s - slots), BLK_T_OUT, next, cnt * SECTOR);
			next += cnt;
		}
	}
	con_puts("blk wrote ");
	con_dec(total);
	con_putc('\n');

	submit(0, BLK_T_FLUSH, 0, 0);
	if (*slots[wait_slot()].status != BLK_S_OK)
		bad_status("flush", &slots[0]);
	con_puts("blk flushed ");
	con_dec(total);
	con_putc('\n');

	/* Reads, compared as they complete; the lowest bad sector is kept. */
	for (next = 0, k = 0; k < nslots && next < total; k++) {
		uint32_t cnt = total - next < per_req ? total - next : per_req;

		submit(k, BLK_T_IN, next, cnt * SECTOR);
		next += cnt;
	}
	for (done = 0; done < total;) {
		struct slot *s = &slots[wait_slot()];
		uint32_t cnt = s->len / SECTOR;

		if (*s->status != BLK_S_OK)
			bad_status("read", s);
		bad = check(s->data, s->sector, cnt);
		if (bad >= 0 && s->sector + (uint32_t)bad / SECTOR_WORDS < bad_sector) {
			bad_sector = s->sector + (uint32_t)bad / SECTOR_WORDS;
			bad_word = (uint32_t)bad % SECTOR_WORDS;
		}
		done += cnt;
		if (next < total) {
			cnt = total - next < per_req ? total - next : per_req;
			submit((uint32_t)(s - slots), BLK_T_IN, next, cnt * SECTOR);
			next += cnt;
		}
	}
	if (bad_sector != 0xffffffffu) {
		con_puts("blk mismatch at sector ");
		con_dec(bad_sector);
		con_puts(" word ");
		con_dec(bad_word);
		con_putc('\n');
		guest_exit(1);
	}
	con_puts("blk read ");
	con_dec(total);
	con_puts(" ok\n");
}

/* Discard sectors [0, total) in requests of at most `limit`, one segment each,
 * then read them back: a discarded sector reads as zeros on this device. */
static void run_discard(uint32_t total, uint32_t limit, uint32_t per_req)
{
	volatile struct blk_discard *seg = (struct blk_discard *)slots[0].data;
	uint32_t next, cnt, i, w;
	struct slot *s;

	if (limit == 0)
		fail("blk: the device's max_discard_sectors is 0");
	for (next = 0; next < total; next += cnt) {
		cnt = total - next < limit ? total - next : limit;
		seg->sector = next;
		seg->num_sectors = cnt;
		seg->flags = 0;
		submit(0, BLK_T_DISCARD, 0, sizeof(struct blk_discard));
		s = &slots[wait_slot()];
		if (*s->status != BLK_S_OK)
			bad_status("discard", s);
	}
	con_puts("blk discarded ");
	con_dec(total);
	con_putc('\n');
	for (next = 0; next < total; next += cnt) {
		cnt = total - next < per_req ? total - next : per_req;
		submit(0, BLK_T_IN, next, cnt * SECTOR);
		s = &slots[wait_slot()];
		if (*s->status != BLK_S_OK)
			bad_status("read after discard", s);
		for (i = 0; i < cnt * SECTOR_WORDS; i++) {
			if (s->data[i]) {
				w = next + i / SECTOR_WORDS;
				con_puts("blk not zero after discard at sector ");
				con_dec(w);
				con_putc('\n');
				guest_exit(1);
			}
		}
	}
	con_puts("blk zero ");
	con_dec(total);
	con_puts(" ok\n");
}

enum bench_op { BENCH_NONE, BENCH_SEQREAD, BENCH_SEQWRITE, BENCH_RANDREAD };

static const char *const bench_names[] = { "", "seqread", "seqwrite", "randread" };

static enum bench_op bench_option(void)
{
	const char *v = opt_find("bench=");
	uint32_t op, i;

	if (!v)
		return BENCH_NONE;
	for (op = BENCH_SEQREAD; op <= BENCH_RANDREAD; op++) {
		const char *name = bench_names[op];

		for (i = 0; name[i] && v[i] == name[i]; i++)
			;
		if (!name[i] && (v[i] == ' ' || v[i] == 0))
			return (enum bench_op)op;
	}
	fail("blk: bench= takes seqread, seqwrite or randread");
}

/* Make slot s's chain available again for `sector`; its descriptors stay as
 * submit() wrote them (the same type, buffer and length). */
static void repost(struct slot *s, uint32_t sector)
{
	struct vq *q = s->q;

	s->busy = 1;
	s->sector = sector;
	s->hdr->sector = sector;
	*s->status = 0xff;
	q->avail->ring[q->avail_idx & (q->size - 1)] = s->head;
	q->avail_idx++;
	q->pending++;
}

/* Where a bench run's next request goes. */
struct bench_pos {
	enum bench_op op;
	uint32_t per_req;	/* sectors per request */
	uint32_t sectors;	/* the disk's, up to 2^32 - 1 */
	uint32_t next;		/* seq*: the next request's sector */
	uint32_t x;		/* randread: xorshift32 state */
};

static uint32_t bench_sector(struct bench_pos *p)
{
	uint32_t sector = p->next;

	if (p->op == BENCH_RANDREAD) {
		p->x ^= p->x << 13;
		p->x ^= p->x >> 17;
		p->x ^= p->x << 5;
		return p->x % (p->sectors / p->per_req) * p->per_req;
	}
	p->next = sector + 2 * p->per_req > p->sectors ? 0 : sector + p->per_req;
	return sector;
}

/* Time-critical: a handful of instructions per request, no data touched. */
static void run_bench(enum bench_op op, uint32_t total, uint32_t per_req,
		      uint64_t capacity)
{
	struct bench_pos pos = { op, per_req, capacity >> 32 ? 0xffffffffu :
				 (uint32_t)capacity, 0, 2463534242u };
	uint32_t type = op == BENCH_SEQWRITE ? BLK_T_OUT : BLK_T_IN;
	uint32_t requests = total / per_req, posted, done = 0, qi, irqs;
	uint64_t t0, t1;
	int got;

	if (total % per_req)
		fail("blk: bench= needs n= a multiple of buf= / 512");
	if (pos.sectors < per_req)
		fail("blk: the disk is smaller than buf=");
	con_puts("blk bench go\n");
	irqs = blk.irqs;
	t0 = rdtsc();
	for (posted = 0; posted < nslots && posted < requests; posted++)
		submit(posted, type, bench_sector(&pos), per_req * SECTOR);
	while (done < requests) {
		for (qi = 0; qi < nqueues; qi++)
			vq_kick(qs[qi]);
		while ((got = reap()) < 0)
			vio_wait(&blk);
		do {
			struct slot *s = &slots[got];

			if (*s->status != BLK_S_OK)
				bad_status(bench_names[op], s);
			done++;
			if (posted < requests) {
				repost(s, bench_sector(&pos));
				posted++;
			}
		} while ((got = reap()) >= 0);
	}
	t1 = rdtsc();
	irqs = blk.irqs - irqs;
	con_puts("blk bench end\n");
	con_puts("blk bench ");
	con_puts(bench_names[op]);
	con_putc(' ');
	con_dec(requests);
	con_puts(" requests ");
	con_dec(total);
	con_puts(" sectors tsc ");
	con_hex64(t1 - t0);
	con_puts(" irqs ");
	con_dec(irqs);
	con_putc('\n');
}

static void get_id(void)
{
	uint8_t *id = (uint8_t *)slots[0].data;
	struct slot *s;
	uint32_t i;

	for (i = 0; i < ID_BYTES; i++)
		id[i] = 0;
	submit(0, BLK_T_GET_ID, 0, ID_BYTES);
	s = &slots[wait_slot()];
	if (*s->status != BLK_S_OK)
		bad_status("get_id", s);
	con_puts("blk id ");
	for (i = 0; i < ID_BYTES && id[i]; i++)
		con_putc(id[i] >= 0x20 && id[i] < 0x7f ? (char)id[i] : '?');
	con_putc('\n');
}

static void run_ro(uint32_t per_req, uint32_t total)
{
	struct slot *s;
	uint32_t cnt = total < per_req ? total : per_req;

	fill(slots[0].data, 0, cnt);
	submit(0, BLK_T_OUT, 0, cnt * SECTOR);
	s = &slots[wait_slot()];
	if (*s->status != BLK_S_IOERR)
		bad_status("write not refused:", s);
	con_puts("blk write refused\n");
}

int main(void)
{
	uint32_t total, bufsz, depth, ro, discard, k, qi, per_queue;
	uint64_t capacity;
	enum bench_op bench;

	opt_init();
	bench = bench_option();
	total = opt_num("n=", 2048);
	bufsz = opt_num("buf=", 65536);
	depth = opt_num("depth=", 8);
	ro = opt_num("ro=", 0);
	discard = opt_num("discard=", 0);
	nqueues = opt_num("queues=", 1);
	if (nqueues == 0 || nqueues > MAX_QUEUES)
		fail("blk: queues= must be 1..8");
	if (bufsz < SECTOR || bufsz % SECTOR || bufsz > (1u << 20))
		fail("blk: buf= must be a multiple of 512 from 512 to 1048576");
	if (depth == 0 || depth > MAX_SLOTS)
		fail("blk: depth= must be 1..85");
	if (total == 0)
		fail("blk: n= must be at least 1");

	vio_probe(&blk, VIRTIO_DEV_BLK, "virtio-blk", BLK_VECTOR_BASE);
	irq_init();
	cpu_sti();
	vio_begin(&blk, VIO_MSIX);
	vio_negotiate(&blk, VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_BLK_SIZE |
		      (nqueues > 1 ? VIRTIO_BLK_F_MQ : 0) |
		      (discard ? VIRTIO_BLK_F_DISCARD : 0));
	if (nqueues > 1 && !(blk.drv_features & VIRTIO_BLK_F_MQ))
		fail("blk: queues= needs VIRTIO_BLK_F_MQ, which the device does not offer");
	if (nqueues > vio_cfg_read16(&blk, 34) && nqueues > 1)
		fail("blk: queues= is more than the device's num_queues");
	if (discard && !(blk.drv_features & VIRTIO_BLK_F_DISCARD))
		fail("blk: discard=1 needs VIRTIO_BLK_F_DISCARD, which the device does not offer");
	per_queue = MAX_SLOTS;
	for (qi = 0; qi < nqueues; qi++) {
		qs[qi] = vio_setup_queue(&blk, (uint16_t)qi, VQ_MAX_SIZE);
		if (qs[qi]->size / 3u < per_queue)
			per_queue = qs[qi]->size / 3u;
	}
	vio_driver_ok(&blk);

	nslots = depth;
	if (nslots > per_queue * nqueues)
		nslots = per_queue * nqueues;
	if (nslots == 0)
		fail("blk: queue too small for a three-descriptor chain");
	for (k = 0; k < nslots; k++) {
		slots[k].q = qs[k % nqueues];
		slots[k].head = (uint16_t)(3 * (k / nqueues));
		slots[k].hdr = mem_alloc(sizeof(struct blk_hdr), 16);
		slots[k].status = mem_alloc(1, 1);
		slots[k].data = mem_alloc(bufsz, 4096);
	}

	capacity = read_capacity();
	con_puts("blk capacity ");
	if (capacity >> 32)
		con_hex64(capacity);
	else
		con_dec((uint32_t)capacity);
	con_putc('\n');
	if (total > capacity && bench == BENCH_NONE)
		fail("blk: n= is beyond the capacity");

	if (bench != BENCH_NONE) {
		run_bench(bench, total, bufsz / SECTOR, capacity);
	} else if (ro) {
		run_ro(bufsz / SECTOR, total);
	} else {
		run_rw(total, bufsz / SECTOR);
		if (discard)
			run_discard(total, vio_cfg_read32(&blk, 36), bufsz / SECTOR);
		get_id();
	}
	vio_reset(&blk);
	if (irq_stray) {
		con_puts("blk: stray interrupts ");
		con_dec(irq_stray);
		con_putc('\n');
		return 1;
	}
	con_puts("blk done\n");
	return 0;
}
