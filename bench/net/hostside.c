/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * hostside: bench/net's host end of a tap, inside the benchmark's network
 * namespace.  Frames are those of tests/guests/virtio_net.c's bench modes:
 * ethertype 0x88b5 with the big-endian u32 frame number after the Ethernet
 * header; acks are ethertype 0x88b6 with the u32s frames taken and next
 * frame number due.
 *
 *   hostside recv IF COUNT LEN [peer]
 *       count the guest's frames on IF (an AF_PACKET socket) until frame
 *       COUNT - 1 has come (or none for IDLE_S seconds)
 *   hostside send IF COUNT LEN WINDOW MAC [peer]
 *       wait for the guest's ready ack, then send COUNT frames of LEN bytes
 *       to MAC, never more than WINDOW ahead of the guest's last ack, until
 *       the guest acks them all
 *
 * With `peer` a thread of hostside plays the VMM and its guest itself: it
 * attaches to the tap through /dev/net/tun (IFF_VNET_HDR, as both VMMs do)
 * and sends the frames (recv: never more than PEER_WINDOW ahead of those
 * counted, so that none is dropped) or takes and acks them (send), which
 * gives the host side's own ceiling.  Lines on stdout: `ready` (the sockets are
 * bound: start the guest), `first` (the first frame came or went) and
 *
 *   done frames=N measured=M lost=L late=D other=O seconds=S cpu=C
 *        socket_drops=P tap_dropped=T
 *
 * where S is the time from the first frame (recv: the first batch read, whose
 * frames are not among the M measured) to the last (send: the last ack), C
 * hostside's own CPU time over that span.  Exit status 1 with a message on
 * stderr when something fails or TIMEOUT_S passes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <net/ethernet.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETH_TEST	0x88b5
#define ETH_ACK		0x88b6
#define ACK_EVERY	64
#define BATCH		64
#define VNET_HDR	12
#define MAX_FRAME	1514
#define IDLE_S		3
#define TIMEOUT_S	600
#define RCVBUF		(64 << 20)
#define PEER_WINDOW	512

static const uint8_t host_mac[6] = { 0x02, 0x00, 0x00, 0x77, 0x00, 0x01 };
static const uint8_t peer_mac[6] = { 0x02, 0x00, 0x00, 0x77, 0x00, 0x09 };
static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static const char *ifname;
static uint32_t count, frame_len;
/* Frames run_recv has counted (read by peer_source). */
static uint32_t counted;

