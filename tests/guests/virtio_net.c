/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * virtio_net: a polling virtio 1.x network driver (PCI 1af4:1041, virtio
 * 1.x section 5.1) with just enough IPv4 to be a host on a network: ARP
 * (answers, asks, learns), ICMP echo (answers, and pings the server), and
 * a DHCP client (DISCOVER, OFFER, REQUEST, ACK).  It prints
 *
 *   net mac M features F        (the device's address, negotiated features)
 *   net lease IP mask M router R server S time T
 *   net ping SEQ ok             (an echo reply from the server)
 *   net pinged K of N           (after ping=N, N > 0)
 *   net answered ping SEQ from IP
 *   net announce                (VIRTIO_NET_S_ANNOUNCE seen: a gratuitous
 *                                ARP sent and VIRTIO_NET_CTRL_ANNOUNCE_ACK)
 *   net tcp connected PORT      (after tcp=PORT: SYN answered by SYN-ACK)
 *   net tcp got TEXT            (a line the server sent on that connection)
 *   net tcp reset               (the server refused the connection)
 *
 * and serves (answers ARP and pings) until hvf is stopped.  Options:
 *
 *   ip=A.B.C.D server=A.B.C.D   a static address instead of DHCP
 *   ping=N       pings to the server (0: forever), every `period=` TSC
 *                cycles (default 2^29); 3 unanswered in a row forget the
 *                server's MAC (it is asked again)
 *   announce=0   do not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE
 *   mrg=0        do not negotiate VIRTIO_NET_F_MRG_RXBUF
 *   echo=N       send every frame of ethertype 0x88b5 back to its sender and
 *                print `net echoed N lost L` after N (L: gaps in the u32
 *                sequence numbers after the Ethernet header)
 *   stall=1      post the receive buffers once and never take a frame:
 *                `net stalled`
 *   tcp=PORT     once the address is known, connect to the server's TCP
 *                PORT (a SYN every `period=` until answered), send the line
 *                "hvf guest" (again every period until acknowledged) and
 *                print each line the server sends back
 *
 * and two bench modes (bench/net), which print `net mac` and then, instead
 * of serving:
 *
 *   source=N len=L  transmit N frames of L bytes (60-1514, Ethernet header
 *                included) to the broadcast address, ethertype 0x88b5, the
 *                big-endian u32 frame number after the header, keeping the
 *                transmit ring full (a notify per batch):
 *                `net source go`, then once all are back
 *                `net source N frames L bytes tsc T`
 *   sink=N       take ethertype 0x88b5 frames numbered as above until frame
 *                N - 1 has come; every 64 frames (and at the end) send the
 *                sender an ack, ethertype 0x88b6 with the big-endian u32s
 *                frames taken and next frame number, and before the first
 *                frame a ready ack (0, 0) to the broadcast address every
 *                `period=` / 4:  `net sink go`, then
 *                `net sink N frames lost L late D tsc T`
 *
 * T is TSC cycles (hex) from the first frame sent or taken to the last; both
 * modes then exit (status 1).  They notify only when the device asks
 * (VRING_USED_F_NO_NOTIFY clear).
 */
#include "virtio.h"

#define VIRTIO_DEV_NET		0x1041
#define NET_VECTOR_BASE		0x70

#define F_MAC			(1ull << 5)
#define F_MRG_RXBUF		(1ull << 15)
#define F_STATUS		(1ull << 16)
#define F_CTRL_VQ		(1ull << 17)
#define F_GUEST_ANNOUNCE	(1ull << 21)
#define S_ANNOUNCE		2

#define HDR			12	/* virtio_net_hdr with num_buffers */
#define BUF			2048
#define NTX			64
#define ETH_TEST		0x88b5
#define PING_ID			0x4856
#define DHCP_XID		0x48564631u
#define TCP_LOCAL_PORT		40404
#define TCP_ISS			0x48564600u
#define TCP_SYN			0x02
#define TCP_RST			0x04
#define TCP_PSH			0x08
#define TCP_ACK			0x10
#define ETH_ACK			0x88b6
#define ACK_EVERY		64
#define SOURCE_BATCH		(NTX / 4)
#define VRING_USED_F_NO_NOTIFY	1

enum dhcp_state { DHCP_OFF, DHCP_DISCOVER, DHCP_REQUEST, DHCP_BOUND };
enum tcp_state { TCP_CLOSED, TCP_SYN_SENT, TCP_ESTABLISHED };

static struct vio_dev net;
static struct vq *rxq, *txq, *cq;
static uint8_t mac[6], server_mac[6];
static int server_mac_known;
static uint32_t my_ip, server_ip, router_ip, netmask, lease_time, offered_ip;
static enum dhcp_state dhcp;
static uint8_t *tx_free[NTX];
static uint32_t ntx_free;
static uint8_t *ctrl_buf;
static uint32_t ping_count, ping_sent, ping_ok, ping_missed, ping_seq_seen;
static uint64_t period;
static uint32_t echo_target, echo_count, echo_lost, echo_next;
static uint32_t tcp_port, tcp_peer_next;
static enum tcp_state tcp;
static int tcp_hello_acked;
static const char tcp_hello[] = "hvf guest\n";
#define TCP_HELLO_LEN		(sizeof(tcp_hello) - 1)

static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

/* ------------------------------------------------------------------ */
/* Bytes                                                               */

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}

