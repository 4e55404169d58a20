/*
 * guest.c: the test VMM's guest program (freestanding, CPL3 only).
 *
 * Entered from entry.S as guest_main(vcpu). Validates the params page, sets up
 * this vCPU's status page, prints one console line, reports READY and runs the
 * workload forever. See abi.h for the contract and README.md for the rules
 * (no HLT, no SSE, no CPL0 instructions, no writable globals).
 */
#include "abi.h"

/* Overridable only so a host-side test harness can include this file. */
#ifndef GUEST_PARAMS_ADDR
#define GUEST_PARAMS_ADDR PARAMS_ADDR
#endif
#ifndef GUEST_STATUS_ADDR
#define GUEST_STATUS_ADDR STATUS_ADDR
#endif
#ifndef GUEST_NET_ADDR
#define GUEST_NET_ADDR NET_ADDR
#define GUEST_NET_TX_ADDR NET_TX_ADDR
#define GUEST_NET_RX_ADDR NET_RX_ADDR
#endif
#ifndef GUEST_DISK_ADDR
#define GUEST_DISK_ADDR DISK_ADDR
#define GUEST_DISK_RING_ADDR DISK_RING_ADDR
#define GUEST_DISK_BUF_ADDR DISK_BUF_ADDR
#endif
#ifndef GUEST_OUTL
#define GUEST_OUTL(port, val) outl(port, val)
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef long s64;
typedef unsigned __int128 u128;
typedef volatile struct guest_status vstatus;

