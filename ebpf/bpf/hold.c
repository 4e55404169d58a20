//go:build ignore

/* hold.c: the two TCX programs of repagent's network output gate.
 *
 * hold (tap ingress: what the VM sends) copies each frame into the ring
 * buffer tagged with the open epoch and drops it, while the gate holds; it
 * lets frames pass untouched otherwise, unless frames held earlier are still
 * on their way out (after the gate stopped holding), in which case it holds
 * the frame behind them. Frames the gate releases come back to it carrying
 * the gate's mark: it clears the mark, counts them and lets them pass, so
 * everything after it sees the VM's frame as the VM sent it.
 *
 * release (tap egress: what is sent to the VM) turns frames sent by the
 * gate's own packet sockets around: it marks them and redirects them to the
 * tap's ingress. Every other frame passes at once.
 *
 * The Go side (gate.go, owner.go) writes the control block and reads the
 * ring. struct gate_ctl and struct epoch_drops are mirrored by the types
 * bpf2go generates (hold_x86_bpfel.go), struct rec_hdr by hand (record.go).
 */

#include "helpers.h"

char __license[] SEC("license") = "Apache-2.0";

/* Gate modes (struct gate_ctl.mode). */
enum {
	MODE_PASS = 0,
	MODE_HOLD = 1,
};

/* Flags of a held record (struct rec_hdr.flags). */
enum {
	/* The frame carried a VLAN tag the kernel had already moved out of the
	 * data into skb metadata; hold put it back in before the copy. */
	REC_VLAN_RESTORED = 1,
	/* Held in pass mode, behind frames held earlier that were still on
	 * their way back. */
	REC_DRAIN = 2,
};

/* Number of per-epoch drop slots (struct epoch_drops), indexed by epoch. */
#define EPOCH_SLOTS 1024

/* The gate's control block: the single element of the ctl map, memory-mapped
 * by the gate. The first cache line is written by userspace only, the rest
 * by the programs only (atomic adds), so neither side ever overwrites what
 * the other writes. */
struct gate_ctl {
	/* Written by userspace. */
	__u64 mode;           /* MODE_PASS or MODE_HOLD */
	__u64 epoch;          /* epoch that frames held from now on belong to */
	__u64 release_cookie; /* socket cookie of the gate's release socket */
	__u64 inject_cookie;  /* socket cookie of the gate's inject socket */
	__u64 magic;          /* mark of released frames; magic|1 marks injected ones */
	__u64 skipped;        /* held frames userspace will never send back */
	__u64 _user_pad[2];

	/* Written by the programs. */
	__u64 seq;            /* frames that entered the hold path */
	__u64 held;           /* frames put into the ring */
	__u64 held_bytes;
	__u64 reentered;      /* released frames seen back at ingress */
	__u64 injected;       /* injected frames seen at ingress */
	__u64 redirected;     /* frames turned around at egress */
	__u64 ring_full;      /* frames dropped: no room in the ring */
	__u64 ring_full_bytes;
	__u64 too_big;        /* frames dropped: larger than the largest record */
	__u64 too_big_bytes;
	__u64 errors;         /* frames dropped: copy or VLAN restore failed */
	__u64 _prog_pad[5];
};

/* Drops of one epoch, in slot epoch % EPOCH_SLOTS. Userspace zeroes the
 * counters and then writes epoch when it opens the epoch; the programs count
 * into a slot only while its epoch is the frame's. */
struct epoch_drops {
	__u64 epoch;
	__u64 ring_full;
	__u64 ring_full_bytes;
	__u64 too_big;
	__u64 too_big_bytes;
};

/* The header of a ring record; len bytes of the frame follow it. Mirrored by
 * hand in record.go (it is no map's type, so it is not in the BTF). */
struct rec_hdr {
	__u64 epoch; /* epoch open when the frame was held */
	__u64 seq;   /* ctl.seq when the frame entered the hold path */
	__u64 ktime; /* bpf_ktime_get_ns (CLOCK_MONOTONIC) at hold */
	__u32 len;   /* frame length in bytes */
	__u32 flags; /* REC_* */
};

/* Frame capacity of each record size class. bpf_ringbuf_reserve takes a
 * constant size, so a frame goes into the smallest class it fits. */
#define CLASS0 96
#define CLASS1 480
#define CLASS2 1536
#define CLASS3 9216
#define CLASS4 65544 /* 64 KiB + a VLAN tag, rounded up to 8 */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gate_ctl);
} ctl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, EPOCH_SLOTS);
	__type(key, __u32);
	__type(value, struct epoch_drops);
} drops SEC(".maps");

