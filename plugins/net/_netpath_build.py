# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf.plugins.net._netpath``: virtio-net's per-frame work in C.

On a back end whose descriptor moves one frame per ``writev``/``readv`` (a tap), the
device hands whole batches to C (:mod:`hvf.plugins.net.fastpath`): :c:func:`hvf_net_tx`
takes every available transmit chain, writes each frame behind a cleaned vnet header
to the descriptor and returns the chain through the used ring; :c:func:`hvf_net_rx`
reads frames straight into the receive chains the guest posted and returns them. cffi
releases the GIL around both.

The guest is untrusted. Chains are walked by the shared walker of
:file:`plugins/virtio/vring.h` (the rules of :class:`hvf.plugins.virtio.queue.SplitQueue`),
and a chain is taken only when it is valid and its frame needs nothing C does not do.
Otherwise C stops before that chain, leaves it in the ring and says so (HVF_NET_SLOW):
the Python path then takes it and reports the error, drops and counts the frame, or
learns the guest's ARP, so the rules and the messages have one home.
"""

from __future__ import annotations

import pathlib
import runpy

from cffi import FFI

#: virtio's build script, for the shared ring walker (vring.h) and its records.
_VRING = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "virtio"
                            / "_vring_build.py"))

CDEF = _VRING["vring_cdef"]() + """
#define HVF_NET_EMPTY ...
#define HVF_NET_LIMIT ...
#define HVF_NET_SLOW ...
#define HVF_NET_BLOCKED ...
#define HVF_NET_MAX_MACS ...

struct hvf_net_tx_args {
    uint64_t negotiated;
    uint32_t mtu_frame;        /* the largest frame without GSO */
    uint32_t frames;           /* out: frames sent */
    uint64_t bytes;            /* out: their bytes (after the header) */
};

struct hvf_net_rx_args {
    int merge;                 /* VIRTIO_NET_F_MRG_RXBUF */
    int guest_csum;            /* VIRTIO_NET_F_GUEST_CSUM */
    int is_socket;             /* the descriptor is a datagram socket (recvmsg) */
    uint32_t limit;            /* the largest frame the guest takes, header included */
    uint8_t mac[6];
    int promisc, allmulti, unicast_overflow, multicast_overflow;
    uint32_t nunicast, nmulticast;
    uint8_t unicast[64][6];
    uint8_t multicast[64][6];
    uint32_t frames;           /* out: frames delivered */
    uint64_t bytes;            /* out: their bytes (after the header) */
    uint32_t oversize;         /* out: frames dropped as too large or runts */
    uint32_t filtered;         /* out: frames the receive filter refused */
};

int hvf_net_tx(struct hvf_vq_ram *ram, struct hvf_vq_ring *ring, int fd,
               struct hvf_net_tx_args *args, unsigned limit);
int hvf_net_rx(struct hvf_vq_ram *ram, struct hvf_vq_ring *ring, int fd,
               struct hvf_net_rx_args *args, unsigned limit);
int hvf_net_tx_header_ok(const uint8_t *header, uint64_t frame_length,
                         uint64_t negotiated, uint32_t mtu_frame);
int hvf_net_rx_accepts(struct hvf_net_rx_args *args, const uint8_t *destination);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include "vring.h"

#define HVF_NET_EMPTY 0    /* tx: no chain available; rx: the descriptor had no frame */
#define HVF_NET_LIMIT 1    /* `limit` frames done, more may wait */
#define HVF_NET_SLOW 2     /* the next chain or frame is the Python path's */
#define HVF_NET_BLOCKED 3  /* tx: the descriptor cannot take a frame now */
#define HVF_NET_MAX_MACS 64

#define HEADER_SIZE 12
#define NUM_BUFFERS_OFFSET 10
#define ETH_HEADER 14
#define ETHERTYPE_ARP 0x0806
#define MAX_GSO_FRAME (65536 + 14 + 4)

#define F_CSUM (1ULL << 0)
#define F_HOST_TSO4 (1ULL << 11)
#define F_HOST_TSO6 (1ULL << 12)
#define HDR_F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80

struct hvf_net_tx_args {
    uint64_t negotiated;
    uint32_t mtu_frame;
    uint32_t frames;
    uint64_t bytes;
};

struct hvf_net_rx_args {
    int merge;
    int guest_csum;
    int is_socket;
    uint32_t limit;
    uint8_t mac[6];
    int promisc, allmulti, unicast_overflow, multicast_overflow;
    uint32_t nunicast, nmulticast;
    uint8_t unicast[64][6];
    uint8_t multicast[64][6];
    uint32_t frames;
    uint64_t bytes;
    uint32_t oversize;
    uint32_t filtered;
};