_Static_assert(sizeof(u64) == 8 && sizeof(u32) == 4, "u64/u32 sizes");
_Static_assert(__builtin_offsetof(struct guest_params, magic) == P_MAGIC, "P_MAGIC");
_Static_assert(__builtin_offsetof(struct guest_params, abi_version) == P_ABI_VERSION, "P_ABI_VERSION");
_Static_assert(__builtin_offsetof(struct guest_params, nr_vcpus) == P_NR_VCPUS, "P_NR_VCPUS");
_Static_assert(__builtin_offsetof(struct guest_params, workload) == P_WORKLOAD, "P_WORKLOAD");
_Static_assert(__builtin_offsetof(struct guest_params, pattern) == P_PATTERN, "P_PATTERN");
_Static_assert(__builtin_offsetof(struct guest_params, tsc_khz) == P_TSC_KHZ, "P_TSC_KHZ");
_Static_assert(__builtin_offsetof(struct guest_params, rate) == P_RATE, "P_RATE");
_Static_assert(__builtin_offsetof(struct guest_params, seed) == P_SEED, "P_SEED");
_Static_assert(__builtin_offsetof(struct guest_params, phase_ops) == P_PHASE_OPS, "P_PHASE_OPS");
_Static_assert(__builtin_offsetof(struct guest_params, hot_pct) == P_HOT_PCT, "P_HOT_PCT");
_Static_assert(__builtin_offsetof(struct guest_params, hot_write_pct) == P_HOT_WRITE_PCT, "P_HOT_WRITE_PCT");
_Static_assert(__builtin_offsetof(struct guest_params, go) == P_GO, "P_GO");
_Static_assert(__builtin_offsetof(struct guest_params, idle_tick_us) == P_IDLE_TICK_US, "P_IDLE_TICK_US");
_Static_assert(__builtin_offsetof(struct guest_params, net_mac) == P_NET_MAC, "P_NET_MAC");
_Static_assert(__builtin_offsetof(struct guest_params, net_ip) == P_NET_IP, "P_NET_IP");
_Static_assert(__builtin_offsetof(struct guest_params, net_port) == P_NET_PORT, "P_NET_PORT");
_Static_assert(__builtin_offsetof(struct guest_params, stream_rate) == P_STREAM_RATE, "P_STREAM_RATE");
_Static_assert(__builtin_offsetof(struct guest_params, stream_bytes) == P_STREAM_BYTES, "P_STREAM_BYTES");
_Static_assert(__builtin_offsetof(struct guest_params, net_flags) == P_NET_FLAGS, "P_NET_FLAGS");
_Static_assert(__builtin_offsetof(struct guest_params, net_service) == P_NET_SERVICE, "P_NET_SERVICE");
_Static_assert(__builtin_offsetof(struct guest_params, content) == P_CONTENT, "P_CONTENT");
_Static_assert(__builtin_offsetof(struct guest_params, vcpu) == P_VCPU, "P_VCPU");
_Static_assert(sizeof(struct guest_vcpu_params) == P_VCPU_STRIDE, "P_VCPU_STRIDE");
_Static_assert(__builtin_offsetof(struct guest_vcpu_params, base) == PV_BASE, "PV_BASE");
_Static_assert(__builtin_offsetof(struct guest_vcpu_params, pages) == PV_PAGES, "PV_PAGES");
_Static_assert(__builtin_offsetof(struct guest_vcpu_params, working_set) == PV_WORKING_SET, "PV_WORKING_SET");
_Static_assert(__builtin_offsetof(struct guest_params, disk_blocks) == P_DISK_BLOCKS, "P_DISK_BLOCKS");
_Static_assert(__builtin_offsetof(struct guest_params, disk_ws) == P_DISK_WS, "P_DISK_WS");
_Static_assert(__builtin_offsetof(struct guest_params, disk_flush_every) == P_DISK_FLUSH_EVERY, "P_DISK_FLUSH_EVERY");
_Static_assert(__builtin_offsetof(struct guest_params, disk_flags) == P_DISK_FLAGS, "P_DISK_FLAGS");
_Static_assert(sizeof(struct guest_params) <= PAGE_SIZE, "params page");
_Static_assert(__builtin_offsetof(struct guest_status, magic) == S_MAGIC, "S_MAGIC");
_Static_assert(__builtin_offsetof(struct guest_status, state) == S_STATE, "S_STATE");
_Static_assert(__builtin_offsetof(struct guest_status, error) == S_ERROR, "S_ERROR");
_Static_assert(__builtin_offsetof(struct guest_status, iterations) == S_ITERATIONS, "S_ITERATIONS");
_Static_assert(__builtin_offsetof(struct guest_status, writes) == S_WRITES, "S_WRITES");
_Static_assert(__builtin_offsetof(struct guest_status, phase) == S_PHASE, "S_PHASE");
_Static_assert(__builtin_offsetof(struct guest_status, cur_page) == S_CUR_PAGE, "S_CUR_PAGE");
_Static_assert(__builtin_offsetof(struct guest_status, counter_seq) == S_COUNTER_SEQ, "S_COUNTER_SEQ");
_Static_assert(__builtin_offsetof(struct guest_status, counter_slot) == S_COUNTER_SLOT, "S_COUNTER_SLOT");
_Static_assert(__builtin_offsetof(struct guest_status, tsc) == S_TSC, "S_TSC");
_Static_assert(__builtin_offsetof(struct guest_status, net_rx) == S_NET_RX, "S_NET_RX");
_Static_assert(__builtin_offsetof(struct guest_status, net_tx) == S_NET_TX, "S_NET_TX");
_Static_assert(__builtin_offsetof(struct guest_status, net_seq) == S_NET_SEQ, "S_NET_SEQ");
_Static_assert(__builtin_offsetof(struct guest_status, net_ignored) == S_NET_IGNORED, "S_NET_IGNORED");
_Static_assert(__builtin_offsetof(struct guest_status, net_peer_ip) == S_NET_PEER_IP, "S_NET_PEER_IP");
_Static_assert(__builtin_offsetof(struct guest_status, net_peer_port) == S_NET_PEER_PORT, "S_NET_PEER_PORT");
_Static_assert(__builtin_offsetof(struct guest_status, disk_writes) == S_DISK_WRITES, "S_DISK_WRITES");
_Static_assert(__builtin_offsetof(struct guest_status, disk_reads) == S_DISK_READS, "S_DISK_READS");
_Static_assert(__builtin_offsetof(struct guest_status, disk_flushes) == S_DISK_FLUSHES, "S_DISK_FLUSHES");
_Static_assert(__builtin_offsetof(struct guest_status, disk_errors) == S_DISK_ERRORS, "S_DISK_ERRORS");
_Static_assert(__builtin_offsetof(struct guest_status, disk_batch) == S_DISK_BATCH, "S_DISK_BATCH");
_Static_assert(__builtin_offsetof(struct guest_status, disk_batch_n) == S_DISK_BATCH_N, "S_DISK_BATCH_N");
_Static_assert(__builtin_offsetof(struct guest_status, disk_bad_block) == S_DISK_BAD_BLOCK, "S_DISK_BAD_BLOCK");
_Static_assert(__builtin_offsetof(struct guest_status, disk_bad_status) == S_DISK_BAD_STATUS, "S_DISK_BAD_STATUS");
_Static_assert(sizeof(struct guest_status) <= CONSOLE_OFFSET, "status overlaps console");
_Static_assert(sizeof(struct disk_desc) == DISK_DESC_SIZE, "DISK_DESC_SIZE");
_Static_assert(__builtin_offsetof(struct disk_desc, op) == D_OP, "D_OP");
_Static_assert(__builtin_offsetof(struct disk_desc, flags) == D_FLAGS, "D_FLAGS");
_Static_assert(__builtin_offsetof(struct disk_desc, block) == D_BLOCK, "D_BLOCK");
_Static_assert(__builtin_offsetof(struct disk_desc, count) == D_COUNT, "D_COUNT");
_Static_assert(__builtin_offsetof(struct disk_desc, status) == D_STATUS, "D_STATUS");
_Static_assert(__builtin_offsetof(struct disk_desc, buf) == D_BUF, "D_BUF");
_Static_assert(DISK_ADDR >= NET_RX_ADDR + NET_SLOTS * NET_SLOT_SIZE, "net RX ring overlaps disk header");
_Static_assert(DISK_RING_ADDR >= DISK_ADDR + PAGE_SIZE, "disk header page");
_Static_assert(DISK_BUF_ADDR >= DISK_RING_ADDR + DISK_SLOTS * DISK_DESC_SIZE, "disk ring overlaps buffers");
_Static_assert(DATA_ADDR >= DISK_BUF_ADDR + DISK_BUF_SIZE, "disk buffers overlap data");
_Static_assert(DISK_BLOCK_SIZE == PAGE_SIZE, "disk stamps are page stamps");
_Static_assert(NET_TX_ADDR >= NET_ADDR + PAGE_SIZE, "net header page");
_Static_assert(NET_RX_ADDR >= NET_TX_ADDR + NET_SLOTS * NET_SLOT_SIZE, "net TX ring overlaps RX");
_Static_assert(NET_SLOT_DATA + NET_FRAME_MAX <= NET_SLOT_SIZE, "net slot");
_Static_assert(CONSOLE_OFFSET + CONSOLE_MAX <= STATUS_STRIDE, "console exceeds status page");

#define barrier() __asm__ __volatile__("" ::: "memory")
#define NORETURN __attribute__((noreturn))
#define COLD __attribute__((cold, noinline))

void guest_main(u64 vcpu) NORETURN;

static inline u64 rdtsc(void)
{
	u32 lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline __attribute__((unused)) void outl(u32 port, u32 val)
{
	__asm__ __volatile__("outl %0, %w1" : : "a"(val), "Nd"(port) : "memory");
}

/* Spin forever. Never HLT: it #GPs at CPL3 and there is no IDT. */
static inline NORETURN void hang(void)
{
	for (;;)
		__asm__ __volatile__("" ::: "memory");
}

static inline const struct guest_params *params(void)
{
	return (const struct guest_params *)GUEST_PARAMS_ADDR;
}

static inline vstatus *status_of(u64 vcpu)
{
	return (vstatus *)(GUEST_STATUS_ADDR + vcpu * STATUS_STRIDE);
}

/* Uniform in [0, n) from a 64-bit random value (multiply-shift). */
static inline u64 scale(u64 r, u64 n)
{
	return (u64)(((u128)r * n) >> 64);
}

/* xorshift64* (Vigna): state never zero. */
static inline u64 xs_next(u64 *s)
{
	u64 x = *s;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dUL;
}

/* Error path: status (if this vCPU has one) + CTRL_ERROR, then spin. */
static COLD NORETURN void fail(vstatus *st, u32 code)
{
	if (st) {
		st->magic = STATUS_MAGIC;
		st->error = code;
		st->state = GS_ERROR;
	}
	GUEST_OUTL(PORT_CONTROL, CTRL_ERROR | (code << 8));
	hang();
}

/* ---- console ---- */

struct con {
	volatile char *buf;
	u32 len;
};

static void con_str(struct con *c, const char *s)
{
	while (*s && c->len < CONSOLE_MAX)
		c->buf[c->len++] = *s++;
}

static void con_u64(struct con *c, u64 v)
{
	char tmp[20];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && c->len < CONSOLE_MAX)
		c->buf[c->len++] = tmp[--n];
}