static int same(const uint8_t *a, const uint8_t *b, uint32_t n)
{
	while (n--)
		if (*a++ != *b++)
			return 0;
	return 1;
}

static uint16_t checksum(const uint8_t *p, uint32_t len)
{
	uint32_t sum = 0;

	for (; len > 1; p += 2, len -= 2)
		sum += get16(p);
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void put_ip(uint32_t ip)
{
	con_dec(ip >> 24);
	con_putc('.');
	con_dec(ip >> 16 & 0xff);
	con_putc('.');
	con_dec(ip >> 8 & 0xff);
	con_putc('.');
	con_dec(ip & 0xff);
}

static uint32_t opt_ip(const char *key)
{
	const char *p = opt_find(key);
	uint32_t ip = 0, part, i;

	if (!p)
		return 0;
	for (i = 0; i < 4; i++) {
		for (part = 0; *p >= '0' && *p <= '9'; p++)
			part = part * 10 + (uint32_t)(*p - '0');
		ip = ip << 8 | (part & 0xff);
		if (*p == '.')
			p++;
	}
	return ip;
}

/* ------------------------------------------------------------------ */
/* Frames                                                              */

static void tx_flush(void)
{
	vq_kick(txq);
}

static void reclaim(void)
{
	uint32_t len;
	int id;

	while ((id = vq_get(txq, &len)) >= 0)
		tx_free[ntx_free++] = (uint8_t *)txq->buf_addr[id];
}

/* A transmit buffer; its frame starts HDR bytes in. */
static uint8_t *tx_alloc(void)
{
	while (!ntx_free) {
		vq_kick(rxq);	/* buffers taken so far go back before we wait */
		tx_flush();
		reclaim();
		vio_wait(&net);
	}
	return tx_free[--ntx_free];
}

/* Queue the frame (kicked by tx_flush). */
static void tx_send(uint8_t *buf, uint32_t len)
{
	memset(buf, 0, HDR);
	if (len < 60) {
		memset(buf + HDR + len, 0, 60 - len);
		len = 60;
	}
	if (vq_add(txq, buf, HDR + len, 0) < 0)
		fail("virtio-net: transmit queue full");
}

static uint8_t *eth(uint8_t *buf, const uint8_t *to, uint16_t type)
{
	uint8_t *f = buf + HDR;

	memcpy(f, to, 6);
	memcpy(f + 6, mac, 6);
	put16(f + 12, type);
	return f + 14;
}

static void send_arp(uint16_t op, const uint8_t *to_mac, uint32_t to_ip, uint32_t from_ip)
{
	uint8_t *buf = tx_alloc();
	uint8_t *a = eth(buf, op == 1 ? broadcast : to_mac, 0x0806);

	put16(a, 1);
	put16(a + 2, 0x0800);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, mac, 6);
	put32(a + 14, from_ip);
	if (op == 1)
		memset(a + 18, 0, 6);
	else
		memcpy(a + 18, to_mac, 6);
	put32(a + 24, to_ip);
	tx_send(buf, 14 + 28);
	tx_flush();
}

