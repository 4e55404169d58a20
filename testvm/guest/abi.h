/*
 * abi.h: the contract between the test VMM (testvm/abi.go) and the guest.
 *
 * testvm/abi_test.go parses every #define below and checks it against the Go
 * constant of the same meaning, so the two sides cannot drift apart. Keep one
 * define per line, values as plain integers.
 *
 * Address space. The guest runs in 64-bit mode at CPL3 with paging on. The VMM
 * builds page tables (2 MiB pages, U/S, R/W, A and D preset so the MMU never
 * writes them) that map guest-virtual [0, mem_size) onto guest memory. Guest
 * memory is one memfd split over two KVM memory slots that are not contiguous in
 * guest-physical space, but the guest only ever sees virtual addresses: virtual
 * address V is byte V of the memfd. Below DATA_ADDR lies the VMM's fixed
 * layout; from DATA_ADDR on, each vCPU owns the region the params page gives it.
 */
#ifndef REPAGENT_GUEST_ABI_H
#define REPAGENT_GUEST_ABI_H

#define ABI_VERSION 4

#define PAGE_SIZE 4096
#define MAX_VCPUS 4

/* Fixed layout (guest-virtual = memfd offset). */
#define GDT_ADDR 0x1000
#define TSS_ADDR 0x2000
#define PARAMS_ADDR 0x3000
#define STATUS_ADDR 0x4000
#define STATUS_STRIDE 0x1000
#define PT_ADDR 0x10000
#define CODE_ADDR 0x100000
#define CODE_MAX 0x80000
#define STACK_ADDR 0x180000
#define STACK_SIZE 0x10000
#define NET_ADDR 0x200000
#define NET_TX_ADDR 0x201000
#define NET_RX_ADDR 0x281000
#define DISK_ADDR 0x301000
#define DISK_RING_ADDR 0x302000
#define DISK_BUF_ADDR 0x380000
#define DISK_BUF_SIZE 0x80000
#define DATA_ADDR 0x400000

/* Ports. OUT only; IN is never used. */
#define PORT_CONSOLE 0x510
#define PORT_CONTROL 0x511
/* PORT_NET_KICK: the VMM's network device wakes up (an ioeventfd: no exit to
 * userspace). The guest writes it only when the device asked for a kick. */
#define PORT_NET_KICK 0x512
/* PORT_DISK_KICK: the same for the block device (see the disk ring below). */
#define PORT_DISK_KICK 0x513

/* PORT_CONSOLE: the 32-bit value written is the length of the line the vCPU
 * put at the start of its status page's console buffer (no newline). */
#define CONSOLE_OFFSET 2048
#define CONSOLE_MAX 2048

/* PORT_CONTROL: the 32-bit value written is code | (arg << 8). */
#define CTRL_READY 1
#define CTRL_DONE 2
#define CTRL_ERROR 3

/* Error codes sent with CTRL_ERROR and left in status.error. */
#define GERR_BAD_PARAMS 1
#define GERR_BAD_WORKLOAD 2
#define GERR_BAD_PATTERN 3
#define GERR_BAD_REGION 4
#define GERR_BAD_VCPU 5
#define GERR_BAD_NET 6
/* The disk workload without a disk, or a working set the version table
 * cannot hold. */
#define GERR_BAD_DISK 7
/* A disk request completed with an error status (status.disk_bad_*). */
#define GERR_DISK_IO 8
/* A block read back does not hold the version the table records. */
#define GERR_DISK_VERIFY 9

/* Magic numbers. */
#define PARAMS_MAGIC 0x5041524d47504552
#define STATUS_MAGIC 0x5354415447504552

/* Workloads and patterns. */
#define WL_IDLE 1
#define WL_DIRTY 2
#define WL_COUNTER 3
#define WL_UDP_ECHO 4
#define WL_UDP_STREAM 5
#define WL_DISK 6
#define PAT_SEQ 1
#define PAT_RANDOM 2
#define PAT_HOTCOLD 3
/* What a dirty-workload write puts in its page (params.content; 0 = stamp). */
#define CONTENT_STAMP 1
#define CONTENT_TEXT 2
#define CONTENT_SPARSE 3

/* Guest states in status.state. */
#define GS_BOOT 0
#define GS_RUNNING 1
#define GS_WAITING 2
#define GS_ERROR 3

/* Hash and fill constants (see the functions at the end of this file). */
#define FILL_K 0x9e3779b97f4a7c15
#define COUNTER_K 0xff51afd7ed558ccd
#define COUNTER_H0 0xcbf29ce484222325