static COLD void announce(vstatus *st, u64 vcpu, const struct guest_params *p)
{
	struct con c = { (volatile char *)st + CONSOLE_OFFSET, 0 };

	con_str(&c, "vcpu ");
	con_u64(&c, vcpu);
	con_str(&c, ": ");
	switch (p->workload) {
	case WL_IDLE:
		con_str(&c, "idle tick=");
		con_u64(&c, p->idle_tick_us ? p->idle_tick_us : 1000);
		con_str(&c, "us");
		break;
	case WL_DIRTY:
		con_str(&c, "dirty ");
		con_str(&c, p->pattern == PAT_SEQ ? "seq" :
			    p->pattern == PAT_RANDOM ? "random" : "hotcold");
		con_str(&c, " ws=");
		con_u64(&c, p->vcpu[vcpu].working_set);
		con_str(&c, " pages rate=");
		con_u64(&c, p->rate);
		con_str(&c, p->content == CONTENT_TEXT ? " content=text" :
			    p->content == CONTENT_SPARSE ? " content=sparse" : " content=stamp");
		if (p->pattern == PAT_HOTCOLD) {
			con_str(&c, " hot=");
			con_u64(&c, p->hot_pct);
			con_str(&c, "% hot_writes=");
			con_u64(&c, p->hot_write_pct);
			con_str(&c, "%");
		}
		break;
	case WL_UDP_ECHO:
	case WL_UDP_STREAM:
		if (vcpu != 0) {
			con_str(&c, "idle (the network workload runs on vcpu 0)");
			break;
		}
		con_str(&c, p->workload == WL_UDP_ECHO ? "udp-echo" : "udp-stream");
		con_str(&c, " port=");
		con_u64(&c, p->net_port);
		if (p->workload == WL_UDP_STREAM) {
			con_str(&c, " rate=");
			con_u64(&c, p->stream_rate);
			con_str(&c, " bytes=");
			con_u64(&c, p->stream_bytes);
		}
		break;
	case WL_DISK:
		if (vcpu != 0) {
			con_str(&c, "idle (the disk workload runs on vcpu 0)");
			break;
		}
		con_str(&c, "disk ");
		con_str(&c, p->pattern == PAT_SEQ ? "seq" :
			    p->pattern == PAT_RANDOM ? "random" : "hotcold");
		con_str(&c, " ws=");
		con_u64(&c, p->disk_ws);
		con_str(&c, " of ");
		con_u64(&c, p->disk_blocks);
		con_str(&c, " blocks rate=");
		con_u64(&c, p->rate);
		con_str(&c, " flush_every=");
		con_u64(&c, p->disk_flush_every);
		break;
	default:
		con_str(&c, "counter");
		break;
	}
	if (vcpu == 0 && p->net_service && p->workload != WL_UDP_ECHO && p->workload != WL_UDP_STREAM) {
		con_str(&c, p->net_service == WL_UDP_ECHO ? " + udp-echo" : " + udp-stream");
		con_str(&c, " port=");
		con_u64(&c, p->net_port);
	}
	if (p->phase_ops) {
		con_str(&c, " phase_ops=");
		con_u64(&c, p->phase_ops);
	}
	barrier();
	GUEST_OUTL(PORT_CONSOLE, c.len);
}

/* ---- phases ---- */

static inline void wait_go(const struct guest_params *p, u64 min)
{
	while (p->go < min)
		;
}

/* Phase `ph` (1-based) is complete: report it and wait for go >= ph + 1. */
static COLD void phase_done(vstatus *st, const struct guest_params *p, u64 ph)
{
	st->phase = ph;
	st->tsc = rdtsc();
	st->state = GS_WAITING;
	GUEST_OUTL(PORT_CONTROL, CTRL_DONE | (u32)(ph << 8));
	wait_go(p, ph + 1);
	st->state = GS_RUNNING;
}

/* ---- network service (vCPU 0, with any workload) ---- */

#define ETH_HLEN 14
#define IP_HLEN 20
#define UDP_HLEN 8
#define UDP_MAX_PAYLOAD (NET_FRAME_MAX - ETH_HLEN - IP_HLEN - UDP_HLEN)

/* Everything the network loop keeps lives here, on the stack: it travels with
 * the checkpoint like the rest of guest memory. */
struct net {
	int on;          /* this vCPU serves the network */
	u8 mac[6];
	u8 ip[4];
	u32 port;
	int stream;
	int subscribed;
	u8 peer_mac[6];
	u8 peer_ip[4];
	u32 peer_port;
	u64 seq;
	u64 interval;    /* stream: TSC ticks between datagrams, 0 = no pacing */
	u64 slack;
	u64 next;
	u32 bytes;       /* stream: payload bytes */
};

static inline volatile u32 *net_reg(u64 off)
{
	return (volatile u32 *)(GUEST_NET_ADDR + off);
}

static inline u32 get16(const u8 *b)
{
	return (u32)b[0] << 8 | b[1];
}

static inline void put16(u8 *b, u32 v)
{
	b[0] = (u8)(v >> 8);
	b[1] = (u8)v;
}

static inline void put64(u8 *b, u64 v)
{
	int i;

	for (i = 7; i >= 0; i--) {
		b[i] = (u8)v;
		v >>= 8;
	}
}

static inline void copy(u8 *d, const u8 *s, u32 n)
{
	while (n--)
		*d++ = *s++;
}

