# SPDX-License-Identifier: BSD-2-Clause
"""cffi build script for ``hvf.plugins.net._slirp``: libslirp's glue, in C.

libslirp (the user-mode TCP/IP stack QEMU and bhyve use) is driven from one thread:
:c:func:`hvf_slirp_poll` is one round of that thread's loop. It polls the sockets
libslirp asks for, the stack's end of the frame socket pair and a wake-up eventfd,
lets libslirp act on what is ready, fires due timers, and feeds the frames that the
device wrote to its end of the pair to ``slirp_input``. Frames libslirp sends to the
guest go back through the pair (``send_packet``). Everything stays in C, so a round
costs Python one call, and cffi releases the GIL around it.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
struct hvf_slirp {
    uint64_t to_guest;          /* frames queued for the guest */
    uint64_t to_guest_dropped;  /* frames for the guest the socket pair had no room for */
    uint64_t from_guest;        /* guest frames handed to slirp_input */
    uint64_t from_guest_dropped;/* guest frames longer than HVF_SLIRP_FRAME_MAX */
    uint64_t guest_errors;      /* libslirp's guest_error reports */
    char last_guest_error[128];
    ...;
};

#define HVF_SLIRP_FRAME_MAX ...

struct hvf_slirp *hvf_slirp_new(int frames_fd, int wake_fd, int restricted,
                                uint32_t network, uint32_t netmask, uint32_t host,
                                uint32_t dhcp_start, uint32_t nameserver, size_t mtu);
int hvf_slirp_add_hostfwd(struct hvf_slirp *s, int is_udp, uint32_t host_addr,
                          int host_port, uint32_t guest_addr, int guest_port);
int hvf_slirp_poll(struct hvf_slirp *s);
void hvf_slirp_free(struct hvf_slirp *s);
"""

