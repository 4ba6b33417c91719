/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * virtio_console: a virtio 1.x console driver (PCI 1af4:1043, virtio 1.x
 * section 5.3) with VIRTIO_CONSOLE_F_MULTIPORT and its control queues.
 *
 *   mode=verify   pattern out, hashed data in, on ports 0..ports-1 at once
 *   mode=bench    one pattern buffer sent tx/buf times on port 0
 *   mode=counter  "N\n" lines on port 0 forever (save/restore tests),
 *                 optionally reading virtio-rng between lines
 *
 * See README.md for the options, the output and the pattern/hash formulas.
 */
#include "virtio.h"

#define CONSOLE_VECTOR_BASE	0x50
#define RNG_VECTOR_BASE		0x70

#define VIRTIO_CONSOLE_F_SIZE		(1ull << 0)
#define VIRTIO_CONSOLE_F_MULTIPORT	(1ull << 1)

/* Control events (5.3.6.2) */
#define VIRTIO_CONSOLE_DEVICE_READY	0
#define VIRTIO_CONSOLE_DEVICE_ADD	1
#define VIRTIO_CONSOLE_DEVICE_REMOVE	2
#define VIRTIO_CONSOLE_PORT_READY	3
#define VIRTIO_CONSOLE_CONSOLE_PORT	4
#define VIRTIO_CONSOLE_RESIZE		5
#define VIRTIO_CONSOLE_PORT_OPEN	6
#define VIRTIO_CONSOLE_PORT_NAME	7

#define MAX_PORTS	8	/* queues 0..17 */
#define MAX_DEPTH	64
#define CTL_RX_BUFS	64	/* QEMU drops control messages it has no room for */
#define CTL_TX_BUFS	16
#define CTL_RX_SIZE	256
#define CTL_TX_SIZE	16

#define PATTERN_MUL	2654435761u
#define PATTERN_PORT	0x9e3779b9u
#define PATTERN_XOR	0x5bd1e995u
#define FNV_BASIS	0x811c9dc5u
#define FNV_PRIME	0x01000193u

struct ctl_msg {
	uint32_t id;
	uint16_t event;
	uint16_t value;
};

struct port {
	uint32_t id;
	int present, host_open;
	struct vq *rxq, *txq;
	uint8_t *txfree[MAX_DEPTH];
	uint8_t *rxfree[MAX_DEPTH];
	uint32_t ntxfree, nrxfree;
	uint32_t tx_total, tx_posted, tx_done;
	uint32_t rx_total, rx_got, rx_outstanding;
	uint32_t hash, pword, pbytes;	/* hash state, partial word */
};

static struct vio_dev con;
static struct vio_dev rng;
static struct port ports[MAX_PORTS];
static uint32_t nports, bufsz, depth, multiport, hostwait;
static struct vq *crxq, *ctxq;
static uint8_t *ctl_txfree[CTL_TX_BUFS];
static uint32_t nctl_txfree;

static void port_fail(uint32_t id, const char *what)
{
	con_puts("console: port ");
	con_dec(id);
	con_putc(' ');
	fail(what);
}

/* ------------------------------------------------------------------ */
/* Control queue                                                       */

static void ctl_reclaim(void)
{
	uint32_t len;
	int id;

	while ((id = vq_get(ctxq, &len)) >= 0)
		ctl_txfree[nctl_txfree++] = (uint8_t *)ctxq->buf_addr[id];
}

static void ctl_send(uint32_t id, uint16_t event, uint16_t value)
{
	struct ctl_msg *m;

	ctl_reclaim();
	while (!nctl_txfree) {
		vio_wait(&con);
		ctl_reclaim();
	}
	m = (struct ctl_msg *)ctl_txfree[--nctl_txfree];
	m->id = id;
	m->event = event;
	m->value = value;
	vq_add(ctxq, m, sizeof(*m), 0);
	vq_kick(ctxq);
}

static void print_name(const uint8_t *s, uint32_t n)
{
	uint32_t i;

	for (i = 0; i < n && i < 64 && s[i]; i++)
		con_putc(s[i] >= 0x20 && s[i] < 0x7f ? (char)s[i] : '?');
}

