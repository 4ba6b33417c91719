/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * virtio_rng: a virtio 1.x entropy driver (PCI 1af4:1044, virtio 1.x
 * section 5.4).  Each phase resets and initialises the device in one
 * interrupt mode, reads n= bytes through `depth` posted buffers of buf=
 * bytes each, and prints
 *
 *   rng <msix|intx|poll> bytes N irqs K requests R zerowords Z
 *
 * See README.md for the options.
 */
#include "virtio.h"

#define RNG_VECTOR_BASE 0x70

static struct vio_dev rng;

static void run_phase(enum vio_mode mode, uint32_t total, uint32_t bufsz,
		      uint32_t depth, uint8_t **bufs, int print_features)
{
	struct vq *q;
	uint32_t received = 0, outstanding = 0, requests = 0, zero = 0;
	uint32_t irqs0, nfree = depth, i;
	uint8_t *freebufs[VQ_MAX_SIZE];

	vio_begin(&rng, mode);
	vio_negotiate(&rng, 0);
	if (print_features) {
		con_puts("features ");
		con_hex64(rng.dev_features);
		con_putc('\n');
	}
	q = vio_setup_queue(&rng, 0, VQ_MAX_SIZE);
	vio_driver_ok(&rng);
	if (depth > q->size)
		nfree = depth = q->size;
	for (i = 0; i < depth; i++)
		freebufs[i] = bufs[i];
	irqs0 = rng.irqs;

	while (received < total) {
		int id;
		uint32_t len;

		/* Keep up to `depth` requests posted, never asking for more than n. */
		while (nfree && received + outstanding < total) {
			uint32_t want = total - received - outstanding;

			if (want > bufsz)
				want = bufsz;
			vq_add(q, freebufs[--nfree], want, 1);
			outstanding += want;
		}
		vq_kick(q);
		id = vq_get(q, &len);
		if (id < 0) {
			vio_wait(&rng);
			continue;
		}
		do {
			uint8_t *b = (uint8_t *)q->buf_addr[id];

			outstanding -= q->buf_len[id];
			received += len;
			requests++;
			if (len >= 4 && *(uint32_t *)b == 0)
				zero++;
			freebufs[nfree++] = b;
		} while ((id = vq_get(q, &len)) >= 0);
	}
	con_puts("rng ");
	con_puts(vio_mode_name(mode));
	con_puts(" bytes ");
	con_dec(received);
	con_puts(" irqs ");
	con_dec(rng.irqs - irqs0);
	con_puts(" requests ");
	con_dec(requests);
	con_puts(" zerowords ");
	con_dec(zero);
	con_putc('\n');
	vio_reset(&rng);
}

int main(void)
{
	uint32_t total, bufsz, depth, i;
	const char *phases;
	uint8_t *bufs[VQ_MAX_SIZE];
	int poll, first = 1;

	opt_init();
	total = opt_num("n=", 1048576);
	bufsz = opt_num("buf=", 4096);
	depth = opt_num("depth=", 8);
	poll = (int)opt_num("poll=", 0);
	phases = opt_find("phases=");
	if (!phases)
		phases = "12";
	if (bufsz == 0)
		fail("rng: buf= must be at least 1");
	if (depth == 0 || depth > VQ_MAX_SIZE)
		fail("rng: depth= must be 1..256");
	for (i = 0; phases[i] && phases[i] != ' '; i++)
		if (phases[i] < '0' || phases[i] > '2')
			fail("rng: phases= takes digits 0 (poll), 1 (msix), 2 (intx)");
	if (i == 0)
		fail("rng: phases= is empty");

	vio_probe(&rng, VIRTIO_DEV_RNG, "virtio-rng", RNG_VECTOR_BASE);
	for (i = 0; i < depth; i++)
		bufs[i] = mem_alloc(bufsz, 4096);
	irq_init();
	cpu_sti();

	for (i = 0; phases[i] && phases[i] != ' '; i++) {
		enum vio_mode mode = phases[i] == '1' ? VIO_MSIX
				     : phases[i] == '2' ? VIO_INTX : VIO_POLL;

		if (poll)
			mode = VIO_POLL;
		run_phase(mode, total, bufsz, depth, bufs, first);
		first = 0;
	}
	if (irq_stray) {
		con_puts("rng: stray interrupts ");
		con_dec(irq_stray);
		con_putc('\n');
		return 1;
	}
	return 0;
}