SOURCE = r"""
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <slirp/libslirp.h>

/* The longest guest frame taken from the socket pair (the rest are counted, dropped). */
#define HVF_SLIRP_FRAME_MAX 65536
/* Guest frames fed to libslirp per round, so that its sockets are served in between. */
#define HVF_SLIRP_BATCH 64
/* libslirp 4.7 makes one timer (IPv6 router advertisements); room for more. */
#define HVF_SLIRP_TIMERS 8

struct hvf_slirp_timer {
    int used;
    SlirpTimerId id;
    void *cb_opaque;
    int64_t expire_ms;          /* -1: not armed */
};

struct hvf_slirp {
    uint64_t to_guest;
    uint64_t to_guest_dropped;
    uint64_t from_guest;
    uint64_t from_guest_dropped;
    uint64_t guest_errors;
    char last_guest_error[128];
    Slirp *slirp;
    int frames_fd;
    int wake_fd;
    struct pollfd *pollfds;
    size_t npollfds;
    size_t pollfds_room;
    struct hvf_slirp_timer timers[HVF_SLIRP_TIMERS];
    unsigned char frame[HVF_SLIRP_FRAME_MAX];
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t cb_clock_get_ns(void *opaque)
{
    (void)opaque;
    return now_ns();
}

/*
 * A frame for the guest: one datagram on the pair. A full pair (the guest is not taking
 * frames) drops it, counted; TCP retransmits. The length is reported as sent either way,
 * since libslirp only logs a failure.
 */
static ssize_t cb_send_packet(const void *buf, size_t len, void *opaque)
{
    struct hvf_slirp *s = opaque;
    if (send(s->frames_fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        s->to_guest_dropped++;
    else
        s->to_guest++;
    return (ssize_t)len;
}

static void cb_guest_error(const char *msg, void *opaque)
{
    struct hvf_slirp *s = opaque;
    s->guest_errors++;
    strncpy(s->last_guest_error, msg, sizeof(s->last_guest_error) - 1);
}

static void *cb_timer_new_opaque(SlirpTimerId id, void *cb_opaque, void *opaque)
{
    struct hvf_slirp *s = opaque;
    for (int i = 0; i < HVF_SLIRP_TIMERS; i++) {
        struct hvf_slirp_timer *t = &s->timers[i];
        if (!t->used) {
            t->used = 1;
            t->id = id;
            t->cb_opaque = cb_opaque;
            t->expire_ms = -1;
            return t;
        }
    }
    return NULL;
}

static void cb_timer_free(void *timer, void *opaque)
{
    (void)opaque;
    if (timer)
        ((struct hvf_slirp_timer *)timer)->used = 0;
}

static void cb_timer_mod(void *timer, int64_t expire_ms, void *opaque)
{
    (void)opaque;
    if (timer)
        ((struct hvf_slirp_timer *)timer)->expire_ms = expire_ms;
}

/* The loop is libslirp's own thread: nothing to register or to kick. */
static void cb_poll_fd(int fd, void *opaque)
{
    (void)fd;
    (void)opaque;
}

static void cb_notify(void *opaque)
{
    (void)opaque;
}

static const SlirpCb callbacks = {
    .send_packet = cb_send_packet,
    .guest_error = cb_guest_error,
    .clock_get_ns = cb_clock_get_ns,
    .timer_free = cb_timer_free,
    .timer_mod = cb_timer_mod,
    .register_poll_fd = cb_poll_fd,
    .unregister_poll_fd = cb_poll_fd,
    .notify = cb_notify,
    .timer_new_opaque = cb_timer_new_opaque,
};

static struct hvf_slirp *hvf_slirp_new(int frames_fd, int wake_fd, int restricted,
                                       uint32_t network, uint32_t netmask, uint32_t host,
                                       uint32_t dhcp_start, uint32_t nameserver,
                                       size_t mtu)
{
    struct hvf_slirp *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->frames_fd = frames_fd;
    s->wake_fd = wake_fd;
    SlirpConfig cfg = {
        .version = 4,
        .restricted = restricted,
        .in_enabled = true,
        .vnetwork.s_addr = htonl(network),
        .vnetmask.s_addr = htonl(netmask),
        .vhost.s_addr = htonl(host),
        .vdhcp_start.s_addr = htonl(dhcp_start),
        .vnameserver.s_addr = htonl(nameserver),
        .if_mtu = mtu,
        .if_mru = mtu,
    };
    s->slirp = slirp_new(&cfg, &callbacks, s);
    if (!s->slirp) {
        free(s);
        return NULL;
    }
    return s;
}

/* 0, or -1 with errno set (the host socket could not be bound, say). */
static int hvf_slirp_add_hostfwd(struct hvf_slirp *s, int is_udp, uint32_t host_addr,
                                 int host_port, uint32_t guest_addr, int guest_port)
{
    struct in_addr h = { htonl(host_addr) }, g = { htonl(guest_addr) };
    errno = 0;
    if (slirp_add_hostfwd(s->slirp, is_udp, h, host_port, g, guest_port) < 0) {
        if (!errno)
            errno = EINVAL;
        return -1;
    }
    return 0;
}

static int add_poll(int fd, int events, void *opaque)
{
    struct hvf_slirp *s = opaque;
    if (s->npollfds == s->pollfds_room) {
        size_t room = s->pollfds_room ? s->pollfds_room * 2 : 16;
        struct pollfd *grown = realloc(s->pollfds, room * sizeof(*grown));
        if (!grown)
            return -1;  /* libslirp leaves that socket unpolled this round */
        s->pollfds = grown;
        s->pollfds_room = room;
    }
    short ev = 0;
    if (events & SLIRP_POLL_IN)
        ev |= POLLIN;
    if (events & SLIRP_POLL_OUT)
        ev |= POLLOUT;
    if (events & SLIRP_POLL_PRI)
        ev |= POLLPRI;
    s->pollfds[s->npollfds] = (struct pollfd){ .fd = fd, .events = ev };
    return (int)s->npollfds++;
}

static int get_revents(int idx, void *opaque)
{
    struct hvf_slirp *s = opaque;
    if (idx < 0 || (size_t)idx >= s->npollfds)
        return 0;
    short rev = s->pollfds[idx].revents;
    return (rev & POLLIN ? SLIRP_POLL_IN : 0) | (rev & POLLOUT ? SLIRP_POLL_OUT : 0) |
           (rev & POLLPRI ? SLIRP_POLL_PRI : 0) | (rev & POLLERR ? SLIRP_POLL_ERR : 0) |
           (rev & POLLHUP ? SLIRP_POLL_HUP : 0);
}

/* libslirp's timeout (ms, UINT32_MAX: none) shortened to the first armed timer. */
static uint32_t timer_timeout(struct hvf_slirp *s, uint32_t timeout)
{
    int64_t now_ms = now_ns() / 1000000;
    for (int i = 0; i < HVF_SLIRP_TIMERS; i++) {
        struct hvf_slirp_timer *t = &s->timers[i];
        if (t->used && t->expire_ms >= 0) {
            int64_t wait = t->expire_ms > now_ms ? t->expire_ms - now_ms : 0;
            if (wait < (int64_t)timeout)
                timeout = (uint32_t)wait;
        }
    }
    return timeout;
}

static void run_timers(struct hvf_slirp *s)
{
    int64_t now_ms = now_ns() / 1000000;
    for (int i = 0; i < HVF_SLIRP_TIMERS; i++) {
        struct hvf_slirp_timer *t = &s->timers[i];
        if (t->used && t->expire_ms >= 0 && t->expire_ms <= now_ms) {
            t->expire_ms = -1;
            slirp_handle_timer(s->slirp, t->id, t->cb_opaque);
        }
    }
}

static void take_guest_frames(struct hvf_slirp *s)
{
    for (int i = 0; i < HVF_SLIRP_BATCH; i++) {
        ssize_t n = recv(s->frames_fd, s->frame, sizeof(s->frame), MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0)
            return;
        if ((size_t)n > sizeof(s->frame)) {
            s->from_guest_dropped++;
            continue;
        }
        s->from_guest++;
        slirp_input(s->slirp, s->frame, (int)n);
    }
}

/*
 * One round of the stack's thread: 1 when the wake-up eventfd was signalled, 0 when
 * not, -errno when poll failed for another reason than a signal.
 */
static int hvf_slirp_poll(struct hvf_slirp *s)
{
    uint32_t timeout = UINT32_MAX;
    s->npollfds = 0;
    add_poll(s->wake_fd, SLIRP_POLL_IN, s);
    add_poll(s->frames_fd, SLIRP_POLL_IN, s);
    if (s->npollfds != 2)
        return -ENOMEM;
    slirp_pollfds_fill(s->slirp, &timeout, add_poll, s);
    timeout = timer_timeout(s, timeout);
    int n = poll(s->pollfds, s->npollfds, timeout > INT_MAX ? -1 : (int)timeout);
    int err = n < 0 ? errno : 0;
    if (err)
        for (size_t i = 0; i < s->npollfds; i++)
            s->pollfds[i].revents = 0;
    if (err && err != EINTR)
        return -err;
    slirp_pollfds_poll(s->slirp, 0, get_revents, s);
    run_timers(s);
    if (s->pollfds[1].revents & POLLIN)
        take_guest_frames(s);
    if (s->pollfds[0].revents & POLLIN) {
        eventfd_t count;
        eventfd_read(s->wake_fd, &count);
        return 1;
    }
    return 0;
}

static void hvf_slirp_free(struct hvf_slirp *s)
{
    slirp_cleanup(s->slirp);
    free(s->pollfds);
    free(s);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hvf.plugins.net._slirp", SOURCE, libraries=["slirp"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