static inline int same(const u8 *a, const u8 *b, u32 n)
{
	while (n--)
		if (*a++ != *b++)
			return 0;
	return 1;
}

/* The Internet checksum of n bytes (n even). */
static u32 csum(const u8 *b, u32 n)
{
	u32 sum = 0;

	for (; n > 1; n -= 2, b += 2)
		sum += get16(b);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* The next free TX slot's frame buffer; waits while the ring is full (the
 * device drains it: a full ring back-pressures the guest, it never drops). */
static u8 *tx_slot(void)
{
	u32 prod = *net_reg(N_TX_PROD);

	while (prod - *net_reg(N_TX_CONS) >= NET_SLOTS)
		;
	return (u8 *)(GUEST_NET_TX_ADDR + (u64)(prod % NET_SLOTS) * NET_SLOT_SIZE + NET_SLOT_DATA);
}

/* Publish a device's ring up to producer index v, and kick the device (its
 * doorbell port) only if it went to sleep. The fence orders the producer
 * store before the kick-flag load; the device does the mirror image (see
 * abi.h). */
static void publish(volatile u32 *prod, u32 v, volatile u32 *kick, u32 port)
{
	barrier();
	*prod = v;
	__sync_synchronize();
	if (*kick) {
		*kick = 0;
		GUEST_OUTL(port, 0);
	}
}

/* Publish the frame in the slot tx_slot returned. */
static void tx_push(vstatus *st, u32 len)
{
	u32 p = *net_reg(N_TX_PROD);

	*(volatile u32 *)(GUEST_NET_TX_ADDR + (u64)(p % NET_SLOTS) * NET_SLOT_SIZE) = len;
	publish(net_reg(N_TX_PROD), p + 1, net_reg(N_TX_KICK), PORT_NET_KICK);
	st->net_tx++;
}

/* Ethernet + IPv4 + UDP headers from this guest to dst, for `payload` bytes;
 * returns the frame length. The UDP checksum is 0 (none), as IPv4 allows. */
static u32 udp_header(u8 *f, const struct net *n, const u8 *dmac, const u8 *dip, u32 dport, u32 payload, u64 id)
{
	u8 *ip = f + ETH_HLEN, *udp = ip + IP_HLEN;
	u32 i;

	copy(f, dmac, 6);
	copy(f + 6, n->mac, 6);
	put16(f + 12, 0x0800);
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, IP_HLEN + UDP_HLEN + payload);
	put16(ip + 4, (u32)id);
	put16(ip + 6, 0x4000); /* don't fragment */
	ip[8] = 64;
	ip[9] = 17;
	put16(ip + 10, 0);
	copy(ip + 12, n->ip, 4);
	copy(ip + 16, dip, 4);
	put16(ip + 10, csum(ip, IP_HLEN));
	put16(udp, n->port);
	put16(udp + 2, dport);
	put16(udp + 4, UDP_HLEN + payload);
	put16(udp + 6, 0);
	i = ETH_HLEN + IP_HLEN + UDP_HLEN + payload;
	return i;
}

static void arp_reply(const struct net *n, vstatus *st, const u8 *req)
{
	u8 *f = tx_slot(), *a = f + ETH_HLEN;
	u32 i;

	copy(f, req + 6, 6);
	copy(f + 6, n->mac, 6);
	put16(f + 12, 0x0806);
	put16(a, 1);
	put16(a + 2, 0x0800);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, 2);
	copy(a + 8, n->mac, 6);
	copy(a + 14, n->ip, 4);
	copy(a + 18, req + ETH_HLEN + 8, 10); /* the requester's MAC and IP */
	for (i = ETH_HLEN + 28; i < 60; i++) /* pad to the Ethernet minimum */
		f[i] = 0;
	tx_push(st, 60);
}

/* One datagram to port n->port: echo answers it, stream (re)subscribes its
 * sender. Returns 1 if it sent a datagram (an operation, for phases). */
static int udp_in(struct net *n, vstatus *st, const u8 *f, const u8 *ip, const u8 *udp, u32 plen)
{
	if (n->stream) {
		copy(n->peer_mac, f + 6, 6);
		copy(n->peer_ip, ip + 12, 4);
		n->peer_port = get16(udp);
		n->subscribed = 1;
		st->net_peer_ip = (u32)n->peer_ip[0] | (u32)n->peer_ip[1] << 8 |
				  (u32)n->peer_ip[2] << 16 | (u32)n->peer_ip[3] << 24;
		st->net_peer_port = n->peer_port;
		return 0;
	}
	{
		u8 *o = tx_slot();
		u32 len;

		if (plen > UDP_MAX_PAYLOAD - 8)
			plen = UDP_MAX_PAYLOAD - 8;
		n->seq++;
		len = udp_header(o, n, f + 6, ip + 12, get16(udp), 8 + plen, n->seq);
		put64(o + len - 8 - plen, n->seq);
		copy(o + len - plen, udp + UDP_HLEN, plen);
		st->net_seq = n->seq; /* before the frame exists: see stream_send */
		tx_push(st, len);
		return 1;
	}
}

/* One received frame; returns operations done (datagrams sent). */
static int frame_in(struct net *n, vstatus *st, const u8 *f, u32 len)
{
	static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	u32 type, ihl, tot, ulen;
	const u8 *ip, *udp;

	if (len < ETH_HLEN || len > NET_FRAME_MAX ||
	    (!same(f, n->mac, 6) && !same(f, bcast, 6)))
		goto ignore;
	type = get16(f + 12);
	if (type == 0x0806) {
		const u8 *a = f + ETH_HLEN;

		if (len < ETH_HLEN + 28 || get16(a) != 1 || get16(a + 2) != 0x0800 ||
		    a[4] != 6 || a[5] != 4 || get16(a + 6) != 1 || !same(a + 24, n->ip, 4))
			goto ignore;
		arp_reply(n, st, f);
		return 0;
	}
	if (type != 0x0800 || len < ETH_HLEN + IP_HLEN + UDP_HLEN)
		goto ignore;
	ip = f + ETH_HLEN;
	ihl = (u32)(ip[0] & 0xf) * 4;
	tot = get16(ip + 2);
	if ((ip[0] >> 4) != 4 || ihl < IP_HLEN || tot < ihl + UDP_HLEN || tot > len - ETH_HLEN ||
	    (get16(ip + 6) & 0x3fff) != 0 || ip[9] != 17 || !same(ip + 16, n->ip, 4) ||
	    csum(ip, ihl) != 0)
		goto ignore;
	udp = ip + ihl;
	ulen = get16(udp + 4);
	if (get16(udp + 2) != n->port || ulen < UDP_HLEN || ulen > tot - ihl)
		goto ignore;
	return udp_in(n, st, f, ip, udp, ulen - UDP_HLEN);
ignore:
	st->net_ignored++;
	return 0;
}

