/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * The split virtqueue's device side in C, for the back ends that move whole batches of
 * chains in one call with the GIL released (virtio-net's `_netpath`, virtio's `_vring`).
 *
 * The guest is untrusted. A chain is walked by exactly the rules of
 * hvf.plugins.virtio.queue.SplitQueue (every buffer, ring entry and indirect table
 * inside one RAM region, at most queue-size descriptors, no NEXT or nesting on an
 * indirect one, no readable after writable, at most 2^32 bytes); a caller takes a chain
 * only when walk() accepts it, and otherwise leaves it in the ring for the Python path,
 * which reports the error, so the rules and the messages have one home. Each descriptor
 * and ring field is read from guest RAM once, into a local, before it is checked.
 *
 * The part between the "records" markers is also what the cffi build scripts declare
 * (hvf_vq_cdef() reads it), so Python fills these structures field by field.
 */
#ifndef HVF_VRING_H
#define HVF_VRING_H

#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

/* records: begin */
struct hvf_vq_ram {
    int nregions;
    uint64_t base[2];          /* guest-physical start of each region */
    uint64_t size[2];
    uint8_t *host[2];          /* where each region is mapped */
    uint64_t file_offset[2];   /* its offset in the RAM file (dirty marks) */
    uint8_t *written;          /* a byte per page of the RAM file, or NULL */
    size_t written_pages;
};

struct hvf_vq_ring {
    uint8_t *desc;             /* descriptor table, size * 16 bytes */
    uint8_t *avail;            /* available ring */
    uint8_t *used;             /* used ring */
    uint32_t size;             /* a power of two */
    uint16_t next_avail;       /* in/out: the device's ring positions */
    uint16_t next_used;
    int indirect;              /* VIRTIO_F_INDIRECT_DESC negotiated */
};
/* records: end */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_CHAIN_BYTES (1ULL << 32)
#define MAX_IOV 1024       /* the kernel's IOV_MAX */
#define PAGE_SHIFT 12

/* A chain as taken: its buffers as host iovecs, the readable ones first. */
struct chain {
    uint16_t head;
    unsigned nreadable, nwritable;      /* iovecs of each kind */
    uint64_t readable_length, writable_length;
    struct iovec *iov;                  /* readable ones, then writable ones */
    unsigned max_iov;
};

enum walk { WALK_OK, WALK_BAD, WALK_FULL };

/* Loads and stores of fields the driver shares, each done exactly once. */
static inline uint16_t load16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static inline uint16_t load16_acquire(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void store32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

static inline void store16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };

/* A descriptor copied out of guest RAM (an indirect table need not be aligned); the
   barrier keeps the compiler from reading the guest's copy again later. */
static inline struct desc load_desc(const uint8_t *table, uint32_t index)
{
    struct desc d;
    memcpy(&d, table + ((size_t)index << 4), sizeof d);
    __asm__ volatile("" ::: "memory");
    return d;
}

/*
 * The host address of guest-physical [gpa, gpa+len) when it lies wholly inside one
 * region (len 0 too, at an address from a region's start to its end), else NULL.
 */
static inline uint8_t *translate(const struct hvf_vq_ram *ram, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < ram->nregions; i++) {
        uint64_t base = ram->base[i], size = ram->size[i];
        if (gpa >= base && gpa - base <= size && len <= size - (gpa - base))
            return ram->host[i] + (gpa - base);
    }
    return NULL;
}

/* Mark the RAM file's pages under host range [p, p+len) as written by hvf. */
static inline void note_written(const struct hvf_vq_ram *ram, const uint8_t *p, size_t len)
{
    if (!ram->written || !len)
        return;
    for (int i = 0; i < ram->nregions; i++) {
        if (p >= ram->host[i] && (uint64_t)(p - ram->host[i]) < ram->size[i]) {
            uint64_t offset = ram->file_offset[i] + (uint64_t)(p - ram->host[i]);
            uint64_t first = offset >> PAGE_SHIFT;
            uint64_t end = ((offset + len - 1) >> PAGE_SHIFT) + 1;
            if (end > ram->written_pages)
                end = ram->written_pages;
            if (first < end)
                memset(ram->written + first, 1, end - first);
            return;
        }
    }
}

/*
 * Walk the chain from `head` by SplitQueue._walk's rules: WALK_BAD when it breaks one,
 * WALK_FULL when it has more buffers than c->max_iov, WALK_OK with c filled in.
 */
static inline enum walk walk(const struct hvf_vq_ram *ram, const struct hvf_vq_ring *ring,
                      uint16_t head, struct chain *c)
{
    uint32_t size = ring->size;
    if (head >= size)
        return WALK_BAD;
    const uint8_t *table = ring->desc;
    uint64_t table_size = size, table_left = size;
    int64_t budget = size;
    int in_table = 0;
    unsigned n = 0, nwritable = 0;
    uint64_t readable = 0, writable = 0;
    uint32_t index = head;
    c->head = head;
    for (;;) {
        struct desc d = load_desc(table, index);
        if (d.flags & DESC_F_INDIRECT) {
            if (in_table || !ring->indirect || (d.flags & DESC_F_NEXT) || !d.len ||
                d.len % 16)
                return WALK_BAD;
            const uint8_t *t = translate(ram, d.addr, d.len);
            if (!t)
                return WALK_BAD;
            table = t;
            table_size = table_left = d.len >> 4;
            in_table = 1;
            index = 0;
            continue;
        }
        if (--budget < 0)
            return WALK_BAD;
        if (table_left-- == 0)
            return WALK_BAD;
        uint8_t *p = translate(ram, d.addr, d.len);
        if (!p)
            return WALK_BAD;
        if (d.flags & DESC_F_WRITE) {
            writable += d.len;
            nwritable++;
        } else if (nwritable) {
            return WALK_BAD;
        } else {
            readable += d.len;
        }
        if (readable + writable > MAX_CHAIN_BYTES)
            return WALK_BAD;
        if (n == c->max_iov)
            return WALK_FULL;
        c->iov[n].iov_base = p;
        c->iov[n].iov_len = d.len;
        n++;
        if (!(d.flags & DESC_F_NEXT))
            break;
        if (d.next >= table_size)
            return WALK_BAD;
        index = d.next;
    }
    c->nreadable = n - nwritable;
    c->nwritable = nwritable;
    c->readable_length = readable;
    c->writable_length = writable;
    return WALK_OK;
}

/* The head of the chain at `position` of the available ring. */
static inline uint16_t avail_head(const struct hvf_vq_ring *ring, uint16_t position)
{
    return load16(ring->avail + 4 + 2 * (position & (ring->size - 1)));
}

/* How many chains the driver has made available past the device's position, or -1
   when its index is more than the queue size ahead (a broken ring). */
static inline int available(const struct hvf_vq_ring *ring)
{
    uint16_t idx = load16_acquire(ring->avail + 2);
    uint16_t ahead = (uint16_t)(idx - ring->next_avail);
    return ahead > ring->size ? -1 : ahead;
}

static inline void push(struct hvf_vq_ring *ring, uint16_t head, uint32_t written)
{
    uint8_t *elem = ring->used + 4 + 8 * (size_t)(ring->next_used & (ring->size - 1));
    store32(elem, head);
    store32(elem + 4, written);
    ring->next_used++;
    store16_release(ring->used + 2, ring->next_used);
}

#endif /* HVF_VRING_H */