/* Size is set by the gate before loading (Config.RingSize). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} ring SEC(".maps");

static __always_inline struct epoch_drops *drop_slot(__u64 epoch)
{
	__u32 key = epoch % EPOCH_SLOTS;
	struct epoch_drops *d = bpf_map_lookup_elem(&drops, &key);

	if (d && READ_ONCE(d->epoch) == epoch)
		return d;
	return 0;
}

static __always_inline int drop_ring_full(struct gate_ctl *c, __u64 epoch, __u32 len)
{
	struct epoch_drops *d = drop_slot(epoch);

	__sync_fetch_and_add(&c->ring_full, 1);
	__sync_fetch_and_add(&c->ring_full_bytes, len);
	if (d) {
		__sync_fetch_and_add(&d->ring_full, 1);
		__sync_fetch_and_add(&d->ring_full_bytes, len);
	}
	return TCX_DROP;
}

static __always_inline int drop_too_big(struct gate_ctl *c, __u64 epoch, __u32 len)
{
	struct epoch_drops *d = drop_slot(epoch);

	__sync_fetch_and_add(&c->too_big, 1);
	__sync_fetch_and_add(&c->too_big_bytes, len);
	if (d) {
		__sync_fetch_and_add(&d->too_big, 1);
		__sync_fetch_and_add(&d->too_big_bytes, len);
	}
	return TCX_DROP;
}

/* put copies the frame into a record of capacity cap (a constant after
 * inlining, as bpf_ringbuf_reserve needs) and drops it. len <= cap. */
static __always_inline int put(struct __sk_buff *skb, struct gate_ctl *c, __u64 epoch,
			       __u64 seq, __u32 len, __u32 flags, const __u32 cap)
{
	struct rec_hdr *r = bpf_ringbuf_reserve(&ring, sizeof(*r) + cap, 0);

	if (!r)
		return drop_ring_full(c, epoch, len);
	r->epoch = epoch;
	r->seq = seq;
	r->ktime = bpf_ktime_get_ns();
	r->len = len;
	r->flags = flags;
	if (len < 1 || len > cap || bpf_skb_load_bytes(skb, 0, r + 1, len) < 0) {
		bpf_ringbuf_discard(r, 0);
		__sync_fetch_and_add(&c->errors, 1);
		return TCX_DROP;
	}
	bpf_ringbuf_submit(r, 0);
	__sync_fetch_and_add(&c->held, 1);
	__sync_fetch_and_add(&c->held_bytes, len);
	return TCX_DROP;
}

static __always_inline int hold_frame(struct __sk_buff *skb, struct gate_ctl *c, __u32 flags)
{
	__u64 epoch = READ_ONCE(c->epoch);
	__u64 seq = __sync_fetch_and_add(&c->seq, 1);
	__u32 len;

	/* The kernel strips a VLAN tag into skb metadata before tc ingress;
	 * put it back so the released frame is the one the VM sent. */
	if (skb->vlan_present) {
		if (bpf_skb_vlan_push(skb, skb->vlan_proto, skb->vlan_tci) < 0) {
			__sync_fetch_and_add(&c->errors, 1);
			return TCX_DROP;
		}
		flags |= REC_VLAN_RESTORED;
	}
	len = skb->len;
	if (len <= CLASS0)
		return put(skb, c, epoch, seq, len, flags, CLASS0);
	if (len <= CLASS1)
		return put(skb, c, epoch, seq, len, flags, CLASS1);
	if (len <= CLASS2)
		return put(skb, c, epoch, seq, len, flags, CLASS2);
	if (len <= CLASS3)
		return put(skb, c, epoch, seq, len, flags, CLASS3);
	if (len <= CLASS4)
		return put(skb, c, epoch, seq, len, flags, CLASS4);
	return drop_too_big(c, epoch, len);
}

SEC("tcx/ingress")
int hold(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct gate_ctl *c = bpf_map_lookup_elem(&ctl, &zero);
	__u32 magic, mark;

	if (!c)
		return TCX_NEXT;

	/* A frame the gate released or injected, back from egress. */
	magic = READ_ONCE(c->magic);
	mark = skb->mark;
	if (magic != 0 && (mark & ~1U) == magic) {
		skb->mark = 0;
		if (mark & 1)
			__sync_fetch_and_add(&c->injected, 1);
		else
			__sync_fetch_and_add(&c->reentered, 1);
		return TCX_NEXT;
	}

	if (READ_ONCE(c->mode) != MODE_HOLD) {
		/* Passing, unless frames held earlier are still on their way
		 * back: then this one queues behind them. held is read first:
		 * reentered and skipped never exceed it. */
		__u64 held = READ_ONCE(c->held);

		if (held <= READ_ONCE(c->reentered) + READ_ONCE(c->skipped))
			return TCX_NEXT;
		return hold_frame(skb, c, REC_DRAIN);
	}
	return hold_frame(skb, c, 0);
}

SEC("tcx/egress")
int release(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct gate_ctl *c = bpf_map_lookup_elem(&ctl, &zero);
	__u64 cookie;
	__u32 magic;

	if (!c)
		return TCX_NEXT;
	cookie = bpf_get_socket_cookie(skb);
	if (cookie == 0)
		return TCX_NEXT;
	magic = READ_ONCE(c->magic);
	if (magic == 0)
		return TCX_NEXT;
	if (cookie == READ_ONCE(c->release_cookie))
		skb->mark = magic;
	else if (cookie == READ_ONCE(c->inject_cookie))
		skb->mark = magic | 1;
	else
		return TCX_NEXT;
	__sync_fetch_and_add(&c->redirected, 1);
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}