/* An IPv4 header at p for `len` bytes of payload; returns the payload. */
static uint8_t *ipv4(uint8_t *p, uint8_t proto, uint32_t from, uint32_t to, uint32_t len)
{
	p[0] = 0x45;
	p[1] = 0;
	put16(p + 2, (uint16_t)(20 + len));
	put16(p + 4, 0);
	put16(p + 6, 0x4000);	/* don't fragment */
	p[8] = 64;
	p[9] = proto;
	put16(p + 10, 0);
	put32(p + 12, from);
	put32(p + 16, to);
	put16(p + 10, checksum(p, 20));
	return p + 20;
}

static void send_ping(void)
{
	uint8_t *buf, *icmp;
	uint32_t i;

	if (!server_mac_known) {
		send_arp(1, broadcast, server_ip, my_ip);
		return;
	}
	buf = tx_alloc();
	icmp = ipv4(eth(buf, server_mac, 0x0800), 1, my_ip, server_ip, 64);
	ping_sent++;
	icmp[0] = 8;
	icmp[1] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 4, PING_ID);
	put16(icmp + 6, (uint16_t)ping_sent);
	for (i = 8; i < 64; i++)
		icmp[i] = (uint8_t)i;
	put16(icmp + 2, checksum(icmp, 64));
	tx_send(buf, 14 + 20 + 64);
	tx_flush();
}

/* ------------------------------------------------------------------ */
/* DHCP (RFC 2131)                                                     */

static void dhcp_send(uint8_t type)
{
	uint8_t *buf = tx_alloc();
	uint8_t *udp = ipv4(eth(buf, broadcast, 0x0800), 17, 0, 0xffffffffu, 8 + 240 + 20);
	uint8_t *b = udp + 8, *o = b + 240;

	put16(udp, 68);
	put16(udp + 2, 67);
	put16(udp + 4, 8 + 240 + 20);
	put16(udp + 6, 0);	/* no UDP checksum */
	memset(b, 0, 240 + 20);
	b[0] = 1;		/* BOOTREQUEST */
	b[1] = 1;		/* Ethernet */
	b[2] = 6;
	put32(b + 4, DHCP_XID);
	put16(b + 10, 0x8000);	/* broadcast replies: no address yet */
	memcpy(b + 28, mac, 6);
	put32(b + 236, 0x63825363);
	*o++ = 53; *o++ = 1; *o++ = type;
	if (type == 3) {
		*o++ = 50; *o++ = 4; put32(o, offered_ip); o += 4;
		*o++ = 54; *o++ = 4; put32(o, server_ip); o += 4;
	}
	*o++ = 55; *o++ = 2; *o++ = 1; *o++ = 3;
	*o = 255;
	tx_send(buf, 14 + 20 + 8 + 240 + 20);
	tx_flush();
}