/* Copy up to `len` bytes at `offset` of the iovecs into `out`; how many were. */
static size_t gather(const struct iovec *iov, unsigned n, size_t offset, uint8_t *out,
                     size_t len)
{
    size_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        size_t size = iov[i].iov_len;
        if (offset >= size) {
            offset -= size;
            continue;
        }
        size_t count = size - offset < len - done ? size - offset : len - done;
        memcpy(out + done, (uint8_t *)iov[i].iov_base + offset, count);
        done += count;
        offset = 0;
    }
    return done;
}

/* Write `len` bytes at `offset` of the iovecs, which hold them. */
static void scatter(const struct iovec *iov, unsigned n, size_t offset, const uint8_t *data,
                    size_t len)
{
    size_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        size_t size = iov[i].iov_len;
        if (offset >= size) {
            offset -= size;
            continue;
        }
        size_t count = size - offset < len - done ? size - offset : len - done;
        memcpy((uint8_t *)iov[i].iov_base + offset, data + done, count);
        done += count;
        offset = 0;
    }
}

static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* tx.header_problem(...) is None: the transmitted frame may go as it is. */
static int hvf_net_tx_header_ok(const uint8_t *h, uint64_t frame_length,
                                uint64_t negotiated, uint32_t mtu_frame)
{
    uint8_t flags = h[0], gso_type = h[1];
    uint16_t hdr_len = le16(h + 2), gso_size = le16(h + 4);
    uint16_t csum_start = le16(h + 6), csum_offset = le16(h + 8);
    if (frame_length < ETH_HEADER)
        return 0;
    if (flags & HDR_F_NEEDS_CSUM) {
        if (!(negotiated & F_CSUM))
            return 0;
        if ((uint64_t)csum_start + csum_offset + 2 > frame_length)
            return 0;
    }
    if (gso_type & GSO_ECN)
        return 0;
    if (gso_type == GSO_NONE)
        return frame_length <= mtu_frame;
    uint64_t feature = gso_type == GSO_TCPV4 ? F_HOST_TSO4 : gso_type == GSO_TCPV6 ?
                       F_HOST_TSO6 : 0;
    if (!feature || !(negotiated & feature))
        return 0;
    if (!(flags & HDR_F_NEEDS_CSUM) || !gso_size)
        return 0;
    return frame_length <= MAX_GSO_FRAME && hdr_len <= frame_length;
}

static int hvf_net_tx(struct hvf_vq_ram *ram, struct hvf_vq_ring *ring, int fd,
                      struct hvf_net_tx_args *args, unsigned limit)
{
    struct iovec iov[MAX_IOV];
    struct chain c = { .iov = iov + 1, .max_iov = MAX_IOV - 2 };
    uint8_t head[HEADER_SIZE + ETH_HEADER];
    args->frames = 0;
    args->bytes = 0;
    for (unsigned done = 0; done < limit; done++) {
        int ahead = available(ring);
        if (ahead == 0)
            return HVF_NET_EMPTY;
        if (ahead < 0 || walk(ram, ring, avail_head(ring, ring->next_avail), &c) != WALK_OK)
            return HVF_NET_SLOW;
        if (c.nwritable || c.readable_length < HEADER_SIZE)
            return HVF_NET_SLOW;
        uint64_t length = c.readable_length - HEADER_SIZE;
        size_t got = gather(c.iov, c.nreadable, 0, head, sizeof head);
        __asm__ volatile("" ::: "memory");
        if (!hvf_net_tx_header_ok(head, length, args->negotiated, args->mtu_frame))
            return HVF_NET_SLOW;
        if (got == sizeof head && (head[24] << 8 | head[25]) == ETHERTYPE_ARP)
            return HVF_NET_SLOW;  /* the Python path learns the guest's address */
        /* The header as the kernel takes it: NEEDS_CSUM alone, no num_buffers. */
        uint8_t clean[HEADER_SIZE];
        memcpy(clean, head, HEADER_SIZE);
        clean[0] &= HDR_F_NEEDS_CSUM;
        clean[10] = clean[11] = 0;
        iov[0].iov_base = clean;
        iov[0].iov_len = HEADER_SIZE;
        /* The frame: the chain's buffers past its header. */
        unsigned first = 0;
        size_t skip = HEADER_SIZE;
        while (skip >= c.iov[first].iov_len) {
            skip -= c.iov[first].iov_len;
            first++;
            if (first == c.nreadable)
                break;
        }
        struct iovec *frame = c.iov + first;
        unsigned nframe = c.nreadable - first;
        struct iovec saved = { 0 };
        if (nframe) {
            saved = frame[0];
            frame[0].iov_base = (uint8_t *)frame[0].iov_base + skip;
            frame[0].iov_len -= skip;
        }
        frame[-1] = iov[0];
        ssize_t n = writev(fd, frame - 1, (int)nframe + 1);
        if (nframe)
            frame[0] = saved;
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? HVF_NET_BLOCKED : HVF_NET_SLOW;
        ring->next_avail++;
        push(ring, c.head, 0);
        args->frames++;
        args->bytes += length;
    }
    return HVF_NET_LIMIT;
}