static void ctl_handle(const struct ctl_msg *m, const uint8_t *name, uint32_t namelen)
{
	struct port *p = m->id < nports ? &ports[m->id] : 0;

	switch (m->event) {
	case VIRTIO_CONSOLE_DEVICE_ADD:
		/*
		 * Every port is acknowledged as ready; only the ones in use
		 * (queues set up) are opened.
		 */
		ctl_send(m->id, VIRTIO_CONSOLE_PORT_READY, 1);
		if (p) {
			p->present = 1;
			ctl_send(m->id, VIRTIO_CONSOLE_PORT_OPEN, 1);
		}
		break;
	case VIRTIO_CONSOLE_DEVICE_REMOVE:
		if (p && p->present)
			port_fail(m->id, "removed by the device");
		break;
	case VIRTIO_CONSOLE_CONSOLE_PORT:
		con_puts("port ");
		con_dec(m->id);
		con_puts(" console\n");
		break;
	case VIRTIO_CONSOLE_RESIZE:
		break;
	case VIRTIO_CONSOLE_PORT_OPEN:
		if (p) {
			p->host_open = m->value != 0;
			con_puts("port ");
			con_dec(m->id);
			con_puts(p->host_open ? " host open\n" : " host closed\n");
		}
		break;
	case VIRTIO_CONSOLE_PORT_NAME:
		con_puts("port ");
		con_dec(m->id);
		con_puts(" name ");
		print_name(name, namelen);
		con_putc('\n');
		break;
	default:
		con_puts("console: unknown control event ");
		con_dec(m->event);
		con_putc('\n');
		break;
	}
}

/* Handle every control message that came in; returns how many. */
static uint32_t ctl_process(void)
{
	uint32_t len, n = 0;
	int id;

	if (!multiport)
		return 0;
	ctl_reclaim();		/* so that waits do not see old tx completions */
	while ((id = vq_get(crxq, &len)) >= 0) {
		uint8_t *b = (uint8_t *)crxq->buf_addr[id];
		struct {
			struct ctl_msg m;
			uint8_t name[64];
		} copy;

		/*
		 * Copy the message and give the buffer back to the device
		 * before acting on it: the replies sent below make the device
		 * send more control messages.
		 */
		if (len > sizeof(copy))
			len = sizeof(copy);
		memcpy(&copy, b, len);
		vq_add(crxq, b, CTL_RX_SIZE, 1);
		vq_kick(crxq);
		if (len >= sizeof(copy.m))
			ctl_handle(&copy.m, copy.name, len - sizeof(copy.m));
		else
			con_puts("console: short control message\n");
		n++;
	}
	return n;
}

/* ------------------------------------------------------------------ */
/* Data: pattern out, hash in                                          */

/*
 * The hot loops are kept out of line and unrolled so that they run in
 * registers: on a kvm_pvm host every guest instruction of these
 * paging-off guests is emulated, so instructions per word are what count.
 */
static void __attribute__((noinline))
pattern_words(uint32_t *dst, uint32_t x, uint32_t c, uint32_t words)
{
	for (; words >= 4; words -= 4, dst += 4, x += 4 * PATTERN_MUL) {
		dst[0] = x ^ c;
		dst[1] = (x + PATTERN_MUL) ^ c;
		dst[2] = (x + 2 * PATTERN_MUL) ^ c;
		dst[3] = (x + 3 * PATTERN_MUL) ^ c;
	}
	for (; words; words--, x += PATTERN_MUL)
		*dst++ = x ^ c;
}

static uint32_t __attribute__((noinline))
hash_words(uint32_t h, const u32_unaligned *w, uint32_t words)
{
	for (; words >= 8; words -= 8, w += 8) {
		h = (h ^ w[0]) * FNV_PRIME;
		h = (h ^ w[1]) * FNV_PRIME;
		h = (h ^ w[2]) * FNV_PRIME;
		h = (h ^ w[3]) * FNV_PRIME;
		h = (h ^ w[4]) * FNV_PRIME;
		h = (h ^ w[5]) * FNV_PRIME;
		h = (h ^ w[6]) * FNV_PRIME;
		h = (h ^ w[7]) * FNV_PRIME;
	}
	for (; words; words--)
		h = (h ^ *w++) * FNV_PRIME;
	return h;
}

