/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * A small virtio 1.x modern PCI driver library for the C test guests
 * (virtio_lib.c): PCI discovery and capabilities, device initialisation
 * (virtio 1.x section 3.1), split virtqueues, MSI-X / INTx / polled
 * completion.
 *
 * Only single-descriptor buffers are used (no chains, no indirect
 * descriptors, no event index).  A descriptor's index doubles as the
 * buffer id, and the library remembers each buffer's address and length.
 */
#ifndef HVF_GUEST_VIRTIO_H
#define HVF_GUEST_VIRTIO_H

#include "libc.h"

#define VIRTIO_VENDOR		0x1af4
#define VIRTIO_DEV_CONSOLE	0x1043
#define VIRTIO_DEV_RNG		0x1044

/* device_status bits */
#define VIRTIO_ACKNOWLEDGE	0x01
#define VIRTIO_DRIVER		0x02
#define VIRTIO_DRIVER_OK	0x04
#define VIRTIO_FEATURES_OK	0x08
#define VIRTIO_NEEDS_RESET	0x40
#define VIRTIO_FAILED		0x80

#define VIRTIO_F_VERSION_1	(1ull << 32)

#define VIRTIO_NO_VECTOR	0xffff

/* Compile-time maximum queue size the driver uses (a power of two). */
#define VQ_MAX_SIZE		256
#define VIO_MAX_QUEUES		20

/* Split virtqueue layout (virtio 1.x section 2.7). */
struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

#define VRING_DESC_F_NEXT	1
#define VRING_DESC_F_WRITE	2

struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[];
};

enum vio_mode {
	VIO_POLL = 0,		/* no interrupts; poll the used rings */
	VIO_MSIX = 1,
	VIO_INTX = 2,
};

struct vio_dev;

struct vq {
	struct vio_dev *dev;
	uint16_t index;		/* queue number */
	uint16_t size;		/* entries in use: min(device, VQ_MAX_SIZE) */
	uint16_t avail_idx;	/* next free avail slot (free-running) */
	uint16_t last_used;	/* next used slot to consume (free-running) */
	uint16_t nfree;
	uint16_t pending;	/* buffers added since the last kick */
	uint16_t msix_entry;
	volatile struct vring_desc *desc;
	volatile struct vring_avail *avail;
	volatile struct vring_used *used;
	uint32_t notify_addr;
	uint16_t free_ids[VQ_MAX_SIZE];
	uint32_t buf_addr[VQ_MAX_SIZE];	/* per descriptor id */
	uint32_t buf_len[VQ_MAX_SIZE];
	uint8_t in_flight[VQ_MAX_SIZE];
};

struct vio_dev {
	const char *name;	/* "virtio-rng", for messages */
	uint32_t bdf;		/* bus << 16 | dev << 11 | fn << 8 */
	uint16_t device_id;

	/* MMIO addresses of the capability structures */
	uint32_t common, notify, isr, devcfg;
	uint32_t notify_len, devcfg_len;
	uint32_t notify_mult;

	/* MSI-X */
	uint8_t msix_cap;	/* config offset, 0 if none */
	uint16_t msix_size;	/* table entries */
	uint32_t msix_table;	/* MMIO address */
	uint8_t vector_base;	/* APIC vector of table entry 0 */

	uint8_t irq_line;	/* config 0x3c */
	uint8_t irq_pin;	/* config 0x3d */

	enum vio_mode mode;
	uint64_t dev_features, drv_features;
	uint16_t num_queues;

	volatile uint32_t irqs;		/* interrupts taken (this device) */
	volatile uint32_t cfg_irqs;	/* configuration-change interrupts */
	uint32_t cfg_seen;
	uint32_t waits;

	struct vq *vqs[VIO_MAX_QUEUES];
};

/* PCI configuration mechanism #1 (dword accesses only). */
uint32_t pci_read32(uint32_t bdf, uint32_t off);
void pci_write32(uint32_t bdf, uint32_t off, uint32_t v);
uint8_t pci_read8(uint32_t bdf, uint32_t off);
uint16_t pci_read16(uint32_t bdf, uint32_t off);

/*
 * Find the device on bus 0, enable memory decode and bus mastering, and
 * map its capabilities.  Prints an error and exits 1 if it is missing or
 * unusable.  vector_base: APIC vector for MSI-X table entry 0 (the
 * device uses entries 0 .. min(table size, 1 + queues) - 1).
 */
void vio_probe(struct vio_dev *d, uint16_t device_id, const char *name,
	       uint8_t vector_base);

/*
 * Reset and begin initialisation in the given interrupt mode: MSI-X on
 * or off in the capability, reset, ACKNOWLEDGE | DRIVER, device features
 * read.  Returns the device features.
 */
uint64_t vio_begin(struct vio_dev *d, enum vio_mode mode);
/* Accept `wanted & offered` (VERSION_1 is required), FEATURES_OK. */
void vio_negotiate(struct vio_dev *d, uint64_t wanted);
/* Set up queue `index` with at most `max` entries; returns it. */
struct vq *vio_setup_queue(struct vio_dev *d, uint16_t index, uint16_t max);
void vio_driver_ok(struct vio_dev *d);
/* Write 0 to device_status and wait until it reads back 0. */
void vio_reset(struct vio_dev *d);
/* Read device_status; prints and exits 1 on NEEDS_RESET or FAILED. */
void vio_check_status(struct vio_dev *d);

/* Device-specific configuration space (natural-width reads). */
uint8_t vio_cfg_read8(struct vio_dev *d, uint32_t off);
uint16_t vio_cfg_read16(struct vio_dev *d, uint32_t off);
uint32_t vio_cfg_read32(struct vio_dev *d, uint32_t off);
uint8_t vio_config_generation(struct vio_dev *d);

/*
 * Post one buffer (device-writable if `writable`); returns its
 * descriptor id, or -1 if the queue is full.  Nothing reaches the
 * device until vq_kick.
 */
int vq_add(struct vq *q, void *buf, uint32_t len, int writable);
/* Publish and notify if anything was added since the last kick. */
void vq_kick(struct vq *q);
/* A completed buffer: its id (buffer in q->buf_addr[id]) or -1. */
int vq_get(struct vq *q, uint32_t *len);
static inline int vq_has_used(const struct vq *q)
{
	return q->used->idx != q->last_used;
}
static inline uint16_t vq_in_flight(const struct vq *q)
{
	return (uint16_t)(q->size - q->nfree);
}

/*
 * Wait for progress on device d: returns at once if any of its queues
 * has a used entry, else halts until an interrupt (interrupt modes,
 * checked with IF clear so no wake-up is lost) or spins once (poll
 * mode).  Checks device_status after configuration interrupts, and every
 * so often anyway.
 */
void vio_wait(struct vio_dev *d);

const char *vio_mode_name(enum vio_mode m);

#endif