/* Byte offsets inside struct guest_params (checked against Go). */
#define P_MAGIC 0
#define P_ABI_VERSION 8
#define P_NR_VCPUS 12
#define P_WORKLOAD 16
#define P_PATTERN 20
#define P_TSC_KHZ 24
#define P_RATE 32
#define P_SEED 40
#define P_PHASE_OPS 48
#define P_HOT_PCT 56
#define P_HOT_WRITE_PCT 60
#define P_GO 64
#define P_IDLE_TICK_US 72
#define P_NET_MAC 80
#define P_NET_IP 88
#define P_NET_PORT 92
#define P_STREAM_RATE 96
#define P_STREAM_BYTES 104
#define P_NET_FLAGS 108
#define P_NET_SERVICE 112
#define P_CONTENT 116
#define P_VCPU 128
#define P_VCPU_STRIDE 32
#define PV_BASE 0
#define PV_PAGES 8
#define PV_WORKING_SET 16
#define P_DISK_BLOCKS 256
#define P_DISK_WS 264
#define P_DISK_FLUSH_EVERY 272
#define P_DISK_FLAGS 280

/* Byte offsets inside struct guest_status (checked against Go). */
#define S_MAGIC 0
#define S_STATE 8
#define S_ERROR 12
#define S_ITERATIONS 16
#define S_WRITES 24
#define S_PHASE 32
#define S_CUR_PAGE 40
#define S_COUNTER_SEQ 48
#define S_COUNTER_SLOT 64
#define S_TSC 96
#define S_NET_RX 104
#define S_NET_TX 112
#define S_NET_SEQ 120
#define S_NET_IGNORED 128
#define S_NET_PEER_IP 136
#define S_NET_PEER_PORT 140
#define S_DISK_WRITES 144
#define S_DISK_READS 152
#define S_DISK_FLUSHES 160
#define S_DISK_ERRORS 168
#define S_DISK_BATCH 176
#define S_DISK_BATCH_N 184
#define S_DISK_BAD_BLOCK 192
#define S_DISK_BAD_STATUS 200

/*
 * The network device. A header page at NET_ADDR and two rings of NET_SLOTS
 * slots of NET_SLOT_SIZE bytes: TX (guest to VMM) at NET_TX_ADDR, RX (VMM to
 * guest) at NET_RX_ADDR. A slot holds a u32 frame length at offset 0 and the
 * Ethernet frame (no FCS, at most NET_FRAME_MAX bytes) at NET_SLOT_DATA.
 * Indices are free-running u32; slot = index % NET_SLOTS.
 *   TX: the guest fills slot tx_prod, then increments tx_prod; the VMM sends
 *       slots tx_cons..tx_prod-1 to the tap and advances tx_cons. Before it
 *       sleeps the VMM sets tx_kick = 1 and looks at tx_prod once more; a guest
 *       that sees tx_kick after publishing tx_prod clears it and writes
 *       PORT_NET_KICK. A busy device is never kicked: no exit per frame.
 *   RX: the VMM fills slot rx_prod and increments rx_prod (dropping frames
 *       while the ring is full); the guest consumes up to rx_prod and advances
 *       rx_cons. The guest polls: there are no interrupts.
 */
#define NET_SLOTS 256
#define NET_SLOT_SIZE 2048
#define NET_SLOT_DATA 8
#define NET_FRAME_MAX 1514
#define N_TX_PROD 0
#define N_TX_CONS 64
#define N_TX_KICK 68
#define N_RX_PROD 128
#define N_RX_CONS 192
#define NET_PRESENT 1

/*
 * The block device. A header page at DISK_ADDR, a ring of DISK_SLOTS request
 * descriptors of DISK_DESC_SIZE bytes at DISK_RING_ADDR, and a buffer area of
 * DISK_BUF_SIZE bytes at DISK_BUF_ADDR that every request's data must lie in.
 * Blocks are DISK_BLOCK_SIZE bytes; the disk has params.disk_blocks of them.
 * Indices are free-running u32; slot = index % DISK_SLOTS.
 *   The guest fills descriptor req_prod (status = 0), then increments
 *   req_prod; the VMM executes descriptors req_cons..req_prod-1 in order,
 *   writes each one's status, and then advances req_cons past all of them.
 *   A descriptor's status is final once req_cons has passed it; the guest
 *   may reuse it (and its buffer) from then on. Doorbell: as the network TX
 *   ring (req_kick, PORT_DISK_KICK): a busy device is never kicked.
 *   The guest polls req_cons for completions: there are no interrupts.
 * Ops: DISK_OP_READ copies `count` blocks from block `block` into buf;
 * DISK_OP_WRITE writes them from buf, and with DISK_F_FUA is durable
 * (synced) before it completes; DISK_OP_FLUSH makes every write completed
 * before it durable (block, count and buf are ignored).
 * A request is executed whole or not at all as seen by a checkpoint: a write
 * is on the disk image if and only if req_cons in the same checkpoint has
 * passed its descriptor.
 */