/* Pattern words [word, word + (n + 3) / 4) of port `id` into dst. */
static void fill_pattern(uint32_t *dst, uint32_t id, uint32_t word, uint32_t n)
{
	pattern_words(dst, word * PATTERN_MUL, id * PATTERN_PORT ^ PATTERN_XOR,
		      (n + 3) / 4);
}

/* Word-wise FNV-1a-style hash of the byte stream, across buffers. */
static void hash_bytes(struct port *p, const uint8_t *b, uint32_t n)
{
	uint32_t words;

	while (n && p->pbytes) {
		p->pword |= (uint32_t)*b++ << (8 * p->pbytes);
		n--;
		if (++p->pbytes == 4) {
			p->hash = (p->hash ^ p->pword) * FNV_PRIME;
			p->pword = 0;
			p->pbytes = 0;
		}
	}
	words = n / 4;
	p->hash = hash_words(p->hash, (const u32_unaligned *)b, words);
	for (b += 4 * words, n %= 4; n; n--)
		p->pword |= (uint32_t)*b++ << (8 * p->pbytes++);
}

static uint32_t hash_final(struct port *p)
{
	if (p->pbytes)
		return (p->hash ^ p->pword) * FNV_PRIME;
	return p->hash;
}

/* Reap and refill one port's queues; returns the number of completions. */
static uint32_t port_service(struct port *p)
{
	uint32_t len, n = 0;
	int id;

	while ((id = vq_get(p->txq, &len)) >= 0) {
		p->tx_done += p->txq->buf_len[id];
		p->txfree[p->ntxfree++] = (uint8_t *)p->txq->buf_addr[id];
		n++;
	}
	while ((id = vq_get(p->rxq, &len)) >= 0) {
		uint8_t *b = (uint8_t *)p->rxq->buf_addr[id];

		hash_bytes(p, b, len);
		p->rx_got += len;
		p->rx_outstanding -= p->rxq->buf_len[id];
		p->rxfree[p->nrxfree++] = b;
		n++;
	}
	while (p->ntxfree && p->tx_posted < p->tx_total && p->host_open) {
		uint8_t *b = p->txfree[--p->ntxfree];
		uint32_t l = p->tx_total - p->tx_posted;

		if (l > bufsz)
			l = bufsz;
		fill_pattern((uint32_t *)b, p->id, p->tx_posted / 4, l);
		vq_add(p->txq, b, l, 0);
		p->tx_posted += l;
	}
	/* Never offer more room than the bytes still expected. */
	while (p->nrxfree && p->rx_got + p->rx_outstanding < p->rx_total) {
		uint32_t l = p->rx_total - p->rx_got - p->rx_outstanding;

		if (l > bufsz)
			l = bufsz;
		vq_add(p->rxq, p->rxfree[--p->nrxfree], l, 1);
		p->rx_outstanding += l;
	}
	vq_kick(p->txq);
	vq_kick(p->rxq);
	return n;
}

static int port_done(const struct port *p)
{
	return p->tx_done == p->tx_total && p->rx_got == p->rx_total;
}

/* ------------------------------------------------------------------ */
/* Setup                                                               */