/* Take every frame the device has put on the RX ring. */
static int rx_poll(struct net *n, vstatus *st)
{
	volatile u32 *prod = net_reg(N_RX_PROD), *cons = net_reg(N_RX_CONS);
	u32 c = *cons;
	int ops = 0;

	while (c != *prod) {
		const u8 *slot = (const u8 *)(GUEST_NET_RX_ADDR + (u64)(c % NET_SLOTS) * NET_SLOT_SIZE);

		barrier();
		ops += frame_in(n, st, slot + NET_SLOT_DATA, *(const volatile u32 *)slot);
		barrier();
		*cons = ++c;
		st->net_rx++;
	}
	return ops;
}

static void stream_send(struct net *n, vstatus *st, u32 bytes)
{
	u8 *o = tx_slot(), *d;
	u32 len, i;

	n->seq++;
	len = udp_header(o, n, n->peer_mac, n->peer_ip, n->peer_port, bytes, n->seq);
	d = o + len - bytes;
	put64(d, n->seq);
	put64(d + 8, rdtsc());
	for (i = 16; i < bytes; i++)
		d[i] = (u8)(n->seq + i);
	/* Published before the frame goes on the ring, so a host that reads the
	 * status in a pause knows every datagram numbered above it was not
	 * produced yet. */
	st->net_seq = n->seq;
	tx_push(st, len);
}


static void net_init(struct net *n, const struct guest_params *p, u32 service)
{
	int i;

	n->on = service != 0;
	for (i = 0; i < 6; i++)
		n->mac[i] = (u8)(p->net_mac >> (8 * i));
	for (i = 0; i < 4; i++)
		n->ip[i] = (u8)(p->net_ip >> (8 * i));
	n->port = p->net_port;
	n->stream = service == WL_UDP_STREAM;
	n->subscribed = 0;
	n->peer_port = 0;
	n->seq = 0;
	n->interval = p->stream_rate ? p->tsc_khz * 1000 / p->stream_rate : 0;
	n->slack = p->tsc_khz * 100; /* 100 ms */
	n->next = rdtsc();
	n->bytes = p->stream_bytes;
}

/* One turn of the network service: take received frames, send the stream's
 * next datagram when it is due. Returns the datagrams sent. Workloads call
 * it between their own operations; it costs one load when nothing came. */
static int net_tick(struct net *n, vstatus *st)
{
	int ops;

	if (!n->on)
		return 0;
	ops = rx_poll(n, st);
	if (n->stream && n->subscribed) {
		u64 now = rdtsc();

		if (!n->interval || (s64)(now - n->next) >= 0) {
			n->next = now - n->next > n->slack ? now : n->next;
			n->next += n->interval;
			stream_send(n, st, n->bytes);
			ops++;
		}
	}
	return ops;
}

/* The udp-echo and udp-stream workloads: the service alone; its datagrams are
 * the operations (iterations, phases). */
static NORETURN void run_net(vstatus *st, const struct guest_params *p, struct net *n)
{
	const u64 phase_ops = p->phase_ops;
	u64 left = phase_ops, ph = 0, polls = 0;
	int ops;

	for (;;) {
		ops = net_tick(n, st);
		if (ops) {
			st->iterations = n->seq;
			st->tsc = rdtsc();
		} else if ((++polls & 0xfff) == 0) {
			st->tsc = rdtsc();
		}
		for (; ops > 0 && left; ops--) {
			if (--left == 0) {
				phase_done(st, p, ++ph);
				left = phase_ops;
				n->next = rdtsc();
			}
		}
	}
}

/* ---- workloads ---- */

static NORETURN void run_idle(vstatus *st, const struct guest_params *p, struct net *n)
{
	u64 khz = p->tsc_khz, us = p->idle_tick_us ? p->idle_tick_us : 1000;
	u64 ticks = khz * (us / 1000) + khz * (us % 1000) / 1000;
	u64 phase_ops = p->phase_ops, left = phase_ops, ph = 0, it = 0;
	u64 t0 = rdtsc(), now;

	for (;;) {
		while ((now = rdtsc()) - t0 < ticks)
			net_tick(n, st);
		t0 = now;
		st->iterations = ++it;
		st->tsc = now;
		if (left && --left == 0) {
			phase_done(st, p, ++ph);
			left = phase_ops;
			t0 = rdtsc();
		}
	}
}

/* write_page writes version v of the page at w, whose stamp word is w0, with
 * the content abi.h describes. The words that say which version the page (or
 * line) holds go last, so a page caught half written is at most cur_page. */
static inline void write_page(u64 *w, u64 w0, u64 v, u32 content, const u64 *words)
{
	int k;

	if (content == CONTENT_SPARSE) {
		u64 l = v % (PAGE_SIZE / 64), *line = w + 8 * l;
		u64 f = fill_base(w0 ^ (l << 48), v) + FILL_K;

		for (k = 1; k < 8; k++) {
			line[k] = f;
			f += FILL_K;
		}
		barrier();
		line[0] = v;
		barrier();
		return;
	}
	if (content == CONTENT_TEXT) {
		u64 x = fill_base(w0, v) | 1;

		for (k = 2; k < PAGE_SIZE / 8; k++) {
			x = xorshift64(x);
			w[k] = words[x >> 60];
		}
	} else {
		u64 f = fill_base(w0, v) + 2 * FILL_K;

		for (k = 2; k < PAGE_SIZE / 8; k++) {
			w[k] = f;
			f += FILL_K;
		}
	}
	barrier();
	w[1] = v;
	barrier();
	w[0] = w0;
	barrier();
}