#define DISK_SLOTS 128
#define DISK_DESC_SIZE 32
#define DISK_BLOCK_SIZE 4096
#define DK_REQ_PROD 0
#define DK_REQ_CONS 64
#define DK_KICK 68
#define D_OP 0
#define D_FLAGS 4
#define D_BLOCK 8
#define D_COUNT 16
#define D_STATUS 20
#define D_BUF 24
#define DISK_OP_READ 1
#define DISK_OP_WRITE 2
#define DISK_OP_FLUSH 3
#define DISK_F_FUA 1
/* Status: 0 until the VMM completed the request. */
#define DISK_S_OK 1
#define DISK_S_BAD_OP 2
#define DISK_S_BAD_RANGE 3
#define DISK_S_BAD_BUF 4
#define DISK_S_IO_ERROR 5
#define DISK_PRESENT 1
/* Word 0 of a disk block stamp: DISK_STAMP_TAG | block number. */
#define DISK_STAMP_TAG 0xd15c000000000000

#ifndef __ASSEMBLER__
#ifndef ABI_NO_STRUCTS
typedef unsigned long u64;
typedef unsigned int u32;

struct guest_vcpu_params {
	u64 base;        /* guest-virtual address of the vCPU's region (page aligned) */
	u64 pages;       /* size of the region in 4 KiB pages */
	u64 working_set; /* pages of the region the workload writes, from base (<= pages) */
	u64 reserved;
};

/* The params page, at PARAMS_ADDR, filled by the VMM before the first run.
 * The guest only reads it. The VMM may raise `go` while the guest runs. */
struct guest_params {
	u64 magic;           /* PARAMS_MAGIC */
	u32 abi_version;     /* ABI_VERSION */
	u32 nr_vcpus;        /* 1..MAX_VCPUS */
	u32 workload;        /* WL_* */
	u32 pattern;         /* PAT_*, dirty only */
	u64 tsc_khz;         /* guest TSC frequency, for pacing */
	u64 rate;            /* dirty: page writes per second per vCPU, 0 = full speed */
	u64 seed;            /* random and hotcold: xorshift seed, mixed with the vCPU index */
	u64 phase_ops;       /* operations per phase (page writes, counter steps, idle ticks); 0 = no phases */
	u32 hot_pct;         /* hotcold: hot set = this percent of the working set (>= 1 page) */
	u32 hot_write_pct;   /* hotcold: this percent of writes go to the hot set */
	volatile u64 go;     /* phases: the guest runs phase p (1-based) only while go >= p */
	u64 idle_tick_us;    /* idle: microseconds between status updates */
	u64 net_mac;         /* the guest's MAC, bytes 0..5 in wire order */
	u32 net_ip;          /* the guest's IPv4 address, bytes in wire order */
	u32 net_port;        /* the UDP port the network workloads serve */
	u64 stream_rate;     /* udp-stream: datagrams per second, 0 = as fast as the ring goes */
	u32 stream_bytes;    /* udp-stream: UDP payload bytes per datagram (16..1472) */
	u32 net_flags;       /* NET_PRESENT when the VM has a network device */
	u32 net_service;     /* WL_UDP_ECHO or WL_UDP_STREAM: vCPU 0 also serves the
	                      * network between its workload's operations; 0 = none */
	u32 content;         /* dirty: CONTENT_*, what a write puts in its page; 0 = stamp */
	u64 reserved[1];
	struct guest_vcpu_params vcpu[MAX_VCPUS];
	u64 disk_blocks;     /* the disk's size in DISK_BLOCK_SIZE blocks (0: no disk) */
	u64 disk_ws;         /* disk: blocks of the working set, from block 0 */
	u64 disk_flush_every; /* disk: a flush request after this many block writes */
	u32 disk_flags;      /* DISK_PRESENT when the VM has a block device */
	u32 reserved2;
};

/* One per vCPU, at STATUS_ADDR + i*STATUS_STRIDE, written only by the guest.
 * The host reads it without exits. */