static void console_init(enum vio_mode mode, uint32_t tsc_wait_exp)
{
	uint32_t i, maxp = 1;

	vio_begin(&con, mode);
	con_puts("features ");
	con_hex64(con.dev_features);
	con_putc('\n');
	vio_negotiate(&con, multiport ? VIRTIO_CONSOLE_F_MULTIPORT : 0);
	multiport = (con.drv_features & VIRTIO_CONSOLE_F_MULTIPORT) != 0;
	if (multiport) {
		uint8_t gen;

		do {
			gen = vio_config_generation(&con);
			maxp = vio_cfg_read32(&con, 4);
		} while (gen != vio_config_generation(&con));
	}
	con_puts("console multiport ");
	con_dec(multiport);
	con_puts(" max_nr_ports ");
	con_dec(maxp);
	con_putc('\n');
	if (nports > maxp) {
		if (!multiport)
			fail("console: ports= above 1 needs VIRTIO_CONSOLE_F_MULTIPORT");
		fail("console: ports= is above the device's max_nr_ports");
	}

	for (i = 0; i < nports; i++) {
		struct port *p = &ports[i];
		uint16_t rx = (uint16_t)(i == 0 ? 0 : 2 * i + 2);

		p->id = i;
		p->rxq = vio_setup_queue(&con, rx, VQ_MAX_SIZE);
		p->txq = vio_setup_queue(&con, (uint16_t)(rx + 1), VQ_MAX_SIZE);
		p->present = !multiport;
		p->host_open = !multiport || !hostwait;
		p->hash = FNV_BASIS;
	}
	if (multiport) {
		crxq = vio_setup_queue(&con, 2, VQ_MAX_SIZE);
		ctxq = vio_setup_queue(&con, 3, VQ_MAX_SIZE);
	}
	vio_driver_ok(&con);

	if (multiport) {
		uint64_t deadline = rdtsc() + (1ull << tsc_wait_exp);

		for (i = 0; i < CTL_RX_BUFS && i < crxq->size; i++)
			vq_add(crxq, mem_alloc(CTL_RX_SIZE, 64), CTL_RX_SIZE, 1);
		vq_kick(crxq);
		for (i = 0; i < CTL_TX_BUFS && i < ctxq->size; i++)
			ctl_txfree[nctl_txfree++] = mem_alloc(CTL_TX_SIZE, 16);
		ctl_send(0, VIRTIO_CONSOLE_DEVICE_READY, 1);
		for (i = 0;; i++) {
			uint32_t have = 0, k;

			if ((i & 0xfff) == 0xfff)
				vio_check_status(&con);
			ctl_process();
			for (k = 0; k < nports; k++)
				have += (uint32_t)ports[k].present;
			if (have == nports)
				break;
			if (rdtsc() > deadline) {
				con_puts("console: only ");
				con_dec(have);
				con_puts(" of ");
				con_dec(nports);
				con_puts(" ports were added\n");
				guest_exit(1);
			}
			cpu_pause();
		}
	}
}

static void alloc_buffers(void)
{
	uint32_t i, j;

	for (i = 0; i < nports; i++) {
		struct port *p = &ports[i];
		uint32_t d = depth;

		if (d > p->txq->size)
			d = p->txq->size;
		for (j = 0; j < d; j++)
			p->txfree[p->ntxfree++] = mem_alloc(bufsz, 4096);
		d = depth;
		if (d > p->rxq->size)
			d = p->rxq->size;
		for (j = 0; j < d; j++)
			p->rxfree[p->nrxfree++] = mem_alloc(bufsz, 4096);
	}
}

/* ------------------------------------------------------------------ */
/* Modes                                                               */

static int run_verify(uint32_t tx, uint32_t rx)
{
	uint32_t i;

	alloc_buffers();
	for (i = 0; i < nports; i++) {
		ports[i].tx_total = tx;
		ports[i].rx_total = rx;
	}
	for (;;) {
		uint32_t progress = ctl_process(), done = 0;

		for (i = 0; i < nports; i++) {
			progress += port_service(&ports[i]);
			done += (uint32_t)port_done(&ports[i]);
		}
		if (done == nports)
			break;
		if (!progress)
			vio_wait(&con);
	}
	for (i = 0; i < nports; i++) {
		con_puts("port ");
		con_dec(i);
		con_puts(" tx ");
		con_dec(ports[i].tx_done);
		con_putc('\n');
		con_puts("port ");
		con_dec(i);
		con_puts(" rx ");
		con_dec(ports[i].rx_got);
		con_puts(" hash ");
		con_hex(hash_final(&ports[i]), 8);
		con_putc('\n');
	}
	con_puts("console irqs ");
	con_dec(con.irqs);
	con_putc('\n');
	con_puts("console done\n");
	return 0;
}

static void wait_host_open(struct port *p)
{
	while (!p->host_open) {
		if (!ctl_process())
			vio_wait(&con);
	}
}

static int run_bench(uint32_t tx)
{
	struct port *p = &ports[0];
	struct vq *q = p->txq;
	uint8_t *b = mem_alloc(bufsz, 4096);
	uint32_t count = tx / bufsz, posted = 0, done = 0, len;

	fill_pattern((uint32_t *)b, 0, 0, bufsz);
	wait_host_open(p);
	while (done < count) {
		int got = 0;

		while (posted < count && vq_add(q, b, bufsz, 0) >= 0)
			posted++;
		vq_kick(q);
		while (vq_get(q, &len) >= 0) {
			done++;
			got = 1;
		}
		if (!got) {
			if (multiport && (vq_has_used(crxq) || vq_has_used(ctxq)))
				ctl_process();
			else
				vio_wait(&con);
		}
	}
	con_puts("bench done ");
	con_dec(done * bufsz);
	con_puts("\nbench irqs ");
	con_dec(con.irqs);
	con_putc('\n');
	return 0;
}

