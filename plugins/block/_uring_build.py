# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf.plugins.block._uring``: an io_uring for the block back end
(:mod:`hvf.plugins.block.uring`), by raw system calls (no liburing).

:c:func:`hvf_uring_open` sets a ring up and maps its submission and completion rings;
:c:func:`hvf_uring_rw`, :c:func:`hvf_uring_fsync` and :c:func:`hvf_uring_nop` each
queue one request and submit it at once (``io_uring_enter``), from any thread (a mutex
guards the submission ring); :c:func:`hvf_uring_reap` waits for at least one completion
and copies out up to ``max`` (tag, result) pairs, for the one thread that reaps. cffi
releases the GIL around every call. The ring heads and tails are read and written with
acquire/release atomics, as the io_uring ABI asks of an application.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
struct hvf_uring;
struct iovec { void *iov_base; size_t iov_len; };

struct hvf_uring *hvf_uring_open(unsigned entries, int *error);
unsigned hvf_uring_entries(struct hvf_uring *ring);
int hvf_uring_rw(struct hvf_uring *ring, int write, int fd, const struct iovec *iov,
                 unsigned count, uint64_t offset, uint64_t tag);
int hvf_uring_fsync(struct hvf_uring *ring, int fd, uint64_t tag);
int hvf_uring_nop(struct hvf_uring *ring, uint64_t tag);
int hvf_uring_reap(struct hvf_uring *ring, uint64_t *tags, int32_t *results, unsigned max);
void hvf_uring_close(struct hvf_uring *ring);
"""

SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/io_uring.h>

struct hvf_uring {
    int fd;
    unsigned sq_entries, sq_mask, cq_mask;
    unsigned *sq_head, *sq_tail, *cq_head, *cq_tail;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_len, cq_len, sqes_len;
    pthread_mutex_t lock;        /* the submitters' hold on the submission ring */
};

static void unmap(struct hvf_uring *r)
{
    if (r->sqes)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_len);
    if (r->sq_map)
        munmap(r->sq_map, r->sq_len);
}

static void *map(int fd, size_t len, off_t what)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, what);
    return p == MAP_FAILED ? NULL : p;
}

/* A ring of at least `entries` submissions (a power of two); NULL and *error = errno
   where the host refuses (ENOSYS, EPERM: io_uring disabled or filtered). */
static struct hvf_uring *hvf_uring_open(unsigned entries, int *error)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CLAMP;
    int fd = syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0) {
        *error = errno;
        return NULL;
    }
    struct hvf_uring *r = calloc(1, sizeof *r);
    if (!r) {
        close(fd);
        *error = ENOMEM;
        return NULL;
    }
    r->fd = fd;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len)
            r->sq_len = r->cq_len;
        r->sq_map = r->cq_map = map(fd, r->sq_len, IORING_OFF_SQ_RING);
    } else {
        r->sq_map = map(fd, r->sq_len, IORING_OFF_SQ_RING);
        r->cq_map = r->sq_map ? map(fd, r->cq_len, IORING_OFF_CQ_RING) : NULL;
    }
    r->sqes = r->cq_map ? map(fd, r->sqes_len, IORING_OFF_SQES) : NULL;
    if (!r->sqes) {
        *error = errno;
        unmap(r);
        close(fd);
        free(r);
        return NULL;
    }
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_entries = p.sq_entries;
    r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    unsigned *array = (unsigned *)(sq + p.sq_off.array);
    for (unsigned i = 0; i < p.sq_entries; i++)
        array[i] = i;
    r->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    pthread_mutex_init(&r->lock, NULL);
    return r;
}

static unsigned hvf_uring_entries(struct hvf_uring *r)
{
    return r->sq_entries;
}

static int enter(struct hvf_uring *r, unsigned submit, unsigned wait, unsigned flags)
{
    for (;;) {
        int ret = syscall(__NR_io_uring_enter, r->fd, submit, wait, flags, NULL, 0);
        if (ret >= 0)
            return ret;
        if (errno != EINTR && errno != EAGAIN && errno != EBUSY)
            return -errno;
        if (errno != EINTR)
            sched_yield();  /* the kernel is short of memory or the reaper is behind */
    }
}

/* Queue one request (filled by `fill`), then submit every queued one; -EBUSY when the
   submission ring is full (nothing queued). */
#define QUEUE(r, sqe, fill) do {                                                  \
    pthread_mutex_lock(&(r)->lock);                                              \
    unsigned tail = *(r)->sq_tail;                                               \
    if (tail - __atomic_load_n((r)->sq_head, __ATOMIC_ACQUIRE) >= (r)->sq_entries) { \
        pthread_mutex_unlock(&(r)->lock);                                        \
        return -EBUSY;                                                           \
    }                                                                            \
    struct io_uring_sqe *sqe = &(r)->sqes[tail & (r)->sq_mask];                  \
    memset(sqe, 0, sizeof *sqe);                                                 \
    fill;                                                                        \
    __atomic_store_n((r)->sq_tail, tail + 1, __ATOMIC_RELEASE);                  \
    pthread_mutex_unlock(&(r)->lock);                                            \
    int ret = enter((r), (r)->sq_entries, 0, 0);                                 \
    return ret < 0 ? ret : 0;                                                    \
} while (0)

static int hvf_uring_rw(struct hvf_uring *r, int write, int fd, const struct iovec *iov,
                        unsigned count, uint64_t offset, uint64_t tag)
{
    QUEUE(r, sqe, {
        sqe->opcode = write ? IORING_OP_WRITEV : IORING_OP_READV;
        sqe->fd = fd;
        sqe->addr = (uintptr_t)iov;
        sqe->len = count;
        sqe->off = offset;
        sqe->user_data = tag;
    });
}

static int hvf_uring_fsync(struct hvf_uring *r, int fd, uint64_t tag)
{
    QUEUE(r, sqe, {
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fd = fd;
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
        sqe->user_data = tag;
    });
}

static int hvf_uring_nop(struct hvf_uring *r, uint64_t tag)
{
    QUEUE(r, sqe, {
        sqe->opcode = IORING_OP_NOP;
        sqe->user_data = tag;
    });
}

/* Wait for at least one completion; copy out up to `max` of them. The one reaper only. */
static int hvf_uring_reap(struct hvf_uring *r, uint64_t *tags, int32_t *results,
                          unsigned max)
{
    for (;;) {
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        if (head != tail) {
            unsigned n = 0;
            for (; head != tail && n < max; head++, n++) {
                struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
                tags[n] = cqe->user_data;
                results[n] = cqe->res;
            }
            __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
            return (int)n;
        }
        int ret = enter(r, 0, 1, IORING_ENTER_GETEVENTS);
        if (ret < 0)
            return ret;
    }
}

static void hvf_uring_close(struct hvf_uring *r)
{
    unmap(r);
    close(r->fd);
    pthread_mutex_destroy(&r->lock);
    free(r);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvf.plugins.block._uring", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
