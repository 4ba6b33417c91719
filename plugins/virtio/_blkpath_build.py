# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf.plugins.virtio._blkpath``: virtio-blk's reads and
writes served in C, from the available ring to the interrupt.

:c:func:`hvf_blk_serve` (the I/O thread, the GIL released by cffi) takes every
available chain that is a plain READ or WRITE the disk can do as it stands: a 16-byte
header in the first descriptor, a length in whole sectors inside the disk, a status
byte, and under direct I/O buffers, offset and length aligned as the image needs. It
hands each to a pool of POSIX threads that never touch Python: ``preadv``/``pwritev``
straight between the image and guest RAM, then the status byte, the used element and,
unless the driver suppressed it, an ``eventfd`` write (the queue's MSI-X irqfd). It
stops before the first chain that needs anything else (HVF_BLK_SLOW: a chain the walker
refuses, a flush, discard or ID request, a request to refuse): the Python path takes
that one, so the rules, errors and messages keep one home, and returns it through
:c:func:`hvf_blk_push`, so that one owner writes each queue's used ring.

Each queue's used side (next_used, the last index signalled) lives here while the
path serves it; :c:func:`hvf_blk_set_queue` starts a queue from its saved positions and
a generation number drops completions of requests taken before a reset.
"""

from __future__ import annotations

import pathlib
import runpy

from cffi import FFI

#: virtio's build script, for the shared ring walker (vring.h) and its records.
_VRING = runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "_vring_build.py"))

CDEF = _VRING["vring_cdef"]() + """
#define HVF_BLK_EMPTY ...
#define HVF_BLK_SLOW ...
#define HVF_BLK_MAX_QUEUES ...

struct hvf_blk;

struct hvf_blk_stats {
    uint64_t reads, writes, bytes_read, bytes_written, io_errors;
    uint64_t interrupts, in_flight;
};

struct hvf_blk *hvf_blk_new(const struct hvf_vq_ram *ram, int fd, uint64_t sectors,
                            int readonly, uint32_t dio_memory, uint32_t dio_offset,
                            unsigned threads);
void hvf_blk_free(struct hvf_blk *blk);
void hvf_blk_set_queue(struct hvf_blk *blk, unsigned index, const struct hvf_vq_ring *ring,
                       int event_idx);
void hvf_blk_clear_queues(struct hvf_blk *blk);
void hvf_blk_set_written(struct hvf_blk *blk, uint8_t *written, size_t pages);
int hvf_blk_serve(struct hvf_blk *blk, unsigned index, int irqfd, uint16_t *next_avail);
void hvf_blk_push(struct hvf_blk *blk, unsigned index, uint16_t head, uint32_t written);
void hvf_blk_set_irqfd(struct hvf_blk *blk, unsigned index, int irqfd);
uint16_t hvf_blk_next_used(struct hvf_blk *blk, unsigned index);
void hvf_blk_drain(struct hvf_blk *blk);
void hvf_blk_stats(struct hvf_blk *blk, struct hvf_blk_stats *out);
"""

SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include "vring.h"

#define HVF_BLK_EMPTY 0
#define HVF_BLK_SLOW 1
#define HVF_BLK_MAX_QUEUES 16
#define SECTOR 512
#define HEADER 16
#define T_IN 0
#define T_OUT 1
#define S_OK 0
#define S_IOERR 1
#define AVAIL_F_NO_INTERRUPT 1
#define DEFER_NS 200000      /* the longest a returned chain waits for its interrupt */

struct hvf_blk_stats {
    uint64_t reads, writes, bytes_read, bytes_written, io_errors;
    uint64_t interrupts, in_flight;
};

struct queue {
    struct hvf_vq_ring ring;
    int event_idx;
    int active;
    int irqfd;
    uint16_t signalled;
    unsigned generation;
    unsigned in_flight;      /* requests of this generation C took and has not returned */
    unsigned unsignalled;    /* chains returned since the last interrupt */
    uint64_t deadline;       /* while unsignalled: when the timer signals (ns) */
};

struct job {
    struct job *next;
    unsigned queue, generation;
    uint16_t head;
    int write;
    uint64_t offset, length;
    uint8_t *status;
    int iovcnt;
    struct iovec iov[];
};

struct hvf_blk {
    pthread_mutex_t lock;
    pthread_cond_t work, idle, timer;
    struct hvf_vq_ram ram;            /* a copy; its written-page marks set under lock */
    int fd, readonly;
    uint64_t sectors;
    uint32_t dio_memory, dio_offset;  /* 0: buffered I/O */
    struct queue queues[HVF_BLK_MAX_QUEUES];
    struct job *head, *tail;
    int stop;
    unsigned signalling;             /* the timer's interrupts taken, not yet signalled */
    unsigned nthreads;
    pthread_t *threads;
    pthread_t timer_thread;
    int timer_started;
    struct hvf_blk_stats stats;
    struct iovec scratch[32768];      /* serve()'s chain, one at a time (the I/O thread) */
};

void hvf_blk_free(struct hvf_blk *blk);

/* 16-bit free-running indices: does moving from old to new pass event? */
static int need_event(uint16_t event, uint16_t new, uint16_t old)
{
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd >= 0)
        (void)!write(fd, &one, sizeof one);
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The interrupt for what the queue returned since the last one (lock held): the irqfd
   to signal, or -1 where the driver suppressed it or the queue has none. */
static int notify(struct hvf_blk *blk, struct queue *q)
{
    q->unsignalled = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* our used index before the driver's field */
    uint16_t new = q->ring.next_used, old = q->signalled;
    q->signalled = new;
    int wanted;
    if (q->event_idx)
        wanted = need_event(load16(q->ring.avail + 4 + 2 * q->ring.size), new, old);
    else
        wanted = !(load16(q->ring.avail) & AVAIL_F_NO_INTERRUPT);
    if (!wanted || q->irqfd < 0)
        return -1;
    blk->stats.interrupts++;
    return q->irqfd;
}

/*
 * Return a chain (lock held); the irqfd to signal, or -1. With `batch` the interrupt
 * waits while more of the queue's requests are in flight than came back unsignalled,
 * and at most DEFER_NS (the timer thread then signals): a driver that reaps every used
 * chain per interrupt takes one per half of its queue depth rather than one per chain.
 * The last request in flight always signals at once.
 */
static int complete(struct hvf_blk *blk, struct queue *q, uint16_t head, uint32_t written,
                    int batch)
{
    push(&q->ring, head, written);
    if (batch && ++q->unsignalled < q->in_flight) {
        if (q->unsignalled == 1) {
            q->deadline = now_ns() + DEFER_NS;
            pthread_cond_signal(&blk->timer);
        }
        return -1;
    }
    return notify(blk, q);
}

/* Signal the queues whose returned chains waited DEFER_NS. */
static void *timer(void *arg)
{
    struct hvf_blk *blk = arg;
    pthread_mutex_lock(&blk->lock);
    while (!blk->stop) {
        uint64_t next = 0, now = now_ns();
        for (unsigned i = 0; i < HVF_BLK_MAX_QUEUES; i++) {
            struct queue *q = &blk->queues[i];
            if (!q->active || !q->unsignalled)
                continue;
            if (q->deadline <= now) {
                int fd = notify(blk, q);
                blk->signalling++;
                pthread_mutex_unlock(&blk->lock);
                signal_fd(fd);
                pthread_mutex_lock(&blk->lock);
                if (--blk->signalling == 0 && !blk->stats.in_flight)
                    pthread_cond_broadcast(&blk->idle);
                now = now_ns();
            } else if (!next || q->deadline < next) {
                next = q->deadline;
            }
        }
        if (blk->stop)
            break;
        if (!next) {
            pthread_cond_wait(&blk->timer, &blk->lock);
        } else {
            struct timespec t = { .tv_sec = next / 1000000000u, .tv_nsec = next % 1000000000u };
            pthread_cond_timedwait(&blk->timer, &blk->lock, &t);
        }
    }
    pthread_mutex_unlock(&blk->lock);
    return NULL;
}

static int transfer(struct hvf_blk *blk, struct job *job)
{
    struct iovec *iov = job->iov;
    int count = job->iovcnt;
    uint64_t done = 0;
    while (done < job->length) {
        ssize_t n = job->write ? pwritev(blk->fd, iov, count, job->offset + done)
                               : preadv(blk->fd, iov, count, job->offset + done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? errno : EIO;
        done += n;
        while (count && (size_t)n >= iov->iov_len) {
            n -= iov->iov_len;
            iov++;
            count--;
        }
        if (count) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= n;
        }
    }
    return 0;
}

static void *worker(void *arg)
{
    struct hvf_blk *blk = arg;
    pthread_mutex_lock(&blk->lock);
    for (;;) {
        while (!blk->head && !blk->stop)
            pthread_cond_wait(&blk->work, &blk->lock);
        struct job *job = blk->head;
        if (!job)
            break;
        blk->head = job->next;
        if (!blk->head)
            blk->tail = NULL;
        if (!job->write) {   /* a read's buffers count as written from now on */
            for (int i = 0; i < job->iovcnt; i++)
                note_written(&blk->ram, job->iov[i].iov_base, job->iov[i].iov_len);
        }
        pthread_mutex_unlock(&blk->lock);

        int error = transfer(blk, job);   /* moves job->iov along */
        *job->status = error ? S_IOERR : S_OK;

        pthread_mutex_lock(&blk->lock);
        struct queue *q = &blk->queues[job->queue];
        int fd = -1;
        if (error) {
            blk->stats.io_errors++;
        } else if (job->write) {
            blk->stats.writes++;
            blk->stats.bytes_written += job->length;
        } else {
            blk->stats.reads++;
            blk->stats.bytes_read += job->length;
        }
        note_written(&blk->ram, job->status, 1);
        if (q->active && q->generation == job->generation) {
            q->in_flight--;
            fd = complete(blk, q, job->head,
                          error ? 1 : (uint32_t)(job->write ? 1 : job->length + 1), 1);
        }
        pthread_mutex_unlock(&blk->lock);
        signal_fd(fd);
        free(job);
        pthread_mutex_lock(&blk->lock);
        /* Done only once its interrupt is signalled: a drain then sees that too. */
        if (--blk->stats.in_flight == 0 && !blk->signalling)
            pthread_cond_broadcast(&blk->idle);
    }
    pthread_mutex_unlock(&blk->lock);
    return NULL;
}

struct hvf_blk *hvf_blk_new(const struct hvf_vq_ram *ram, int fd, uint64_t sectors,
                            int readonly, uint32_t dio_memory, uint32_t dio_offset,
                            unsigned threads)
{
    struct hvf_blk *blk = calloc(1, sizeof *blk);
    if (!blk)
        return NULL;
    pthread_mutex_init(&blk->lock, NULL);
    pthread_cond_init(&blk->work, NULL);
    pthread_cond_init(&blk->idle, NULL);
    pthread_condattr_t clock;
    pthread_condattr_init(&clock);
    pthread_condattr_setclock(&clock, CLOCK_MONOTONIC);
    pthread_cond_init(&blk->timer, &clock);
    pthread_condattr_destroy(&clock);
    blk->ram = *ram;
    blk->fd = fd;
    blk->sectors = sectors;
    blk->readonly = readonly;
    blk->dio_memory = dio_memory;
    blk->dio_offset = dio_offset;
    blk->threads = calloc(threads, sizeof *blk->threads);
    if (!blk->threads) {
        free(blk);
        return NULL;
    }
    for (; blk->nthreads < threads; blk->nthreads++) {
        if (pthread_create(&blk->threads[blk->nthreads], NULL, worker, blk))
            break;
    }
    if (blk->nthreads)
        blk->timer_started = !pthread_create(&blk->timer_thread, NULL, timer, blk);
    if (!blk->timer_started) {
        hvf_blk_free(blk);
        errno = EAGAIN;
        return NULL;
    }
    return blk;
}

void hvf_blk_drain(struct hvf_blk *blk)
{
    pthread_mutex_lock(&blk->lock);
    while (blk->stats.in_flight || blk->signalling)
        pthread_cond_wait(&blk->idle, &blk->lock);
    pthread_mutex_unlock(&blk->lock);
}

void hvf_blk_free(struct hvf_blk *blk)
{
    hvf_blk_drain(blk);
    pthread_mutex_lock(&blk->lock);
    blk->stop = 1;
    pthread_cond_broadcast(&blk->work);
    pthread_cond_broadcast(&blk->timer);
    pthread_mutex_unlock(&blk->lock);
    for (unsigned i = 0; i < blk->nthreads; i++)
        pthread_join(blk->threads[i], NULL);
    if (blk->timer_started)
        pthread_join(blk->timer_thread, NULL);
    pthread_cond_destroy(&blk->work);
    pthread_cond_destroy(&blk->idle);
    pthread_cond_destroy(&blk->timer);
    pthread_mutex_destroy(&blk->lock);
    free(blk->threads);
    free(blk);
}

void hvf_blk_set_queue(struct hvf_blk *blk, unsigned index, const struct hvf_vq_ring *ring,
                       int event_idx)
{
    if (index >= HVF_BLK_MAX_QUEUES)
        return;
    pthread_mutex_lock(&blk->lock);
    struct queue *q = &blk->queues[index];
    q->ring = *ring;
    q->event_idx = event_idx;
    q->signalled = ring->next_used;
    q->irqfd = -1;
    q->active = 1;
    q->generation++;
    q->in_flight = q->unsignalled = 0;
    pthread_mutex_unlock(&blk->lock);
}

void hvf_blk_clear_queues(struct hvf_blk *blk)
{
    pthread_mutex_lock(&blk->lock);
    for (unsigned i = 0; i < HVF_BLK_MAX_QUEUES; i++)
        blk->queues[i].active = 0;
    pthread_mutex_unlock(&blk->lock);
}

void hvf_blk_set_written(struct hvf_blk *blk, uint8_t *written, size_t pages)
{
    pthread_mutex_lock(&blk->lock);
    blk->ram.written = written;
    blk->ram.written_pages = written ? pages : 0;
    pthread_mutex_unlock(&blk->lock);
}

uint16_t hvf_blk_next_used(struct hvf_blk *blk, unsigned index)
{
    pthread_mutex_lock(&blk->lock);
    uint16_t next = index < HVF_BLK_MAX_QUEUES ? blk->queues[index].ring.next_used : 0;
    pthread_mutex_unlock(&blk->lock);
    return next;
}

void hvf_blk_push(struct hvf_blk *blk, unsigned index, uint16_t head, uint32_t written)
{
    int fd = -1;
    if (index >= HVF_BLK_MAX_QUEUES)
        return;
    pthread_mutex_lock(&blk->lock);
    struct queue *q = &blk->queues[index];
    if (q->active && head < q->ring.size)
        fd = complete(blk, q, head, written, 0);
    pthread_mutex_unlock(&blk->lock);
    signal_fd(fd);
}

void hvf_blk_set_irqfd(struct hvf_blk *blk, unsigned index, int irqfd)
{
    if (index >= HVF_BLK_MAX_QUEUES)
        return;
    pthread_mutex_lock(&blk->lock);
    blk->queues[index].irqfd = irqfd;
    pthread_mutex_unlock(&blk->lock);
}

void hvf_blk_stats(struct hvf_blk *blk, struct hvf_blk_stats *out)
{
    pthread_mutex_lock(&blk->lock);
    *out = blk->stats;
    pthread_mutex_unlock(&blk->lock);
}

/* The data iovecs of chain c for this request, into job->iov; 0 if the C path cannot
   do it as it stands (the Python path then takes it). */
static int build(const struct hvf_blk *blk, const struct chain *c, int write,
                 uint8_t **status, struct iovec *out, uint64_t *length)
{
    const struct iovec *iov = c->iov;
    unsigned nr = c->nreadable, nw = c->nwritable, n = 0;
    if (!nw || !iov[nr + nw - 1].iov_len)
        return -1;
    const struct iovec *last = &iov[nr + nw - 1];
    *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    uint64_t total = 0;
    if (write) {
        if (iov[0].iov_len > HEADER) {
            out[n].iov_base = (uint8_t *)iov[0].iov_base + HEADER;
            out[n++].iov_len = iov[0].iov_len - HEADER;
        }
        for (unsigned i = 1; i < nr; i++)
            out[n++] = iov[i];
    } else {
        for (unsigned i = nr; i < nr + nw; i++) {
            out[n] = iov[i];
            if (i == nr + nw - 1 && !--out[n].iov_len)
                break;   /* the status byte alone */
            n++;
        }
    }
    for (unsigned i = 0; i < n; i++) {
        total += out[i].iov_len;
        if (blk->dio_memory && ((uintptr_t)out[i].iov_base % blk->dio_memory ||
                                out[i].iov_len % blk->dio_offset || !out[i].iov_len))
            return -1;
    }
    if (n > MAX_IOV)
        return -1;
    *length = total;
    return (int)n;
}

int hvf_blk_serve(struct hvf_blk *blk, unsigned index, int irqfd, uint16_t *next_avail)
{
    if (index >= HVF_BLK_MAX_QUEUES)
        return HVF_BLK_SLOW;
    pthread_mutex_lock(&blk->lock);
    struct queue *q = &blk->queues[index];
    q->irqfd = irqfd;
    q->ring.next_avail = *next_avail;
    struct hvf_vq_ring ring = q->ring;   /* the avail side is the caller's: a copy */
    unsigned generation = q->generation;
    int active = q->active;
    pthread_mutex_unlock(&blk->lock);
    if (!active)
        return HVF_BLK_SLOW;

    struct chain c = { .iov = blk->scratch, .max_iov = ring.size };
    int status = HVF_BLK_EMPTY;
    for (;;) {
        /* A driver has at most a queue's worth in flight; one that hands chains back
           before their completion (hostile) waits here rather than growing our jobs. */
        if (__atomic_load_n(&q->in_flight, __ATOMIC_RELAXED) >= ring.size)
            break;
        int ahead = available(&ring);
        if (ahead <= 0) {
            status = ahead < 0 ? HVF_BLK_SLOW : HVF_BLK_EMPTY;
            break;
        }
        uint16_t head = avail_head(&ring, ring.next_avail);
        if (walk(&blk->ram, &ring, head, &c) != WALK_OK || !c.nreadable ||
            c.iov[0].iov_len < HEADER) {
            status = HVF_BLK_SLOW;
            break;
        }
        uint8_t header[HEADER];
        memcpy(header, c.iov[0].iov_base, HEADER);
        __asm__ volatile("" ::: "memory");
        uint32_t type;
        uint64_t sector;
        memcpy(&type, header, 4);
        memcpy(&sector, header + 8, 8);
        if (type != T_IN && type != T_OUT) {
            status = HVF_BLK_SLOW;
            break;
        }
        int write = type == T_OUT;
        struct job *job = malloc(sizeof *job + c.nreadable * sizeof(struct iovec)
                                 + c.nwritable * sizeof(struct iovec));
        if (!job) {
            status = HVF_BLK_SLOW;
            break;
        }
        uint64_t length;
        int n = build(blk, &c, write, &job->status, job->iov, &length);
        if (n < 0 || length % SECTOR || sector > blk->sectors ||
            length / SECTOR > blk->sectors - sector || (write && blk->readonly) ||
            (blk->dio_memory && (sector * SECTOR) % blk->dio_offset)) {
            free(job);
            status = HVF_BLK_SLOW;
            break;
        }
        job->iovcnt = n;
        job->queue = index;
        job->generation = generation;
        job->head = head;
        job->write = write;
        job->offset = sector * SECTOR;
        job->length = length;
        job->next = NULL;
        ring.next_avail++;
        pthread_mutex_lock(&blk->lock);
        blk->stats.in_flight++;
        if (q->generation == generation)
            q->in_flight++;
        if (blk->tail)
            blk->tail->next = job;
        else
            blk->head = job;
        blk->tail = job;
        pthread_cond_signal(&blk->work);
        pthread_mutex_unlock(&blk->lock);
    }
    *next_avail = ring.next_avail;
    return status;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvf.plugins.virtio._blkpath", SOURCE,
                      include_dirs=[_VRING["vring_include"]()], extra_compile_args=["-O2"],
                      extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