static void rng_setup(enum vio_mode mode)
{
	vio_probe(&rng, VIRTIO_DEV_RNG, "virtio-rng", RNG_VECTOR_BASE);
	vio_begin(&rng, mode);
	vio_negotiate(&rng, 0);
	vio_setup_queue(&rng, 0, VQ_MAX_SIZE);
	vio_driver_ok(&rng);
}

/* Read 64 bytes of entropy (possibly in several completions). */
static void rng_read64(uint8_t *buf)
{
	struct vq *q = rng.vqs[0];
	uint32_t got = 0, len;

	while (got < 64) {
		vq_add(q, buf + got, 64 - got, 1);
		vq_kick(q);
		while (vq_get(q, &len) < 0)
			vio_wait(&rng);
		got += len;
	}
}

static int run_counter(uint32_t limit, int use_rng, enum vio_mode mode)
{
	struct port *p = &ports[0];
	uint8_t *line = mem_alloc(16, 16);
	uint8_t *entropy = mem_alloc(64, 64);
	uint32_t n = 0, len;

	if (use_rng)
		rng_setup(mode);
	con_puts("counter start\n");
	for (;;) {
		char digits[12];
		uint32_t v = n, nd = 0, l = 0;

		do {
			digits[nd++] = (char)('0' + v % 10);
			v /= 10;
		} while (v);
		while (nd)
			line[l++] = (uint8_t)digits[--nd];
		line[l++] = '\n';

		wait_host_open(p);
		vq_add(p->txq, line, l, 0);
		vq_kick(p->txq);
		while (vq_get(p->txq, &len) < 0) {
			if (!ctl_process())
				vio_wait(&con);
		}
		n++;
		if (limit && n == limit)
			break;
		if (use_rng)
			rng_read64(entropy);
	}
	con_puts("counter done ");
	con_dec(n);
	con_putc('\n');
	return 0;
}

/* Does the option value at v equal word w (up to a space or the end)? */
static int word_is(const char *v, const char *w)
{
	while (*w && *v == *w) {
		v++;
		w++;
	}
	return !*w && (*v == 0 || *v == ' ');
}

int main(void)
{
	const char *mode_s;
	enum vio_mode mode;
	uint32_t tx, rx;

	opt_init();
	nports = opt_num("ports=", 1);
	bufsz = opt_num("buf=", 4096);
	depth = opt_num("depth=", 8);
	tx = opt_num("tx=", 65536);
	rx = opt_num("rx=", 0);
	multiport = opt_num("multiport=", 1);
	hostwait = opt_num("hostwait=", 1);
	mode = opt_num("poll=", 0) ? VIO_POLL
	       : opt_num("msix=", 1) ? VIO_MSIX : VIO_INTX;
	mode_s = opt_find("mode=");
	if (!mode_s)
		mode_s = "verify";
	if (nports < 1 || nports > MAX_PORTS)
		fail("console: ports= must be 1..8");
	if (bufsz < 4 || bufsz % 4)
		fail("console: buf= must be a positive multiple of 4");
	if (depth < 1 || depth > MAX_DEPTH)
		fail("console: depth= must be 1..64");
	if (!word_is(mode_s, "verify") && !word_is(mode_s, "bench") &&
	    !word_is(mode_s, "counter"))
		fail("console: mode= is verify, bench or counter");

	vio_probe(&con, VIRTIO_DEV_CONSOLE, "virtio-console", CONSOLE_VECTOR_BASE);
	irq_init();
	cpu_sti();
	console_init(mode, (uint32_t)opt_num("portwait=", 34));

	if (word_is(mode_s, "bench"))
		return run_bench(tx);
	if (word_is(mode_s, "counter"))
		return run_counter(opt_num("limit=", 0), (int)opt_num("rng=", 0), mode);
	return run_verify(tx, rx);
}