struct guest_status {
	u64 magic;           /* STATUS_MAGIC once the vCPU started */
	u32 state;           /* GS_* */
	u32 error;           /* GERR_*, when state == GS_ERROR */
	u64 iterations;      /* operations done so far (all workloads); monotonic */
	u64 writes;          /* dirty: page writes completed; also the last version used */
	u64 phase;           /* phases: the last phase completed */
	u64 cur_page;        /* dirty: 1 + index of the page being written, 0 = none */
	u64 counter_seq;     /* counter: latest published value c; its (c, h) is slot[c & 1] */
	u64 reserved0;
	u64 counter_slot[2][2]; /* counter: {c, h} pairs, double buffered */
	u64 tsc;             /* rdtsc at the last status update */
	u64 net_rx;          /* network workloads: frames taken from the RX ring */
	u64 net_tx;          /* frames put on the TX ring (ARP replies included) */
	u64 net_seq;         /* the last sequence number sent (echo replies, stream datagrams),
	                      * written just before its frame goes on the TX ring */
	u64 net_ignored;     /* frames received that were not for this guest or malformed */
	u32 net_peer_ip;     /* udp-stream: the subscriber's IPv4 address (wire order), 0 = none */
	u32 net_peer_port;   /* udp-stream: the subscriber's UDP port (host order) */
	u64 disk_writes;     /* disk: block writes completed and in the version table;
	                      * also the last version used (versions are 1, 2, ...) */
	u64 disk_reads;      /* disk: blocks read back and verified */
	u64 disk_flushes;    /* disk: flush requests completed */
	u64 disk_errors;     /* disk: requests that failed, reads that did not verify */
	u64 disk_batch;      /* disk: ring index of the first descriptor of the batch in flight */
	u64 disk_batch_n;    /* disk: descriptors in that batch, 0 = none in flight */
	u64 disk_bad_block;  /* disk: 1 + the block of the last error, 0 = none */
	u64 disk_bad_status; /* disk: DISK_S_* of the last failed request, 0 for a mismatch */
};

/* One block request; DISK_SLOTS of them at DISK_RING_ADDR. */
struct disk_desc {
	u32 op;              /* DISK_OP_* */
	u32 flags;           /* DISK_F_FUA (writes only) */
	u64 block;           /* first block */
	u32 count;           /* blocks, 1 .. DISK_BUF_SIZE / DISK_BLOCK_SIZE */
	u32 status;          /* written by the VMM: DISK_S_* */
	u64 buf;             /* guest address of the data, inside the buffer area */
};

/*
 * Page stamps (dirty workload). Writing page `index` of vCPU `vcpu`'s working set
 * with version v (v = status.writes + 1, so versions are unique and increase)
 * puts in the page, by params.content:
 *   CONTENT_STAMP: all 512 words change (nothing compresses):
 *     w[0] = ((u64)vcpu << 56) | index
 *     w[1] = v
 *     w[k] = fill_base(w[0], v) + k * FILL_K, for k = 2..511
 *   CONTENT_TEXT: the same w[0] and w[1], and text-like words (it compresses):
 *     w[k] = text_word(x_k), for k = 2..511, where x_1 = fill_base(w[0], v) | 1
 *     and x_k = xorshift64(x_{k-1}): one of TEXT_WORDS eight-byte words
 *   CONTENT_SPARSE: only the 64-byte line l = v % 64 (words 8l..8l+7) changes,
 *     the rest of the page keeps its bytes:
 *     w[8l] = v
 *     w[8l+j] = fill_base(w0 ^ (l << 48), v) + j * FILL_K, for j = 1..7,
 *     with w0 = ((u64)vcpu << 56) | index as above
 * A page (a line, for sparse) never written is all zero. The host verifies
 * any page from its own contents plus status.writes: v <= writes, or the page
 * is cur_page (torn).
 */
static inline u64 mix64(u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdUL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53UL;
	x ^= x >> 33;
	return x;
}

static inline u64 fill_base(u64 w0, u64 version)
{
	return mix64(w0 ^ (version * FILL_K));
}

/* CONTENT_TEXT: the word stream's next state (xorshift64, never 0 from a
 * nonzero start) and the eight-byte word a state picks: the top bits of x
 * choose one of TEXT_WORDS words, each a lower-case word of 2 to 7 letters
 * padded with spaces, so that LZ4 finds repeats as in English text. */
#define TEXT_WORDS 16
static inline u64 xorshift64(u64 x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static inline u64 text_word(u64 x)
{
	u64 t = x >> 60, n = 2 + t % 6, w = 0, j;

	for (j = 0; j < 8; j++)
		w |= (j < n ? (u64)('a' + (t * 7 + j * 3) % 26) : (u64)' ') << (8 * j);
	return w;
}

/*
 * Disk block stamps (disk workload). Write number v (v = 1, 2, ...; unique,
 * increasing) of block b fills its 512 words as a page stamp does:
 *   w[0] = DISK_STAMP_TAG | b
 *   w[1] = v
 *   w[k] = fill_base(w[0], v) + k * FILL_K, for k = 2..511
 * The guest records v in its version table: u64 table[b] at the start of
 * vCPU 0's region, for every block b of the working set (0 = never written),
 * once the device completed the write. A host verifies a disk image against
 * the table, the ring and status.disk_batch* (see testvm.VerifyDiskImage).
 */

/* Counter workload: h_0 = COUNTER_H0; for c = 1, 2, ...: h_c = counter_step(h_{c-1}, c). */
static inline u64 counter_step(u64 h, u64 c)
{
	h = (h << 5 | h >> 59) ^ c;
	return h * COUNTER_K;
}
#endif /* ABI_NO_STRUCTS */
#endif /* __ASSEMBLER__ */
#endif /* REPAGENT_GUEST_ABI_H */
