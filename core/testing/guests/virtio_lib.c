/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * virtio 1.x modern PCI driver library for the C test guests; see
 * virtio.h.  References are to the virtio 1.x specification.
 */
#include "virtio.h"

#define PCI_ADDR_PORT	0xcf8
#define PCI_DATA_PORT	0xcfc

#define PCI_COMMAND		0x04
#define PCI_CMD_MEMORY		0x0002
#define PCI_CMD_MASTER		0x0004
#define PCI_CMD_INTX_DISABLE	0x0400
#define PCI_STATUS_CAP_LIST	0x0010
#define PCI_CAP_PTR		0x34
#define PCI_INT_LINE		0x3c
#define PCI_INT_PIN		0x3d

#define PCI_CAP_VENDOR		0x09
#define PCI_CAP_MSIX		0x11

#define MSIX_CTRL_ENABLE	0x8000
#define MSIX_CTRL_MASK		0x4000

/* virtio_pci_cap cfg_type (4.1.4) */
#define VIRTIO_PCI_CAP_COMMON	1
#define VIRTIO_PCI_CAP_NOTIFY	2
#define VIRTIO_PCI_CAP_ISR	3
#define VIRTIO_PCI_CAP_DEVICE	4

/* struct virtio_pci_common_cfg (4.1.4.3) */
#define CC_DFSELECT	0x00
#define CC_DF		0x04
#define CC_GFSELECT	0x08
#define CC_GF		0x0c
#define CC_MSIX		0x10
#define CC_NUMQ		0x12
#define CC_STATUS	0x14
#define CC_CFGGEN	0x15
#define CC_Q_SELECT	0x16
#define CC_Q_SIZE	0x18
#define CC_Q_MSIX	0x1a
#define CC_Q_ENABLE	0x1c
#define CC_Q_NOFF	0x1e
#define CC_Q_DESCLO	0x20
#define CC_Q_DESCHI	0x24
#define CC_Q_AVAILLO	0x28
#define CC_Q_AVAILHI	0x2c
#define CC_Q_USEDLO	0x30
#define CC_Q_USEDHI	0x34
#define CC_LEN		0x38

/* MSI-X table entries a device uses at most (config + queues). */
#define VIO_MAX_VECTORS	16

/* ------------------------------------------------------------------ */
/* PCI                                                                 */

uint32_t pci_read32(uint32_t bdf, uint32_t off)
{
	outl(PCI_ADDR_PORT, 0x80000000u | bdf | (off & 0xfc));
	return inl(PCI_DATA_PORT);
}

void pci_write32(uint32_t bdf, uint32_t off, uint32_t v)
{
	outl(PCI_ADDR_PORT, 0x80000000u | bdf | (off & 0xfc));
	outl(PCI_DATA_PORT, v);
}

uint8_t pci_read8(uint32_t bdf, uint32_t off)
{
	return (uint8_t)(pci_read32(bdf, off) >> (8 * (off & 3)));
}

uint16_t pci_read16(uint32_t bdf, uint32_t off)
{
	return (uint16_t)(pci_read32(bdf, off) >> (8 * (off & 2)));
}

static void dev_fail(struct vio_dev *d, const char *what)
{
	con_puts(d->name);
	con_puts(": ");
	fail(what);
}

static void dev_fail_num(struct vio_dev *d, const char *what, uint32_t n)
{
	con_puts(d->name);
	con_puts(": ");
	con_puts(what);
	con_putc(' ');
	con_dec(n);
	con_putc('\n');
	guest_exit(1);
}

/* Memory address of BAR `bar`; it must be a memory BAR below 4 GiB. */
static uint32_t bar_address(struct vio_dev *d, uint32_t bar)
{
	uint32_t lo = pci_read32(d->bdf, 0x10 + 4 * bar);

	if (lo & 1)
		dev_fail_num(d, "I/O BAR not supported: bar", bar);
	if (((lo >> 1) & 3) == 2) {
		if (bar == 5)
			dev_fail_num(d, "64-bit BAR in the last slot: bar", bar);
		if (pci_read32(d->bdf, 0x10 + 4 * (bar + 1)))
			dev_fail_num(d, "BAR above 4 GiB (paging is off): bar", bar);
	}
	if (!(lo & ~0xfu))
		dev_fail_num(d, "BAR not assigned: bar", bar);
	return lo & ~0xfu;
}