static void dhcp_reply(const uint8_t *b, uint32_t len)
{
	const uint8_t *o = b + 240, *end = b + len;
	uint8_t type = 0;
	uint32_t server = 0, mask = 0, router = 0, lease = 0;

	if (len < 240 || b[0] != 2 || get32(b + 4) != DHCP_XID || !same(b + 28, mac, 6) ||
	    get32(b + 236) != 0x63825363)
		return;
	while (o + 2 <= end && *o != 255) {
		uint8_t code = o[0], n = o[1];

		if (code == 0) {
			o++;
			continue;
		}
		if (o + 2 + n > end)
			break;
		if (code == 53 && n == 1)
			type = o[2];
		else if (code == 54 && n == 4)
			server = get32(o + 2);
		else if (code == 1 && n == 4)
			mask = get32(o + 2);
		else if (code == 3 && n >= 4)
			router = get32(o + 2);
		else if (code == 51 && n == 4)
			lease = get32(o + 2);
		o += 2 + n;
	}
	if (type == 2 && dhcp == DHCP_DISCOVER) {	/* OFFER */
		offered_ip = get32(b + 16);
		server_ip = server;
		dhcp = DHCP_REQUEST;
		dhcp_send(3);
	} else if (type == 5 && dhcp == DHCP_REQUEST) {	/* ACK */
		my_ip = get32(b + 16);
		netmask = mask;
		router_ip = router;
		lease_time = lease;
		dhcp = DHCP_BOUND;
		con_puts("net lease ");
		put_ip(my_ip);
		con_puts(" mask ");
		put_ip(netmask);
		con_puts(" router ");
		put_ip(router_ip);
		con_puts(" server ");
		put_ip(server_ip);
		con_puts(" time ");
		con_dec(lease_time);
		con_putc('\n');
	} else if (type == 6 && dhcp == DHCP_REQUEST) {	/* NAK */
		dhcp = DHCP_DISCOVER;
		dhcp_send(1);
	}
}

/* ------------------------------------------------------------------ */
/* TCP: one connection from TCP_LOCAL_PORT to the server's tcp= port    */

