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
#ifndef GUEST_OUTL
#define GUEST_OUTL(port, val) outl(port, val)
#endif

typedef unsigned char u8;
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
_Static_assert(__builtin_offsetof(struct guest_params, vcpu) == P_VCPU, "P_VCPU");
_Static_assert(sizeof(struct guest_vcpu_params) == P_VCPU_STRIDE, "P_VCPU_STRIDE");
_Static_assert(__builtin_offsetof(struct guest_vcpu_params, base) == PV_BASE, "PV_BASE");
_Static_assert(__builtin_offsetof(struct guest_vcpu_params, pages) == PV_PAGES, "PV_PAGES");
_Static_assert(__builtin_offsetof(struct guest_vcpu_params, working_set) == PV_WORKING_SET, "PV_WORKING_SET");
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
_Static_assert(sizeof(struct guest_status) <= CONSOLE_OFFSET, "status overlaps console");
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
		if (p->pattern == PAT_HOTCOLD) {
			con_str(&c, " hot=");
			con_u64(&c, p->hot_pct);
			con_str(&c, "% hot_writes=");
			con_u64(&c, p->hot_write_pct);
			con_str(&c, "%");
		}
		break;
	default:
		con_str(&c, "counter");
		break;
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

/* ---- workloads ---- */

static NORETURN void run_idle(vstatus *st, const struct guest_params *p)
{
	u64 khz = p->tsc_khz, us = p->idle_tick_us ? p->idle_tick_us : 1000;
	u64 ticks = khz * (us / 1000) + khz * (us % 1000) / 1000;
	u64 phase_ops = p->phase_ops, left = phase_ops, ph = 0, it = 0;
	u64 t0 = rdtsc(), now;

	for (;;) {
		while ((now = rdtsc()) - t0 < ticks)
			;
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

static NORETURN void run_dirty(vstatus *st, const struct guest_params *p, u64 vcpu)
{
	const u64 base = p->vcpu[vcpu].base, W = p->vcpu[vcpu].working_set;
	const u64 w0_hi = vcpu << 56;
	const u32 pattern = p->pattern;
	const u64 hot_pct = p->hot_pct > 100 ? 100 : p->hot_pct;
	const u64 hot_w = p->hot_write_pct;
	const u64 H0 = W * hot_pct / 100, H = H0 ? H0 : 1, C = W - H;
	const u64 interval = p->rate ? p->tsc_khz * 1000 / p->rate : 0;
	const u64 slack = p->tsc_khz * 100; /* 100 ms */
	const u64 phase_ops = p->phase_ops;
	u64 left = phase_ops, ph = 0, v = 0, seq = 0;
	u64 rs = mix64(p->seed ^ ((vcpu + 1) * FILL_K));
	u64 next = rdtsc();

	if (!rs)
		rs = FILL_K;
	for (;;) {
		u64 idx, now;

		if (interval) {
			while ((s64)((now = rdtsc()) - next) < 0)
				;
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
		{
			u64 *w = (u64 *)(base + (idx << 12));
			const u64 w0 = w0_hi | idx;
			u64 f = fill_base(w0, v) + 2 * FILL_K;
			int k;

			for (k = 2; k < PAGE_SIZE / 8; k++) {
				w[k] = f;
				f += FILL_K;
			}
			barrier();
			w[1] = v;
			barrier();
			w[0] = w0;
			barrier();
		}
		st->writes = v;
		st->iterations = v;
		st->tsc = rdtsc();
		st->cur_page = 0;

		if (left && --left == 0) {
			phase_done(st, p, ++ph);
			left = phase_ops;
			next = rdtsc();
		}
	}
}

static NORETURN void run_counter(vstatus *st, const struct guest_params *p)
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
		if (left && --left == 0) {
			phase_done(st, p, ++ph);
			left = phase_ops;
		}
	}
}

/* ---- entry ---- */

void guest_main(u64 vcpu)
{
	const struct guest_params *p = params();
	const struct guest_vcpu_params *vp;
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
	if (p->workload != WL_IDLE && p->workload != WL_DIRTY && p->workload != WL_COUNTER)
		fail(st, GERR_BAD_WORKLOAD);
	if (p->workload == WL_DIRTY && p->pattern != PAT_SEQ &&
	    p->pattern != PAT_RANDOM && p->pattern != PAT_HOTCOLD)
		fail(st, GERR_BAD_PATTERN);

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
	st->tsc = rdtsc();
	st->magic = STATUS_MAGIC;
	st->state = GS_RUNNING;

	announce(st, vcpu, p);
	GUEST_OUTL(PORT_CONTROL, CTRL_READY);
	if (p->phase_ops)
		wait_go(p, 1);

	switch (p->workload) {
	case WL_IDLE:
		run_idle(st, p);
	case WL_DIRTY:
		run_dirty(st, p, vcpu);
	default:
		run_counter(st, p);
	}
}