static int pci_find(uint16_t vendor, uint16_t device, uint32_t *bdf)
{
	uint32_t devfn;

	for (devfn = 0; devfn < 256; devfn++) {
		uint32_t id = pci_read32(devfn << 8, 0);

		if (id == ((uint32_t)device << 16 | vendor)) {
			*bdf = devfn << 8;
			return 1;
		}
	}
	return 0;
}

void vio_probe(struct vio_dev *d, uint16_t device_id, const char *name,
	       uint8_t vector_base)
{
	uint32_t cmd, ptr, guard;
	int have_common = 0, have_notify = 0, have_isr = 0, have_dev = 0;

	memset(d, 0, sizeof(*d));
	d->name = name;
	d->device_id = device_id;
	d->vector_base = vector_base;
	if (!pci_find(VIRTIO_VENDOR, device_id, &d->bdf)) {
		con_puts(name);
		con_puts(": pci 1af4:");
		con_hex(device_id, 4);
		con_puts(" not found\n");
		guest_exit(1);
	}

	/* Command: memory decode + bus master; status half 0 (no RW1C hits). */
	cmd = pci_read32(d->bdf, PCI_COMMAND);
	if (!(cmd >> 16 & PCI_STATUS_CAP_LIST))
		dev_fail(d, "no capability list");
	cmd = (cmd & 0xffff) | PCI_CMD_MEMORY | PCI_CMD_MASTER;
	pci_write32(d->bdf, PCI_COMMAND, cmd);

	d->irq_line = pci_read8(d->bdf, PCI_INT_LINE);
	d->irq_pin = pci_read8(d->bdf, PCI_INT_PIN);

	ptr = pci_read8(d->bdf, PCI_CAP_PTR) & 0xfc;
	for (guard = 0; ptr && guard < 48; guard++) {
		uint8_t id = pci_read8(d->bdf, ptr);

		if (id == PCI_CAP_VENDOR) {
			uint8_t type = pci_read8(d->bdf, ptr + 3);
			uint8_t bar = pci_read8(d->bdf, ptr + 4);
			uint32_t off = pci_read32(d->bdf, ptr + 8);
			uint32_t len = pci_read32(d->bdf, ptr + 12);

			/* The first capability of each type is the one to use. */
			if (bar > 5)
				goto next;
			if (type == VIRTIO_PCI_CAP_COMMON && !have_common) {
				d->common = bar_address(d, bar) + off;
				if (len < CC_LEN)
					dev_fail_num(d, "common config too short:", len);
				have_common = 1;
			} else if (type == VIRTIO_PCI_CAP_NOTIFY && !have_notify) {
				d->notify = bar_address(d, bar) + off;
				d->notify_len = len;
				d->notify_mult = pci_read32(d->bdf, ptr + 16);
				have_notify = 1;
			} else if (type == VIRTIO_PCI_CAP_ISR && !have_isr) {
				d->isr = bar_address(d, bar) + off;
				if (len < 1)
					dev_fail(d, "ISR capability has length 0");
				have_isr = 1;
			} else if (type == VIRTIO_PCI_CAP_DEVICE && !have_dev) {
				d->devcfg = bar_address(d, bar) + off;
				d->devcfg_len = len;
				have_dev = 1;
			}
		} else if (id == PCI_CAP_MSIX && !d->msix_cap) {
			uint32_t ctrl = pci_read16(d->bdf, ptr + 2);
			uint32_t table = pci_read32(d->bdf, ptr + 4);

			d->msix_cap = (uint8_t)ptr;
			d->msix_size = (uint16_t)((ctrl & 0x7ff) + 1);
			d->msix_table = bar_address(d, table & 7) + (table & ~7u);
		}
next:
		ptr = pci_read8(d->bdf, ptr + 1) & 0xfc;
	}
	if (!have_common)
		dev_fail(d, "no common config capability");
	if (!have_notify)
		dev_fail(d, "no notify capability");
	if (!have_isr)
		dev_fail(d, "no ISR capability");
	d->num_queues = mmio_read16(d->common + CC_NUMQ);
}

/* ------------------------------------------------------------------ */
/* Interrupt handlers                                                  */

static void vio_msix_queue_isr(void *arg)
{
	struct vio_dev *d = arg;

	d->irqs++;
}

static void vio_msix_config_isr(void *arg)
{
	struct vio_dev *d = arg;

	d->irqs++;
	d->cfg_irqs++;
}

static void vio_intx_isr(void *arg)
{
	struct vio_dev *d = arg;
	uint8_t isr = mmio_read8(d->isr);	/* read-to-clear, deasserts */

	if (!isr)
		return;			/* another device on a shared line */
	d->irqs++;
	if (isr & 2)
		d->cfg_irqs++;
}