/* The TCP checksum of a segment between us and the server (0: it checks). */
static uint16_t tcp_checksum(const uint8_t *seg, uint32_t len)
{
	uint32_t sum = (my_ip >> 16) + (my_ip & 0xffff) + (server_ip >> 16) +
		       (server_ip & 0xffff) + 6 + len;

	sum += (uint16_t)~checksum(seg, len);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void send_tcp(uint8_t flags, uint32_t seq, const char *data, uint32_t len)
{
	uint8_t *buf, *t;

	if (!server_mac_known) {
		send_arp(1, broadcast, server_ip, my_ip);
		return;
	}
	buf = tx_alloc();
	t = ipv4(eth(buf, server_mac, 0x0800), 6, my_ip, server_ip, 20 + len);
	put16(t, TCP_LOCAL_PORT);
	put16(t + 2, (uint16_t)tcp_port);
	put32(t + 4, seq);
	put32(t + 8, flags & TCP_ACK ? tcp_peer_next : 0);
	t[12] = 5 << 4;
	t[13] = flags;
	put16(t + 14, 8192);	/* window */
	put32(t + 16, 0);	/* checksum, urgent pointer */
	memcpy(t + 20, data, len);
	put16(t + 16, tcp_checksum(t, 20 + len));
	tx_send(buf, 14 + 20 + 20 + len);
	tx_flush();
}

/* A SYN, or the hello line again, while unanswered. */
static void tcp_tick(void)
{
	if (tcp != TCP_ESTABLISHED) {
		tcp = TCP_SYN_SENT;
		send_tcp(TCP_SYN, TCP_ISS, 0, 0);
	} else if (!tcp_hello_acked) {
		send_tcp(TCP_PSH | TCP_ACK, TCP_ISS + 1, tcp_hello, TCP_HELLO_LEN);
	}
}

static void tcp_in(const uint8_t *t, uint32_t len, uint32_t from)
{
	uint32_t off, seq, ack, n, i;
	uint8_t flags;

	if (len < 20 || from != server_ip || get16(t) != tcp_port ||
	    get16(t + 2) != TCP_LOCAL_PORT || tcp_checksum(t, len))
		return;
	off = (t[12] >> 4) * 4u;
	if (off < 20 || off > len)
		return;
	flags = t[13];
	seq = get32(t + 4);
	ack = get32(t + 8);
	if (flags & TCP_RST) {
		if (tcp != TCP_CLOSED)
			con_puts("net tcp reset\n");
		tcp = TCP_CLOSED;
		tcp_port = 0;
		return;
	}
	if (tcp == TCP_SYN_SENT && (flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK) &&
	    ack == TCP_ISS + 1) {
		tcp_peer_next = seq + 1;
		tcp = TCP_ESTABLISHED;
		con_puts("net tcp connected ");
		con_dec(tcp_port);
		con_putc('\n');
		tcp_tick();
		return;
	}
	if (tcp != TCP_ESTABLISHED)
		return;
	if ((flags & TCP_ACK) && ack == TCP_ISS + 1 + TCP_HELLO_LEN)
		tcp_hello_acked = 1;
	n = len - off;
	if (!n)
		return;
	if (seq == tcp_peer_next) {
		tcp_peer_next += n;
		con_puts("net tcp got ");
		for (i = 0; i < n && t[off + i] != '\n'; i++)
			con_putc(t[off + i] >= ' ' && t[off + i] < 0x7f ? (char)t[off + i] : '?');
		con_putc('\n');
	}
	send_tcp(TCP_ACK, TCP_ISS + 1 + (tcp_hello_acked ? TCP_HELLO_LEN : 0), 0, 0);
}

/* ------------------------------------------------------------------ */
/* Receiving                                                           */

static void arp_in(const uint8_t *a, uint32_t len)
{
	uint16_t op;
	uint32_t spa, tpa;

	if (len < 28 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4)
		return;
	op = get16(a + 6);
	spa = get32(a + 14);
	tpa = get32(a + 24);
	if (spa == server_ip && spa) {
		memcpy(server_mac, a + 8, 6);
		server_mac_known = 1;
	}
	if (op == 1 && my_ip && tpa == my_ip)
		send_arp(2, a + 8, spa, my_ip);
}

static void icmp_in(const uint8_t *f, const uint8_t *ip, const uint8_t *icmp, uint32_t len)
{
	uint8_t *buf, *out;

	if (len < 8 || checksum(icmp, len))
		return;
	if (icmp[0] == 0 && get16(icmp + 4) == PING_ID) {
		uint16_t seq = get16(icmp + 6);

		ping_missed = 0;
		if (seq <= ping_seq_seen)
			return;
		ping_seq_seen = seq;
		ping_ok++;
		con_puts("net ping ");
		con_dec(seq);
		con_puts(" ok\n");
		if (ping_count && ping_ok == ping_count) {
			con_puts("net pinged ");
			con_dec(ping_ok);
			con_puts(" of ");
			con_dec(ping_sent);
			con_putc('\n');
		}
		return;
	}
	if (icmp[0] != 8 || len > BUF - HDR - 14 - 20)
		return;
	buf = tx_alloc();
	out = ipv4(eth(buf, f + 6, 0x0800), 1, my_ip, get32(ip + 12), len);
	memcpy(out, icmp, len);
	out[0] = 0;
	put16(out + 2, 0);
	put16(out + 2, checksum(out, len));
	tx_send(buf, 14 + 20 + len);
	tx_flush();
	con_puts("net answered ping ");
	con_dec(get16(icmp + 6));
	con_puts(" from ");
	put_ip(get32(ip + 12));
	con_putc('\n');
}

static void ipv4_in(const uint8_t *f, const uint8_t *ip, uint32_t len)
{
	uint32_t ihl, total, to;

	if (len < 20 || ip[0] >> 4 != 4)
		return;
	ihl = (ip[0] & 15) * 4u;
	total = get16(ip + 2);
	if (ihl < 20 || total < ihl || total > len || checksum(ip, ihl))
		return;
	to = get32(ip + 16);
	if (ip[9] == 17 && total >= ihl + 8 && get16(ip + ihl + 2) == 68 && dhcp != DHCP_BOUND &&
	    dhcp != DHCP_OFF)
		dhcp_reply(ip + ihl + 8, total - ihl - 8);
	else if (ip[9] == 1 && my_ip && to == my_ip)
		icmp_in(f, ip, ip + ihl, total - ihl);
	else if (ip[9] == 6 && my_ip && to == my_ip && tcp_port)
		tcp_in(ip + ihl, total - ihl, get32(ip + 12));
}

static void echo_in(const uint8_t *f, uint32_t len)
{
	uint8_t *buf;
	uint32_t seq;

	if (!echo_target || len < 18 || len > BUF - HDR)
		return;
	seq = get32(f + 14);
	if (seq != echo_next)
		echo_lost += seq > echo_next ? seq - echo_next : 1;
	echo_next = seq + 1;
	buf = tx_alloc();
	memcpy(buf + HDR, f + 6, 6);
	memcpy(buf + HDR + 6, mac, 6);
	memcpy(buf + HDR + 12, f + 12, len - 12);
	tx_send(buf, len);
	if (++echo_count == echo_target) {
		tx_flush();
		con_puts("net echoed ");
		con_dec(echo_count);
		con_puts(" lost ");
		con_dec(echo_lost);
		con_putc('\n');
	}
}

static void frame_in(const uint8_t *f, uint32_t len)
{
	uint16_t type;

	if (len < 14)
		return;
	if (!same(f, mac, 6) && !same(f, broadcast, 6))
		return;
	type = get16(f + 12);
	if (type == 0x0806)
		arp_in(f + 14, len - 14);
	else if (type == 0x0800)
		ipv4_in(f, f + 14, len - 14);
	else if (type == ETH_TEST)
		echo_in(f, len);
}

/* Take every received frame (whole in its buffer: 2048 > 1514 + HDR). */
static void poll_rx(void)
{
	uint32_t len, taken = 0;
	int id;

	while ((id = vq_get(rxq, &len)) >= 0) {
		uint8_t *buf = (uint8_t *)rxq->buf_addr[id];

		if (len >= HDR)
			frame_in(buf + HDR, len - HDR);
		vq_add(rxq, buf, BUF, 1);
		taken++;
	}
	if (taken) {
		vq_kick(rxq);
		tx_flush();
	}
}

/* ------------------------------------------------------------------ */
/* Bench modes (bench/net): few instructions per frame                 */

static void full_barrier(void)
{
	__asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");
}

/* Publish what was added; notify only if the device has not said it polls. */
static void vq_publish(struct vq *q)
{
	if (!q->pending)
		return;
	q->avail->idx = q->avail_idx;
	q->pending = 0;
	full_barrier();		/* the index before the device's flags */
	if (!(q->used->flags & VRING_USED_F_NO_NOTIFY))
		mmio_write16(q->notify_addr, q->index);
}

static void put_tsc(uint64_t tsc)
{
	con_puts(" tsc ");
	con_hex64(tsc);
	con_putc('\n');
}

static void run_source(uint32_t count, uint32_t len)
{
	uint32_t sent = 0, i, ready;
	uint64_t t0, cycles;

	if (len < 60 || len > 1514)
		fail("virtio-net: len= takes 60 to 1514");
	for (i = 0; i < ntx_free; i++) {
		uint8_t *p = eth(tx_free[i], broadcast, ETH_TEST);

		memset(tx_free[i], 0, HDR);
		memset(p, 0xa5, len - 14);
	}
	con_puts("net source go\n");
	t0 = rdtsc();
	while (sent < count || ntx_free < NTX) {
		reclaim();
		ready = count - sent < ntx_free ? count - sent : ntx_free;
		if (!ready || (ready < SOURCE_BATCH && ready < count - sent && ntx_free < NTX)) {
			cpu_pause();
			continue;
		}
		while (ready--) {
			uint8_t *buf = tx_free[--ntx_free];

			*(volatile uint32_t *)(buf + HDR + 14) = __builtin_bswap32(sent++);
			if (vq_add(txq, buf, HDR + len, 0) < 0)
				fail("virtio-net: transmit queue full");
		}
		vq_publish(txq);
	}
	cycles = rdtsc() - t0;
	con_puts("net source ");
	con_dec(count);
	con_puts(" frames ");
	con_dec(len);
	con_puts(" bytes");
	put_tsc(cycles);
}

/* An ack to `to`: frames taken so far and the next frame number due. */
static void send_ack(const uint8_t *to, uint32_t taken, uint32_t next)
{
	uint8_t *buf = tx_alloc();
	uint8_t *p = eth(buf, to, ETH_ACK);

	put32(p, taken);
	put32(p + 4, next);
	tx_send(buf, 14 + 8);
	vq_publish(txq);
}

static void run_sink(uint32_t count)
{
	uint32_t taken = 0, next = 0, lost = 0, late = 0, len, seq, fresh, batch;
	uint64_t t0 = 0, t1 = 0, ready_at = rdtsc();
	uint8_t peer[6];
	int id;

	memcpy(peer, broadcast, 6);
	con_puts("net sink go\n");
	while (next < count) {
		fresh = 0;
		for (batch = 0; batch < ACK_EVERY && (id = vq_get(rxq, &len)) >= 0; batch++) {
			uint8_t *buf = (uint8_t *)rxq->buf_addr[id];
			const uint8_t *f = buf + HDR;

			if (len >= HDR + 18 && *(const uint16_t *)(f + 12) == 0xb588) {
				seq = __builtin_bswap32(*(const uint32_t *)(f + 14));
				if (seq < next) {
					late++;
				} else {
					if (!taken++) {
						t0 = rdtsc();
						memcpy(peer, f + 6, 6);
					}
					lost += seq - next;
					next = seq + 1;
					fresh += (taken & (ACK_EVERY - 1)) == 0;
				}
			}
			vq_add(rxq, buf, BUF, 1);
		}
		vq_publish(rxq);
		if (next >= count) {
			t1 = rdtsc();
			send_ack(peer, taken, next);
		} else if (fresh) {
			send_ack(peer, taken, next);
		} else if (!taken && rdtsc() >= ready_at) {
			send_ack(broadcast, 0, 0);
			ready_at = rdtsc() + (period >> 2);
		} else {
			reclaim();
			cpu_pause();
		}
	}
	while (ntx_free < NTX)	/* the last ack has gone before the guest exits */
		reclaim();
	con_puts("net sink ");
	con_dec(taken);
	con_puts(" frames lost ");
	con_dec(lost);
	con_puts(" late ");
	con_dec(late);
	put_tsc(t1 - t0);
}

/* ------------------------------------------------------------------ */
/* The control queue: one command at a time (class, command, ack).     */

static int ctrl(uint8_t cls, uint8_t cmd)
{
	volatile struct vring_desc *d = cq->desc;
	uint32_t spins;

	ctrl_buf[0] = cls;
	ctrl_buf[1] = cmd;
	ctrl_buf[2] = 0xff;
	d[0].addr = (uint32_t)ctrl_buf;
	d[0].len = 2;
	d[0].flags = VRING_DESC_F_NEXT;
	d[0].next = 1;
	d[1].addr = (uint32_t)(ctrl_buf + 2);
	d[1].len = 1;
	d[1].flags = VRING_DESC_F_WRITE;
	d[1].next = 0;
	cq->avail->ring[cq->avail_idx & (cq->size - 1)] = 0;
	cq->avail_idx++;
	cq->pending++;
	vq_kick(cq);
	for (spins = 0; cq->used->idx == cq->last_used; spins++)
		if (spins > 100000000)
			fail("virtio-net: control command not answered");
	cq->last_used++;
	return ctrl_buf[2];
}

static void check_announce(void)
{
	if (!(net.drv_features & F_GUEST_ANNOUNCE) || !(vio_cfg_read16(&net, 6) & S_ANNOUNCE))
		return;
	if (my_ip)
		send_arp(1, broadcast, my_ip, my_ip);	/* gratuitous */
	server_mac_known = 0;			/* a new network: ask again */
	if (ctrl(3, 0) != 0)
		fail("virtio-net: VIRTIO_NET_CTRL_ANNOUNCE_ACK refused");
	con_puts("net announce\n");
}

/* ------------------------------------------------------------------ */

int main(void)
{
	uint64_t wanted = F_MAC | F_STATUS, next_ping, next_dhcp, next_cfg, next_tcp, now;
	uint32_t i;
	int stall;

	opt_init();
	period = opt_num("period=", 0) ? opt_num("period=", 0) : 1u << 29;
	ping_count = opt_num("ping=", 3);
	echo_target = opt_num("echo=", 0);
	stall = (int)opt_num("stall=", 0);
	tcp_port = opt_num("tcp=", 0) & 0xffff;
	if (opt_num("mrg=", 1))
		wanted |= F_MRG_RXBUF;
	if (opt_num("announce=", 1))
		wanted |= F_CTRL_VQ | F_GUEST_ANNOUNCE;

	vio_probe(&net, VIRTIO_DEV_NET, "virtio-net", NET_VECTOR_BASE);
	vio_begin(&net, VIO_POLL);
	vio_negotiate(&net, wanted);
	rxq = vio_setup_queue(&net, 0, VQ_MAX_SIZE);
	txq = vio_setup_queue(&net, 1, NTX);
	if (net.drv_features & F_CTRL_VQ)
		cq = vio_setup_queue(&net, 2, 8);
	ctrl_buf = mem_zalloc(64, 64);
	for (i = 0; i < 6; i++)
		mac[i] = vio_cfg_read8(&net, i);
	for (i = 0; i < NTX; i++)
		tx_free[ntx_free++] = mem_alloc(BUF, 64);
	for (i = 0; i < rxq->size; i++)
		vq_add(rxq, mem_alloc(BUF, 64), BUF, 1);
	vio_driver_ok(&net);
	vq_kick(rxq);
	con_puts("net mac ");
	for (i = 0; i < 6; i++) {
		con_hex(mac[i], 2);
		if (i < 5)
			con_putc(':');
	}
	con_puts(" features ");
	con_hex64(net.drv_features);
	con_putc('\n');
	if (stall) {
		con_puts("net stalled\n");
		for (;;)
			cpu_pause();
	}
	if (opt_find("source=")) {
		run_source(opt_num("source=", 0), opt_num("len=", 64));
		return 0;
	}
	if (opt_find("sink=")) {
		run_sink(opt_num("sink=", 0));
		return 0;
	}

	my_ip = opt_ip("ip=");
	server_ip = opt_ip("server=");
	dhcp = my_ip ? DHCP_OFF : DHCP_DISCOVER;
	now = rdtsc();
	next_dhcp = now;
	next_ping = now + period;
	next_cfg = now + (period >> 2);
	next_tcp = now;
	for (;;) {
		poll_rx();
		reclaim();
		now = rdtsc();
		if (dhcp == DHCP_DISCOVER && now >= next_dhcp) {
			dhcp_send(1);
			next_dhcp = now + 4 * period;
		}
		if (my_ip && server_ip && now >= next_ping &&
		    (!ping_count || ping_sent < ping_count)) {
			if (ping_sent > ping_seq_seen && ++ping_missed >= 3) {
				server_mac_known = 0;	/* moved? ask again */
				ping_missed = 0;
			}
			send_ping();
			next_ping = now + period;
		}
		if (tcp_port && my_ip && server_ip && now >= next_tcp) {
			tcp_tick();
			next_tcp = now + period;
		}
		if (cq && now >= next_cfg) {
			check_announce();
			next_cfg = now + (period >> 2);
		}
		cpu_pause();
	}
}