static NORETURN void run_dirty(vstatus *st, const struct guest_params *p, u64 vcpu, struct net *n)
{
	const u64 base = p->vcpu[vcpu].base, W = p->vcpu[vcpu].working_set;
	const u64 w0_hi = vcpu << 56;
	const u32 pattern = p->pattern;
	const u32 content = p->content ? p->content : CONTENT_STAMP;
	const u64 hot_pct = p->hot_pct > 100 ? 100 : p->hot_pct;
	const u64 hot_w = p->hot_write_pct;
	const u64 H0 = W * hot_pct / 100, H = H0 ? H0 : 1, C = W - H;
	const u64 interval = p->rate ? p->tsc_khz * 1000 / p->rate : 0;
	const u64 slack = p->tsc_khz * 100; /* 100 ms */
	const u64 phase_ops = p->phase_ops;
	u64 left = phase_ops, ph = 0, v = 0, seq = 0;
	u64 rs = mix64(p->seed ^ ((vcpu + 1) * FILL_K));
	u64 next = rdtsc();
	u64 words[TEXT_WORDS];
	int t;

	for (t = 0; t < TEXT_WORDS; t++)
		words[t] = text_word((u64)t << 60);
	if (!rs)
		rs = FILL_K;
	for (;;) {
		u64 idx, now;

		if (interval) {
			while ((s64)((now = rdtsc()) - next) < 0)
				net_tick(n, st);
			next = now - next > slack ? now : next;
			next += interval;
		}
		if (pattern == PAT_SEQ) {
			idx = seq;
			if (++seq == W)
				seq = 0;
		} else if (pattern == PAT_RANDOM) {
			idx = scale(xs_next(&rs), W);
		} else { /* PAT_HOTCOLD */
			u64 hot = scale(xs_next(&rs), 100) < hot_w;

			if (hot || !C)
				idx = scale(xs_next(&rs), H);
			else
				idx = H + scale(xs_next(&rs), C);
		}

		v++;
		st->cur_page = idx + 1;
		barrier();
		write_page((u64 *)(base + (idx << 12)), w0_hi | idx, v, content, words);
		st->writes = v;
		st->iterations = v;
		st->tsc = rdtsc();
		st->cur_page = 0;
		if ((v & 15) == 0)
			net_tick(n, st);

		if (left && --left == 0) {
			phase_done(st, p, ++ph);
			left = phase_ops;
			next = rdtsc();
		}
	}
}

static NORETURN void run_counter(vstatus *st, const struct guest_params *p, struct net *n)
{
	const u64 phase_ops = p->phase_ops;
	u64 left = phase_ops, ph = 0, c = 0, h = COUNTER_H0;

	for (;;) {
		c++;
		h = counter_step(h, c);
		st->counter_slot[c & 1][0] = c;
		st->counter_slot[c & 1][1] = h;
		st->counter_seq = c;
		st->iterations = c;
		if ((c & 0xffff) == 0)
			st->tsc = rdtsc();
		if ((c & 0x3ff) == 0)
			net_tick(n, st);
		if (left && --left == 0) {
			phase_done(st, p, ++ph);
			left = phase_ops;
		}
	}
}


/* ---- disk workload (vCPU 0) ---- */

#define DISK_BATCH 32     /* most blocks one write batch carries */
#define DISK_RUN 8        /* blocks per descriptor while sweeping sequentially */
#define DISK_READS 4      /* random blocks read back and verified after each write batch */
#define DISK_FUA_EVERY 8  /* every 8th write batch ends with a FUA write */
/* Write buffers are the lower half of the buffer area, read buffers the upper
 * half. The guest never stores into a read buffer: only the device's reads
 * write there, so a dirty harvest that shows them proves the VMM reported its
 * DMA (testvm's disk dirty test relies on it). */
#define DISK_RBUF (DISK_BUF_SIZE / DISK_BLOCK_SIZE / 2)

_Static_assert(DISK_BATCH <= DISK_RBUF && DISK_BATCH <= DISK_SLOTS, "disk batch");
_Static_assert(DISK_READS <= DISK_SLOTS, "disk reads");

/* The disk workload's state, on the stack (it travels with a checkpoint). */
struct disk {
	u64 ws;                /* working-set blocks */
	volatile u64 *table;   /* table[b]: version of block b on the disk, 0 = never written */
	u32 prod;              /* the guest's copy of req_prod */
	u32 pattern;
	u64 seq;               /* next block of the sequential sweep */
	int sweeping;          /* Seq: always; the others: until the first sweep is done */
	u64 rs;                /* xorshift64* state */
	u64 hot, hot_w;        /* hotcold: hot blocks, percent of writes that go to them */
	u64 batches;           /* write batches submitted */
	u64 rslot;             /* next read buffer */
};

static inline volatile u32 *disk_reg(u64 off)
{
	return (volatile u32 *)(GUEST_DISK_ADDR + off);
}

static inline volatile struct disk_desc *disk_slot(u32 i)
{
	return (volatile struct disk_desc *)(GUEST_DISK_RING_ADDR + (u64)(i % DISK_SLOTS) * DISK_DESC_SIZE);
}

/* The guest address of block-sized buffer i of the buffer area. */
static inline u64 disk_buf(u64 i)
{
	return GUEST_DISK_BUF_ADDR + i * DISK_BLOCK_SIZE;
}

static void disk_stamp(u64 *w, u64 block, u64 v)
{
	const u64 w0 = DISK_STAMP_TAG | block;
	u64 f = fill_base(w0, v) + 2 * FILL_K;
	int k;

	w[0] = w0;
	w[1] = v;
	for (k = 2; k < DISK_BLOCK_SIZE / 8; k++) {
		w[k] = f;
		f += FILL_K;
	}
}