static uint32_t msix_vectors(struct vio_dev *d)
{
	uint32_t n = 1u + d->num_queues;

	if (n > d->msix_size)
		n = d->msix_size;
	if (n > VIO_MAX_VECTORS)
		n = VIO_MAX_VECTORS;
	return n;
}

/* ------------------------------------------------------------------ */
/* Initialisation (3.1.1)                                              */

static void set_status(struct vio_dev *d, uint8_t bits)
{
	mmio_write8(d->common + CC_STATUS,
		    (uint8_t)(mmio_read8(d->common + CC_STATUS) | bits));
}

void vio_reset(struct vio_dev *d)
{
	uint32_t i;

	mmio_write8(d->common + CC_STATUS, 0);
	for (i = 0; mmio_read8(d->common + CC_STATUS) != 0; i++) {
		if (i == 1000000)
			dev_fail(d, "reset did not complete (status stays non-zero)");
		cpu_pause();
	}
}

uint64_t vio_begin(struct vio_dev *d, enum vio_mode mode)
{
	uint32_t cmd, i, n;

	if (mode == VIO_MSIX && !d->msix_cap)
		dev_fail(d, "no MSI-X capability");
	if (mode == VIO_INTX) {
		if (!d->irq_pin)
			dev_fail(d, "no INTx pin");
		if (d->irq_line > 15 || d->irq_line == 2)
			dev_fail_num(d, "unusable INTx line", d->irq_line);
	}
	vio_reset(d);
	d->mode = mode;
	for (i = 0; i < VIO_MAX_QUEUES; i++)
		if (d->vqs[i])
			d->vqs[i]->size = 0;	/* not set up */

	/* INTx: enabled only in INTx mode (no stray level interrupt when polling). */
	cmd = pci_read32(d->bdf, PCI_COMMAND) & 0xffff;
	cmd |= PCI_CMD_MEMORY | PCI_CMD_MASTER;
	if (mode == VIO_INTX)
		cmd &= ~PCI_CMD_INTX_DISABLE;
	else
		cmd |= PCI_CMD_INTX_DISABLE;
	pci_write32(d->bdf, PCI_COMMAND, cmd);

	if (d->msix_cap) {
		uint32_t ctl = pci_read32(d->bdf, d->msix_cap);

		if (mode == VIO_MSIX) {
			/* Enable with the function masked, program, unmask. */
			ctl |= (uint32_t)(MSIX_CTRL_ENABLE | MSIX_CTRL_MASK) << 16;
			pci_write32(d->bdf, d->msix_cap, ctl);
			n = msix_vectors(d);
			for (i = 0; i < d->msix_size && i < VIO_MAX_VECTORS; i++) {
				uint32_t e = d->msix_table + 16 * i;

				mmio_write32(e + 0, 0xfee00000u);	/* APIC 0, physical */
				mmio_write32(e + 4, 0);
				mmio_write32(e + 8, d->vector_base + i);	/* fixed, edge */
				mmio_write32(e + 12, i < n ? 0 : 1);	/* unmasked if used */
				if (i < n)
					irq_set_vector((uint8_t)(d->vector_base + i),
						       i == 0 ? vio_msix_config_isr
							      : vio_msix_queue_isr, d);
			}
			ctl &= ~((uint32_t)MSIX_CTRL_MASK << 16);
			pci_write32(d->bdf, d->msix_cap, ctl);
		} else {
			ctl &= ~((uint32_t)(MSIX_CTRL_ENABLE | MSIX_CTRL_MASK) << 16);
			pci_write32(d->bdf, d->msix_cap, ctl);
		}
	}
	if (mode == VIO_INTX)
		irq_add_line(d->irq_line, vio_intx_isr, d);

	set_status(d, VIRTIO_ACKNOWLEDGE);
	set_status(d, VIRTIO_DRIVER);
	mmio_write32(d->common + CC_DFSELECT, 0);
	d->dev_features = mmio_read32(d->common + CC_DF);
	mmio_write32(d->common + CC_DFSELECT, 1);
	d->dev_features |= (uint64_t)mmio_read32(d->common + CC_DF) << 32;
	d->num_queues = mmio_read16(d->common + CC_NUMQ);
	return d->dev_features;
}