static int is_multicast(const uint8_t *mac) { return mac[0] & 1; }

static int in_table(const uint8_t (*table)[6], uint32_t n, const uint8_t *mac)
{
    for (uint32_t i = 0; i < n && i < HVF_NET_MAX_MACS; i++)
        if (!memcmp(table[i], mac, 6))
            return 1;
    return 0;
}

/* state.RxFilter.accepts(destination, mac). */
static int hvf_net_rx_accepts(struct hvf_net_rx_args *a, const uint8_t *destination)
{
    static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (a->promisc || !memcmp(destination, a->mac, 6))
        return 1;
    if (is_multicast(destination))
        return !memcmp(destination, broadcast, 6) || a->allmulti || a->multicast_overflow
               || in_table((const uint8_t (*)[6])a->multicast, a->nmulticast, destination);
    return a->unicast_overflow
           || in_table((const uint8_t (*)[6])a->unicast, a->nunicast, destination);
}

/* One frame from the descriptor into the iovecs; its whole length, -1 with errno. */
static ssize_t receive(int fd, int is_socket, struct iovec *iov, unsigned n)
{
    if (!is_socket)
        return readv(fd, iov, (int)n);
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = n };
    return recvmsg(fd, &msg, MSG_TRUNC);
}

static int hvf_net_rx(struct hvf_vq_ram *ram, struct hvf_vq_ring *ring, int fd,
                      struct hvf_net_rx_args *args, unsigned limit)
{
    struct iovec iov[MAX_IOV];
    uint16_t heads[MAX_IOV];
    uint64_t lengths[MAX_IOV];
    args->frames = 0;
    args->bytes = 0;
    args->oversize = 0;
    args->filtered = 0;
    for (unsigned done = 0; done < limit; done++) {
        /* Chains from the device's position on, until they hold the largest frame
           (without merging: the first alone); none is taken until a frame fills it. */
        int ahead = available(ring);
        if (ahead < 0)
            return HVF_NET_SLOW;
        unsigned nchains = 0, niov = 0;
        uint64_t room = 0;
        while (room < args->limit) {
            if (nchains == (unsigned)ahead || (nchains && !args->merge))
                return HVF_NET_SLOW;  /* too little posted: the Python path waits */
            struct chain c = { .iov = iov + niov, .max_iov = MAX_IOV - niov };
            uint16_t position = (uint16_t)(ring->next_avail + nchains);
            if (walk(ram, ring, avail_head(ring, position), &c) != WALK_OK ||
                c.writable_length < HEADER_SIZE)
                return HVF_NET_SLOW;
            /* Only the writable buffers receive; the readable ones are skipped. */
            memmove(c.iov, c.iov + c.nreadable, c.nwritable * sizeof *c.iov);
            niov += c.nwritable;
            heads[nchains] = c.head;
            lengths[nchains] = c.writable_length;
            nchains++;
            room += c.writable_length;
        }
        ssize_t n = receive(fd, args->is_socket, iov, niov);
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? HVF_NET_EMPTY : HVF_NET_SLOW;
        uint64_t got = (uint64_t)n;
        if (got > room || got > args->limit) {
            args->oversize++;
            continue;
        }
        uint8_t head[HEADER_SIZE + 6];
        if (got < HEADER_SIZE + ETH_HEADER) {
            args->oversize++;  /* a runt: nothing to deliver */
            continue;
        }
        gather(iov, niov, 0, head, sizeof head);
        __asm__ volatile("" ::: "memory");
        if (!hvf_net_rx_accepts(args, head + HEADER_SIZE)) {
            args->filtered++;
            continue;
        }
        /* The chains the frame fills, and the header's flags and num_buffers. */
        uint64_t left = got;
        unsigned used = 0;
        while (left > 0) {
            uint64_t take = left < lengths[used] ? left : lengths[used];
            lengths[used] = take;
            left -= take;
            used++;
        }
        if (!args->guest_csum)
            head[0] = 0;  /* the kernel's DATA_VALID is for GUEST_CSUM drivers */
        head[NUM_BUFFERS_OFFSET] = (uint8_t)used;
        head[NUM_BUFFERS_OFFSET + 1] = (uint8_t)(used >> 8);
        scatter(iov, niov, 0, head, HEADER_SIZE);
        for (unsigned i = 0, rest = (unsigned)got; i < niov && rest; i++) {
            size_t count = iov[i].iov_len < rest ? iov[i].iov_len : rest;
            note_written(ram, iov[i].iov_base, count);
            rest -= (unsigned)count;
        }
        for (unsigned i = 0; i < used; i++) {
            ring->next_avail++;
            push(ring, heads[i], (uint32_t)lengths[i]);
        }
        args->frames++;
        args->bytes += got - HEADER_SIZE;
    }
    return HVF_NET_LIMIT;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvf.plugins.net._netpath", SOURCE,
                      include_dirs=[_VRING["vring_include"]()], extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