static void die(const char *what)
{
	fprintf(stderr, "hostside: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "hostside: %s\n", what);
	exit(1);
}

static double now(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* An Ethernet frame of `len` bytes in f; returns its payload. */
static uint8_t *frame(uint8_t *f, const uint8_t *to, const uint8_t *from, uint16_t type,
		      uint32_t len)
{
	memset(f, 0xa5, len);
	memcpy(f, to, 6);
	memcpy(f + 6, from, 6);
	f[12] = (uint8_t)(type >> 8);
	f[13] = (uint8_t)type;
	return f + 14;
}

/* The tap's own count of frames it dropped (its queue to the VMM was full). */
static long tap_dropped(void)
{
	char path[128];
	long v = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/sys/class/net/%s/statistics/tx_dropped", ifname);
	f = fopen(path, "r");
	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

static int packet_socket(uint16_t proto)
{
	struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_protocol = htons(proto) };
	int s = socket(AF_PACKET, SOCK_RAW, htons(proto));

	if (s < 0)
		die("socket(AF_PACKET)");
	sll.sll_ifindex = (int)if_nametoindex(ifname);
	if (!sll.sll_ifindex)
		die(ifname);
	if (bind(s, (struct sockaddr *)&sll, sizeof(sll)))
		die("bind");
	return s;
}

static unsigned socket_drops(int s)
{
	struct tpacket_stats st;
	socklen_t n = sizeof(st);

	if (getsockopt(s, SOL_PACKET, PACKET_STATISTICS, &st, &n))
		return 0;
	return st.tp_drops;
}

static void report(uint32_t frames, uint32_t measured, uint32_t lost, uint32_t late,
		   uint32_t other, double seconds, double cpu, unsigned drops, long tap0)
{
	long tap1 = tap_dropped();

	printf("done frames=%u measured=%u lost=%u late=%u other=%u seconds=%.9f cpu=%.6f "
	       "socket_drops=%u tap_dropped=%ld\n", frames, measured, lost, late, other,
	       seconds, cpu, drops, tap0 < 0 || tap1 < 0 ? -1 : tap1 - tap0);
	fflush(stdout);
}

static void say(const char *line)
{
	puts(line);
	fflush(stdout);
}

/* ---- the peer: the tap's other end, as a VMM and its guest ---- */

static int tap_fd = -1;

static void tap_open(void)
{
	struct ifreq ifr;
	int hdr = VNET_HDR;

	tap_fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (tap_fd < 0)
		die("/dev/net/tun");
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	if (ioctl(tap_fd, TUNSETIFF, &ifr) || ioctl(tap_fd, TUNSETVNETHDRSZ, &hdr))
		die("attaching to the tap");
}

static void tap_write(const uint8_t *f, uint32_t len)
{
	uint8_t buf[VNET_HDR + MAX_FRAME] = { 0 };

	memcpy(buf + VNET_HDR, f, len);
	if (write(tap_fd, buf, VNET_HDR + len) != (ssize_t)(VNET_HDR + len))
		die("writing to the tap");
}

/* As virtio_net source=COUNT len=LEN. */
static void *peer_source(void *arg)
{
	uint8_t buf[VNET_HDR + MAX_FRAME] = { 0 };
	uint32_t i;

	(void)arg;
	frame(buf + VNET_HDR, broadcast, peer_mac, ETH_TEST, frame_len);
	for (i = 0; i < count; i++) {
		while (i - __atomic_load_n(&counted, __ATOMIC_ACQUIRE) >= PEER_WINDOW)
			sched_yield();
		put32(buf + VNET_HDR + 14, i);
		if (write(tap_fd, buf, VNET_HDR + frame_len) != (ssize_t)(VNET_HDR + frame_len))
			die("writing to the tap");
	}
	return NULL;
}

static void peer_ack(const uint8_t *to, uint32_t taken, uint32_t next)
{
	uint8_t f[60];
	uint8_t *p = frame(f, to, peer_mac, ETH_ACK, sizeof(f));

	put32(p, taken);
	put32(p + 4, next);
	tap_write(f, sizeof(f));
}

/* As virtio_net sink=COUNT. */
static void *peer_sink(void *arg)
{
	uint8_t buf[VNET_HDR + 65536];
	uint32_t taken = 0, next = 0, seq;
	struct pollfd pfd = { .fd = tap_fd, .events = POLLIN };
	ssize_t n;

	(void)arg;
	while (next < count) {
		if (!taken && poll(&pfd, 1, 50) == 0) {
			peer_ack(broadcast, 0, 0);
			continue;
		}
		n = read(tap_fd, buf, sizeof(buf));
		if (n < 0)
			die("reading the tap");
		if (n < VNET_HDR + 18 || get32(buf + VNET_HDR + 12) >> 16 != ETH_TEST)
			continue;
		seq = get32(buf + VNET_HDR + 14);
		if (seq < next)
			continue;
		next = seq + 1;
		if (++taken % ACK_EVERY == 0 || next >= count)
			peer_ack(buf + VNET_HDR + 6, taken, next);
	}
	return NULL;
}

/* ---- recv: the guest's frames ---- */

static void run_recv(int peer)
{
	static uint8_t bufs[BATCH][MAX_FRAME + 64];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	struct pollfd pfd;
	uint32_t frames = 0, first_batch = 0, next = 0, lost = 0, late = 0, other = 0, seq;
	double t_first = 0, t_last = 0, cpu_first = 0, cpu_last = 0;
	int s = packet_socket(ETH_TEST), rcvbuf = RCVBUF, i, got;
	long tap0 = tap_dropped();
	pthread_t thread;

	if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)))
		setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	for (i = 0; i < BATCH; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = sizeof(bufs[i]);
		memset(&msgs[i], 0, sizeof(msgs[i]));
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	pfd.fd = s;
	pfd.events = POLLIN;
	if (peer) {
		tap_open();
		if (pthread_create(&thread, NULL, peer_source, NULL))
			fail("pthread_create");
	}
	say("ready");
	while (next < count) {
		int ready = poll(&pfd, 1, frames ? IDLE_S * 1000 : TIMEOUT_S * 1000);

		if (ready < 0)
			die("poll");
		if (!ready) {
			if (!frames)
				fail("no frames came");
			lost += count - next;	/* the last ones never came */
			break;
		}
		got = recvmmsg(s, msgs, BATCH, MSG_DONTWAIT, NULL);
		if (got < 0) {
			if (errno == EAGAIN)
				continue;
			die("recvmmsg");
		}
		t_last = now(CLOCK_MONOTONIC);
		cpu_last = now(CLOCK_PROCESS_CPUTIME_ID);
		for (i = 0; i < got; i++) {
			const uint8_t *f = bufs[i];

			if (msgs[i].msg_len != frame_len) {
				other++;
				continue;
			}
			seq = get32(f + 14);
			if (seq < next) {
				late++;
				continue;
			}
			lost += seq - next;
			next = seq + 1;
			frames++;
		}
		__atomic_store_n(&counted, next, __ATOMIC_RELEASE);
		if (!first_batch && frames) {
			first_batch = frames;
			t_first = t_last;
			cpu_first = cpu_last;
			say("first");
		}
	}
	report(frames, frames - first_batch, lost, late, other, t_last - t_first,
	       cpu_last - cpu_first, socket_drops(s), tap0);
}