void vio_negotiate(struct vio_dev *d, uint64_t wanted)
{
	if (!(d->dev_features & VIRTIO_F_VERSION_1))
		dev_fail(d, "VIRTIO_F_VERSION_1 not offered");
	d->drv_features = d->dev_features & (wanted | VIRTIO_F_VERSION_1);
	mmio_write32(d->common + CC_GFSELECT, 0);
	mmio_write32(d->common + CC_GF, (uint32_t)d->drv_features);
	mmio_write32(d->common + CC_GFSELECT, 1);
	mmio_write32(d->common + CC_GF, (uint32_t)(d->drv_features >> 32));
	set_status(d, VIRTIO_FEATURES_OK);
	if (!(mmio_read8(d->common + CC_STATUS) & VIRTIO_FEATURES_OK)) {
		set_status(d, VIRTIO_FAILED);
		dev_fail(d, "FEATURES_OK did not stick (features refused)");
	}
	if (d->mode == VIO_MSIX) {
		mmio_write16(d->common + CC_MSIX, 0);	/* config: table entry 0 */
		if (mmio_read16(d->common + CC_MSIX) == VIRTIO_NO_VECTOR)
			dev_fail(d, "config_msix_vector reads back NO_VECTOR");
	}
}

struct vq *vio_setup_queue(struct vio_dev *d, uint16_t index, uint16_t max)
{
	struct vq *q;
	uint16_t dev_size, n, off;
	uint32_t i;

	if (index >= d->num_queues || index >= VIO_MAX_QUEUES)
		dev_fail_num(d, "no such queue:", index);
	mmio_write16(d->common + CC_Q_SELECT, index);
	dev_size = mmio_read16(d->common + CC_Q_SIZE);
	if (dev_size == 0)
		dev_fail_num(d, "queue size 0 for queue", index);
	if (dev_size & (dev_size - 1))
		dev_fail_num(d, "queue size not a power of 2:", dev_size);
	if (mmio_read16(d->common + CC_Q_ENABLE))
		dev_fail_num(d, "queue enabled before setup:", index);
	n = dev_size;
	if (max > VQ_MAX_SIZE)
		max = VQ_MAX_SIZE;
	while (n > max)
		n >>= 1;

	q = d->vqs[index];
	if (!q) {
		/* Rings for the largest size; reused after a re-init. */
		q = mem_alloc(sizeof(*q), 64);
		q->desc = mem_alloc(16 * VQ_MAX_SIZE, 4096);
		q->avail = mem_alloc(6 + 2 * VQ_MAX_SIZE, 4096);
		q->used = mem_alloc(6 + 8 * VQ_MAX_SIZE, 4096);
		d->vqs[index] = q;
	}
	memset((void *)q->desc, 0, 16 * n);
	memset((void *)q->avail, 0, 6 + 2 * n);
	memset((void *)q->used, 0, 6 + 8 * n);
	q->dev = d;
	q->index = index;
	q->size = n;
	q->avail_idx = 0;
	q->last_used = 0;
	q->pending = 0;
	q->nfree = n;
	for (i = 0; i < n; i++) {
		q->free_ids[i] = (uint16_t)(n - 1 - i);	/* id 0 comes out first */
		q->in_flight[i] = 0;
	}
	if (d->mode == VIO_POLL)
		q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;

	mmio_write16(d->common + CC_Q_SIZE, n);
	mmio_write32(d->common + CC_Q_DESCLO, (uint32_t)q->desc);
	mmio_write32(d->common + CC_Q_DESCHI, 0);
	mmio_write32(d->common + CC_Q_AVAILLO, (uint32_t)q->avail);
	mmio_write32(d->common + CC_Q_AVAILHI, 0);
	mmio_write32(d->common + CC_Q_USEDLO, (uint32_t)q->used);
	mmio_write32(d->common + CC_Q_USEDHI, 0);
	if (d->mode == VIO_MSIX) {
		q->msix_entry = (uint16_t)((1u + index) % msix_vectors(d));
		mmio_write16(d->common + CC_Q_MSIX, q->msix_entry);
		if (mmio_read16(d->common + CC_Q_MSIX) == VIRTIO_NO_VECTOR)
			dev_fail_num(d, "queue_msix_vector reads back NO_VECTOR for queue",
				     index);
	}
	off = mmio_read16(d->common + CC_Q_NOFF);
	if ((uint32_t)off * d->notify_mult + 2 > d->notify_len)
		dev_fail_num(d, "notify address outside the notify capability, queue",
			     index);
	q->notify_addr = d->notify + (uint32_t)off * d->notify_mult;
	mmio_write16(d->common + CC_Q_ENABLE, 1);
	return q;
}

void vio_driver_ok(struct vio_dev *d)
{
	set_status(d, VIRTIO_DRIVER_OK);
	vio_check_status(d);
}