/* 1 if w holds the stamp of write v of block (all zero for v = 0). */
static int disk_check(const volatile u64 *w, u64 block, u64 v)
{
	u64 f;
	int k;

	if (!v) {
		for (k = 0; k < DISK_BLOCK_SIZE / 8; k++)
			if (w[k])
				return 0;
		return 1;
	}
	if (w[0] != (DISK_STAMP_TAG | block) || w[1] != v)
		return 0;
	f = fill_base(DISK_STAMP_TAG | block, v) + 2 * FILL_K;
	for (k = 2; k < DISK_BLOCK_SIZE / 8; k++) {
		if (w[k] != f)
			return 0;
		f += FILL_K;
	}
	return 1;
}

static COLD NORETURN void disk_fail(vstatus *st, u32 code, u64 block, u32 status)
{
	st->disk_errors++;
	st->disk_bad_block = block + 1;
	st->disk_bad_status = status;
	fail(st, code);
}

/* Publish descriptors prod .. prod+n-1 (see publish) and wait until the
 * device completed all of them. */
static void disk_run(struct disk *d, u32 n)
{
	volatile u32 *cons = disk_reg(DK_REQ_CONS);

	d->prod += n;
	publish(disk_reg(DK_REQ_PROD), d->prod, disk_reg(DK_KICK), PORT_DISK_KICK);
	while (*cons != d->prod)
		;
	barrier();
}

static u64 disk_pick(struct disk *d)
{
	if (d->pattern == PAT_HOTCOLD) {
		u64 cold = d->ws - d->hot;

		if (!cold || scale(xs_next(&d->rs), 100) < d->hot_w)
			return scale(xs_next(&d->rs), d->hot);
		return d->hot + scale(xs_next(&d->rs), cold);
	}
	return scale(xs_next(&d->rs), d->ws);
}

/* One batch of n block writes (1 <= n <= DISK_BATCH) with versions
 * disk_writes+1 .. disk_writes+n; returns once the device completed them and
 * their versions are in the table. While it is in flight, disk_batch and
 * disk_batch_n name its descriptors, so a host that looks at a checkpoint
 * knows which of them the device had completed (req_cons) and which not. */
static void disk_write_batch(struct disk *d, vstatus *st, u64 n)
{
	const u32 first = d->prod;
	const u64 v0 = st->disk_writes;
	u64 used = 0;
	u32 nd = 0, i;

	while (used < n) {
		volatile struct disk_desc *ds = disk_slot(first + nd);
		u64 block, run = 1, k;

		if (d->sweeping) {
			block = d->seq;
			run = n - used;
			if (run > DISK_RUN)
				run = DISK_RUN;
			if (run > d->ws - block)
				run = d->ws - block;
			d->seq += run;
			if (d->seq == d->ws) {
				d->seq = 0;
				if (d->pattern != PAT_SEQ)
					d->sweeping = 0;
			}
		} else {
			block = disk_pick(d);
		}
		for (k = 0; k < run; k++)
			disk_stamp((u64 *)disk_buf(used + k), block + k, v0 + used + k + 1);
		ds->op = DISK_OP_WRITE;
		ds->flags = 0;
		ds->block = block;
		ds->count = (u32)run;
		ds->status = 0;
		ds->buf = disk_buf(used);
		used += run;
		nd++;
	}
	if (++d->batches % DISK_FUA_EVERY == 0)
		disk_slot(first + nd - 1)->flags = DISK_F_FUA;
	st->disk_batch = first;
	st->disk_batch_n = nd;
	barrier();
	disk_run(d, nd);
	for (i = 0; i < nd; i++) {
		volatile struct disk_desc *ds = disk_slot(first + i);
		const u64 block = ds->block, *w = (const u64 *)ds->buf;
		u64 k;

		if (ds->status != DISK_S_OK)
			disk_fail(st, GERR_DISK_IO, block, ds->status);
		for (k = 0; k < ds->count; k++)
			d->table[block + k] = w[k * (DISK_BLOCK_SIZE / 8) + 1];
	}
	barrier();
	st->disk_writes = v0 + n;
	st->iterations = v0 + n;
	st->tsc = rdtsc();
	barrier();
	st->disk_batch_n = 0;
}

/* Read back up to DISK_READS random blocks written before, in one batch, and
 * check each against the version table. */
static void disk_verify(struct disk *d, vstatus *st)
{
	const u32 first = d->prod;
	u32 nd = 0, i;

	for (i = 0; i < DISK_READS; i++) {
		u64 b = scale(xs_next(&d->rs), d->ws);
		volatile struct disk_desc *ds;

		if (!d->table[b])
			continue;
		ds = disk_slot(first + nd++);
		ds->op = DISK_OP_READ;
		ds->flags = 0;
		ds->block = b;
		ds->count = 1;
		ds->status = 0;
		ds->buf = disk_buf(DISK_RBUF + d->rslot);
		d->rslot = (d->rslot + 1) % DISK_RBUF;
	}
	if (!nd)
		return;
	disk_run(d, nd);
	for (i = 0; i < nd; i++) {
		volatile struct disk_desc *ds = disk_slot(first + i);
		const u64 b = ds->block;

		if (ds->status != DISK_S_OK)
			disk_fail(st, GERR_DISK_IO, b, ds->status);
		if (!disk_check((const volatile u64 *)ds->buf, b, d->table[b]))
			disk_fail(st, GERR_DISK_VERIFY, b, 0);
		st->disk_reads++;
	}
}

static void disk_flush(struct disk *d, vstatus *st)
{
	volatile struct disk_desc *ds = disk_slot(d->prod);

	ds->op = DISK_OP_FLUSH;
	ds->flags = 0;
	ds->block = 0;
	ds->count = 0;
	ds->status = 0;
	ds->buf = 0;
	disk_run(d, 1);
	if (ds->status != DISK_S_OK)
		disk_fail(st, GERR_DISK_IO, (u64)-1, ds->status);
	st->disk_flushes++;
}

/* The disk workload: block writes (a sequential sweep of the working set,
 * then random or hot/cold writes, or sweeps forever with Seq) in batches,
 * each followed by verified reads of random earlier writes; a flush every
 * disk_flush_every writes. Block writes are its operations. */