/* ---- send: frames to the guest, paced by its acks ---- */

static void run_send(uint32_t window, const uint8_t *to, int peer)
{
	static uint8_t bufs[BATCH][MAX_FRAME];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	struct pollfd pfd;
	uint8_t ack[128];
	uint32_t sent = 0, acked = 0, taken = 0, n, i;
	double t_first = 0, t_end, cpu_first = 0, deadline;
	int out = packet_socket(0), in = packet_socket(ETH_ACK), started = 0, waits = 0;
	long tap0 = tap_dropped();
	ssize_t len;
	pthread_t thread;

	for (i = 0; i < BATCH; i++) {
		frame(bufs[i], to, host_mac, ETH_TEST, frame_len);
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = frame_len;
		memset(&msgs[i], 0, sizeof(msgs[i]));
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	pfd.fd = in;
	pfd.events = POLLIN;
	if (peer) {
		tap_open();
		if (pthread_create(&thread, NULL, peer_sink, NULL))
			fail("pthread_create");
	}
	say("ready");
	deadline = now(CLOCK_MONOTONIC) + TIMEOUT_S;
	while (acked < count) {
		while (started && sent < count && sent - acked < window) {
			n = count - sent;
			n = n < BATCH ? n : BATCH;
			n = n < window - (sent - acked) ? n : window - (sent - acked);
			for (i = 0; i < n; i++)
				put32(bufs[i] + 14, sent + i);
			if (sendmmsg(out, msgs, n, 0) != (int)n)
				die("sendmmsg");
			sent += n;
		}
		if (now(CLOCK_MONOTONIC) > deadline)
			fail("the guest did not take every frame in time");
		if (poll(&pfd, 1, 1000) == 0) {
			/* The last frames lost (never seen here): send the last again. */
			if (started && sent == count && ++waits >= 2) {
				put32(bufs[0] + 14, count - 1);
				if (send(out, bufs[0], frame_len, 0) != (ssize_t)frame_len)
					die("send");
			}
			continue;
		}
		while ((len = recv(in, ack, sizeof(ack), MSG_DONTWAIT)) >= 0) {
			if (len < 22 || get32(ack + 12) >> 16 != ETH_ACK)
				continue;
			if (!started) {	/* the ready ack: go */
				started = 1;
				t_first = now(CLOCK_MONOTONIC);
				cpu_first = now(CLOCK_PROCESS_CPUTIME_ID);
				say("first");
				break;
			}
			if (get32(ack + 18) > acked) {
				acked = get32(ack + 18);
				taken = get32(ack + 14);
				waits = 0;
			}
		}
	}
	t_end = now(CLOCK_MONOTONIC);
	report(taken, taken, count - taken, 0, 0, t_end - t_first,
	       now(CLOCK_PROCESS_CPUTIME_ID) - cpu_first, socket_drops(in), tap0);
}

static uint32_t number(const char *s, const char *what)
{
	char *end;
	unsigned long v = strtoul(s, &end, 0);

	if (*s == '\0' || *end != '\0' || v == 0 || v > 0xffffffffUL)
		fail(what);
	return (uint32_t)v;
}

int main(int argc, char **argv)
{
	uint8_t mac[6];
	int peer;

	if (argc < 5)
		fail("usage: hostside recv IF COUNT LEN [peer] | send IF COUNT LEN WINDOW MAC [peer]");
	ifname = argv[2];
	count = number(argv[3], "COUNT must be a positive number");
	frame_len = number(argv[4], "LEN must be a positive number");
	if (frame_len < 60 || frame_len > MAX_FRAME)
		fail("LEN takes 60 to 1514");
	alarm(TIMEOUT_S + 60);
	if (!strcmp(argv[1], "recv")) {
		peer = argc > 5 && !strcmp(argv[5], "peer");
		run_recv(peer);
		return 0;
	}
	if (strcmp(argv[1], "send") || argc < 7 ||
	    sscanf(argv[6], "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3],
		   &mac[4], &mac[5]) != 6)
		fail("usage: hostside send IF COUNT LEN WINDOW MAC [peer]");
	peer = argc > 7 && !strcmp(argv[7], "peer");
	run_send(number(argv[5], "WINDOW must be a positive number"), mac, peer);
	return 0;
}
