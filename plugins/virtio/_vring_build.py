# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf.plugins.virtio._vring``: a queue's output written to a
host descriptor in C, and the shared ring walker's declarations.

:c:func:`hvf_vq_tx` takes the transmit chains the driver made available, writes their
device-readable bytes to a descriptor with one ``writev`` per batch and returns each
chain the host took whole through the used ring (:mod:`hvf.plugins.virtio.cring`
drives it for virtio-console; cffi releases the GIL around it). It stops before a chain
that :file:`vring.h`'s walker refuses (HVF_VQ_SLOW: the Python path takes it and
reports the error) and where the descriptor took only part of a batch (HVF_VQ_BLOCKED,
with how much of the next chain it took: the Python path queues the rest).

Other build scripts (virtio-net's) load this file by path for :func:`vring_include`
and :func:`vring_cdef`: a build script is run as a file, not imported.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "vring.h"


def vring_include() -> str:
    """The directory to add to a build's ``include_dirs`` for ``#include "vring.h"``."""
    return str(HERE)


def vring_cdef() -> str:
    """The records of :file:`vring.h` (guest RAM and one ring) as cffi declarations."""
    text = HEADER.read_text()
    return text[text.index("/* records: begin */"): text.index("/* records: end */")]


CDEF = vring_cdef() + """
#define HVF_VQ_EMPTY ...
#define HVF_VQ_LIMIT ...
#define HVF_VQ_SLOW ...
#define HVF_VQ_BLOCKED ...
#define HVF_VQ_ERROR ...

struct hvf_vq_tx_args {
    uint64_t batch_bytes;      /* a writev takes chains up to this many bytes (one at least) */
    uint32_t chains;           /* out: chains returned */
    uint64_t bytes;            /* out: bytes the host took, `offset` included */
    uint64_t offset;           /* out, BLOCKED: how many bytes of the next chain it took */
    int error;                 /* out, ERROR: the writev's errno */
};

int hvf_vq_tx(struct hvf_vq_ram *ram, struct hvf_vq_ring *ring, int fd,
              struct hvf_vq_tx_args *args, unsigned limit);
"""

SOURCE = r"""
#include <errno.h>
#include "vring.h"

#define HVF_VQ_EMPTY 0     /* no chain is available */
#define HVF_VQ_LIMIT 1     /* `limit` chains done, more may wait */
#define HVF_VQ_SLOW 2      /* the next chain is the Python path's */
#define HVF_VQ_BLOCKED 3   /* the descriptor took part of a batch, or nothing */
#define HVF_VQ_ERROR 4     /* the writev failed: nothing of its batch was taken */

struct hvf_vq_tx_args {
    uint64_t batch_bytes;
    uint32_t chains;
    uint64_t bytes;
    uint64_t offset;
    int error;
};

static int hvf_vq_tx(struct hvf_vq_ram *ram, struct hvf_vq_ring *ring, int fd,
                     struct hvf_vq_tx_args *args, unsigned limit)
{
    struct iovec iov[MAX_IOV];
    uint16_t heads[MAX_IOV];
    uint64_t lengths[MAX_IOV];
    args->chains = 0;
    args->bytes = 0;
    args->offset = 0;
    args->error = 0;
    while (args->chains < limit) {
        int ahead = available(ring);
        if (ahead < 0)
            return HVF_VQ_SLOW;
        if (ahead == 0)
            return HVF_VQ_EMPTY;
        /* A batch: chains from the device's position on, their readable buffers. */
        unsigned nchains = 0, niov = 0;
        uint64_t total = 0;
        int slow = 0;
        while (nchains < (unsigned)ahead && nchains < MAX_IOV &&
               args->chains + nchains < limit) {
            struct chain c = { .iov = iov + niov, .max_iov = MAX_IOV - niov };
            uint16_t position = (uint16_t)(ring->next_avail + nchains);
            enum walk w = walk(ram, ring, avail_head(ring, position), &c);
            if (w == WALK_FULL && nchains)
                break;  /* it starts the next batch */
            if (w != WALK_OK) {
                slow = 1;
                break;
            }
            if (nchains && total + c.readable_length > args->batch_bytes)
                break;
            heads[nchains] = c.head;
            lengths[nchains] = c.readable_length;
            niov += c.nreadable;  /* the writable buffers, if any, are left out */
            total += c.readable_length;
            nchains++;
        }
        if (!nchains)
            return HVF_VQ_SLOW;
        uint64_t took = 0;
        if (total) {
            ssize_t n = writev(fd, iov, (int)niov);
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                args->error = errno;
                return HVF_VQ_ERROR;
            }
            took = n < 0 ? 0 : (uint64_t)n;
        }
        /* Return the chains the host took whole; a part-taken one is left. */
        uint64_t consumed = 0;
        unsigned i = 0;
        for (; i < nchains && consumed + lengths[i] <= took; i++) {
            consumed += lengths[i];
            ring->next_avail++;
            push(ring, heads[i], 0);
        }
        args->chains += i;
        args->bytes += took;
        if (i < nchains) {
            args->offset = took - consumed;
            return HVF_VQ_BLOCKED;
        }
        if (slow)
            return HVF_VQ_SLOW;
    }
    return HVF_VQ_LIMIT;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvf.plugins.virtio._vring", SOURCE, include_dirs=[vring_include()],
                      extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