void vio_check_status(struct vio_dev *d)
{
	uint8_t s = mmio_read8(d->common + CC_STATUS);

	if ((s & (VIRTIO_NEEDS_RESET | VIRTIO_FAILED | VIRTIO_DRIVER_OK)) !=
	    VIRTIO_DRIVER_OK) {
		con_puts(d->name);
		if (s & VIRTIO_NEEDS_RESET)
			con_puts(": device needs reset, status ");
		else
			con_puts(": unexpected device status ");
		con_hex(s, 2);
		con_putc('\n');
		guest_exit(1);
	}
}

uint8_t vio_config_generation(struct vio_dev *d)
{
	return mmio_read8(d->common + CC_CFGGEN);
}

static void cfg_check(struct vio_dev *d, uint32_t off, uint32_t size)
{
	if (!d->devcfg || off + size > d->devcfg_len)
		dev_fail_num(d, "device config read beyond its capability at", off);
}

uint8_t vio_cfg_read8(struct vio_dev *d, uint32_t off)
{
	cfg_check(d, off, 1);
	return mmio_read8(d->devcfg + off);
}

uint16_t vio_cfg_read16(struct vio_dev *d, uint32_t off)
{
	cfg_check(d, off, 2);
	return mmio_read16(d->devcfg + off);
}

uint32_t vio_cfg_read32(struct vio_dev *d, uint32_t off)
{
	cfg_check(d, off, 4);
	return mmio_read32(d->devcfg + off);
}

/* ------------------------------------------------------------------ */
/* Virtqueues (2.7)                                                    */

int vq_add(struct vq *q, void *buf, uint32_t len, int writable)
{
	uint16_t id;
	volatile struct vring_desc *desc;

	if (!q->nfree)
		return -1;
	id = q->free_ids[--q->nfree];
	desc = &q->desc[id];
	desc->addr = (uint32_t)buf;
	desc->len = len;
	desc->flags = writable ? VRING_DESC_F_WRITE : 0;
	desc->next = 0;
	q->buf_addr[id] = (uint32_t)buf;
	q->buf_len[id] = len;
	q->in_flight[id] = 1 + !!writable;
	q->avail->ring[q->avail_idx & (q->size - 1)] = id;
	q->avail_idx++;
	q->pending++;
	return id;
}

void vq_kick(struct vq *q)
{
	if (!q->pending)
		return;
	barrier();		/* ring entries before idx (x86 keeps store order) */
	q->avail->idx = q->avail_idx;
	barrier();
	q->pending = 0;
	mmio_write16(q->notify_addr, q->index);
}

int vq_get(struct vq *q, uint32_t *len)
{
	uint16_t used_idx = q->used->idx;
	uint32_t id, l;

	if (used_idx == q->last_used)
		return -1;
	if ((uint16_t)(used_idx - q->last_used) > q->size)
		dev_fail_num(q->dev, "used idx ran ahead of the ring, queue", q->index);
	barrier();		/* the entry after the index (x86 keeps load order) */
	id = q->used->ring[q->last_used & (q->size - 1)].id;
	l = q->used->ring[q->last_used & (q->size - 1)].len;
	q->last_used++;
	if (id >= q->size || !q->in_flight[id])
		dev_fail_num(q->dev, "used ring returned a descriptor not in flight:",
			     id);
	if (q->in_flight[id] == 2 && l > q->buf_len[id])
		dev_fail_num(q->dev, "used length beyond the buffer:", l);
	q->in_flight[id] = 0;
	q->free_ids[q->nfree++] = (uint16_t)id;
	*len = l;
	return (int)id;
}

void vio_wait(struct vio_dev *d)
{
	uint32_t i;

	d->waits++;
	if (d->cfg_irqs != d->cfg_seen ||
	    (d->waits & (d->mode == VIO_POLL ? 0xffff : 0x3ff)) == 0) {
		d->cfg_seen = d->cfg_irqs;
		vio_check_status(d);
	}
	if (d->mode == VIO_POLL) {
		cpu_pause();
		return;
	}
	cpu_cli();
	for (i = 0; i < VIO_MAX_QUEUES; i++) {
		struct vq *q = d->vqs[i];

		if (q && q->size && vq_has_used(q)) {
			cpu_sti();
			return;
		}
	}
	if (d->cfg_irqs == d->cfg_seen)
		cpu_sti_hlt_cli();
	cpu_sti();
}

const char *vio_mode_name(enum vio_mode m)
{
	return m == VIO_MSIX ? "msix" : m == VIO_INTX ? "intx" : "poll";
}