static NORETURN void run_disk(vstatus *st, const struct guest_params *p, struct net *n)
{
	const u64 interval = p->rate ? p->tsc_khz * 1000 / p->rate : 0;
	const u64 slack = p->tsc_khz * 100; /* 100 ms */
	const u64 phase_ops = p->phase_ops;
	const u64 hot_pct = p->hot_pct > 100 ? 100 : p->hot_pct;
	u64 left = phase_ops, ph = 0, next = rdtsc(), since_flush = 0;
	struct disk d;

	d.ws = p->disk_ws;
	d.table = (volatile u64 *)p->vcpu[0].base;
	d.prod = *disk_reg(DK_REQ_PROD);
	d.pattern = p->pattern;
	d.seq = 0;
	d.sweeping = 1;
	d.rs = mix64(p->seed ^ FILL_K);
	if (!d.rs)
		d.rs = FILL_K;
	d.hot = d.ws * hot_pct / 100;
	if (!d.hot)
		d.hot = 1;
	d.hot_w = p->hot_write_pct;
	d.batches = 0;
	d.rslot = 0;
	for (;;) {
		u64 nb = interval ? 1 : DISK_BATCH, now;

		if (left && nb > left)
			nb = left;
		if (interval) {
			while ((s64)((now = rdtsc()) - next) < 0)
				net_tick(n, st);
			next = now - next > slack ? now : next;
			next += interval;
		}
		disk_write_batch(&d, st, nb);
		disk_verify(&d, st);
		since_flush += nb;
		if (p->disk_flush_every && since_flush >= p->disk_flush_every) {
			disk_flush(&d, st);
			since_flush = 0;
		}
		net_tick(n, st);
		if (left) {
			left -= nb;
			if (left == 0) {
				phase_done(st, p, ++ph);
				left = phase_ops;
				next = rdtsc();
			}
		}
	}
}


/* ---- entry ---- */

void guest_main(u64 vcpu)
{
	const struct guest_params *p = params();
	const struct guest_vcpu_params *vp;
	struct net net;
	u32 service;
	vstatus *st;

	if (vcpu >= MAX_VCPUS)
		fail(0, GERR_BAD_VCPU); /* no status page to write */
	st = status_of(vcpu);

	if (p->magic != PARAMS_MAGIC || p->abi_version != ABI_VERSION ||
	    p->nr_vcpus < 1 || p->nr_vcpus > MAX_VCPUS || p->tsc_khz == 0)
		fail(st, GERR_BAD_PARAMS);
	if (vcpu >= p->nr_vcpus)
		fail(st, GERR_BAD_VCPU);
	vp = &p->vcpu[vcpu];
	if ((vp->base & (PAGE_SIZE - 1)) || vp->base < DATA_ADDR || vp->pages < 1 ||
	    vp->pages > (0 - vp->base) / PAGE_SIZE || /* base + pages*4K must not wrap */
	    vp->working_set < 1 || vp->working_set > vp->pages)
		fail(st, GERR_BAD_REGION);
	if (p->workload < WL_IDLE || p->workload > WL_DISK)
		fail(st, GERR_BAD_WORKLOAD);
	service = p->workload == WL_UDP_ECHO || p->workload == WL_UDP_STREAM ? p->workload : p->net_service;
	if (service != 0 && service != WL_UDP_ECHO && service != WL_UDP_STREAM)
		fail(st, GERR_BAD_NET);
	if (service && (!(p->net_flags & NET_PRESENT) || p->net_port == 0 || p->net_port > 0xffff ||
			(service == WL_UDP_STREAM && (p->stream_bytes < 16 || p->stream_bytes > UDP_MAX_PAYLOAD))))
		fail(st, GERR_BAD_NET);
	if ((p->workload == WL_DIRTY || p->workload == WL_DISK) && p->pattern != PAT_SEQ &&
	    p->pattern != PAT_RANDOM && p->pattern != PAT_HOTCOLD)
		fail(st, GERR_BAD_PATTERN);
	if (p->content > CONTENT_SPARSE)
		fail(st, GERR_BAD_PARAMS);
	/* The version table (8 bytes a block) must fit in vCPU 0's region. */
	if (p->workload == WL_DISK &&
	    (!(p->disk_flags & DISK_PRESENT) || p->disk_ws < 1 || p->disk_ws > p->disk_blocks ||
	     p->disk_ws > p->vcpu[0].pages * (PAGE_SIZE / 8)))
		fail(st, GERR_BAD_DISK);

	st->state = GS_BOOT;
	st->error = 0;
	st->iterations = 0;
	st->writes = 0;
	st->phase = 0;
	st->cur_page = 0;
	st->counter_seq = 0;
	st->counter_slot[0][0] = 0;
	st->counter_slot[0][1] = 0;
	st->counter_slot[1][0] = 0;
	st->counter_slot[1][1] = 0;
	st->net_rx = 0;
	st->net_tx = 0;
	st->net_seq = 0;
	st->net_ignored = 0;
	st->net_peer_ip = 0;
	st->net_peer_port = 0;
	st->disk_writes = 0;
	st->disk_reads = 0;
	st->disk_flushes = 0;
	st->disk_errors = 0;
	st->disk_batch = 0;
	st->disk_batch_n = 0;
	st->disk_bad_block = 0;
	st->disk_bad_status = 0;
	st->tsc = rdtsc();
	st->magic = STATUS_MAGIC;
	st->state = GS_RUNNING;

	net_init(&net, p, vcpu == 0 ? service : 0);
	announce(st, vcpu, p);
	GUEST_OUTL(PORT_CONTROL, CTRL_READY);
	if (p->phase_ops)
		wait_go(p, 1);

	switch (p->workload) {
	case WL_IDLE:
		run_idle(st, p, &net);
	case WL_DIRTY:
		run_dirty(st, p, vcpu, &net);
	case WL_UDP_ECHO:
	case WL_UDP_STREAM:
		if (vcpu == 0)
			run_net(st, p, &net);
		run_idle(st, p, &net);
	case WL_DISK:
		if (vcpu == 0)
			run_disk(st, p, &net);
		run_idle(st, p, &net);
	default:
		run_counter(st, p, &net);
	}
}
