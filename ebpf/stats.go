package ebpf

import (
	"fmt"
	"math/bits"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// Counter counts frames and their bytes.
type Counter struct {
	Frames uint64
	Bytes  uint64
}

func (c *Counter) add(bytes int) {
	c.Frames++
	c.Bytes += uint64(bytes)
}

func (c *Counter) sub(bytes int) {
	c.Frames--
	c.Bytes -= uint64(bytes)
}

func (c *Counter) addCounter(o Counter) {
	c.Frames += o.Frames
	c.Bytes += o.Bytes
}

func (c *Counter) subCounter(o Counter) {
	c.Frames -= o.Frames
	c.Bytes -= o.Bytes
}

// Outcome is how an epoch's frames left the gate.
type Outcome int

const (
	// OutcomeCommitted: Commit released the epoch's held frames.
	OutcomeCommitted Outcome = iota + 1
	// OutcomeDiscarded: Discard dropped them.
	OutcomeDiscarded
	// OutcomeReleased: Release let them out unprotected.
	OutcomeReleased
	// OutcomeClosed: Close dropped them.
	OutcomeClosed
)

func (o Outcome) String() string {
	switch o {
	case OutcomeCommitted:
		return "committed"
	case OutcomeDiscarded:
		return "discarded"
	case OutcomeReleased:
		return "released"
	case OutcomeClosed:
		return "closed"
	}
	return fmt.Sprintf("Outcome(%d)", int(o))
}

// EpochStats is what became of the frames the VM sent during one epoch.
// Every frame the VM sent in the epoch is in exactly one of Held,
// DroppedRingFull, DroppedTooBig and DroppedHoldLimit (or, rarely, in the
// gate-wide Stats.Errors); every held frame ends in exactly one of
// Released, Discarded and Failed.
type EpochStats struct {
	// Epoch is the epoch number given to Open.
	Epoch uint64
	// Outcome says how the epoch ended.
	Outcome Outcome
	// Held counts frames the gate held for the epoch.
	Held Counter
	// Released counts held frames sent on into the host's datapath.
	Released Counter
	// DroppedRingFull counts frames the tap program dropped because the
	// ring buffer had no room (Config.RingSize): userspace fell behind.
	DroppedRingFull Counter
	// DroppedTooBig counts frames the tap program dropped because they were
	// larger than the largest record (65544 bytes).
	DroppedTooBig Counter
	// DroppedHoldLimit counts frames dropped because userspace already held
	// Config.HoldLimit bytes.
	DroppedHoldLimit Counter
	// Discarded counts held frames dropped by Discard or Close.
	Discarded Counter
	// Failed counts held frames whose release the kernel refused (the tap
	// went away or down, or a frame is longer than the tap's MTU allows).
	Failed Counter
	// LatencyP50, LatencyP99 and LatencyMax are the hold time of the
	// released frames: from the moment the tap program held a frame to the
	// moment it was sent on. This is the latency the gate adds.
	LatencyP50, LatencyP99, LatencyMax time.Duration
}

// Mode is whether the gate holds frames.
type Mode int

const (
	// ModePass: frames pass without a copy (before the first Open, after
	// Release).
	ModePass Mode = iota
	// ModeHold: every frame the VM sends is held until its epoch commits.
	ModeHold
)

func (m Mode) String() string {
	switch m {
	case ModePass:
		return "pass"
	case ModeHold:
		return "hold"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Protocols counts held frames by protocol, as gopacket decodes them. A
// frame counts once in each layer it has: an IPv4 UDP frame counts in IPv4
// and in UDP. Other counts frames that are neither ARP nor IP.
type Protocols struct {
	ARP, IPv4, IPv6, TCP, UDP, ICMP, Other uint64
}

// Latency summarises hold times.
type Latency struct {
	P50, P99, Max time.Duration
}

// Stats is a snapshot of the gate's counters since New.
type Stats struct {
	// Mode is the current mode.
	Mode Mode
	// OpenEpoch is the epoch frames are held for now (the last Open).
	OpenEpoch uint64
	// CommittedEpoch is the highest epoch committed.
	CommittedEpoch uint64
	// Pending counts frames held in userspace now, waiting for their epoch.
	Pending Counter
	// InRing is the number of held frames still in the ring buffer, not yet
	// read by userspace.
	InRing uint64
	// Held, Released, DroppedHoldLimit, Discarded and Failed are the sums
	// of the EpochStats fields of the same names, plus frames held and
	// released while draining after Release.
	Held, Released, DroppedHoldLimit, Discarded, Failed Counter
	// DroppedRingFull and DroppedTooBig are counted by the tap program, for
	// all epochs (including any whose per-epoch slot was reused).
	DroppedRingFull, DroppedTooBig Counter
	// Drained counts frames held in pass mode after Release because frames
	// held before them were still on their way out, then released at once.
	Drained Counter
	// Errors counts frames the tap program dropped because copying them
	// failed (should not happen).
	Errors uint64
	// Malformed counts ring records that did not decode (never released).
	Malformed uint64
	// Lost counts released frames that did not come back to the tap's
	// ingress within a second (the host's backlog dropped them).
	Lost uint64
	// Injected counts frames Inject sent that reached the tap's ingress.
	Injected uint64
	// Latency is the hold time of every frame released so far.
	Latency Latency
	// Protocols counts every frame held so far by protocol.
	Protocols Protocols
	// LastFailure is the error of the last release the kernel refused
	// (see Failed); nil if none.
	LastFailure error
	// PcapErr is the first error writing Config.Pcap, after which the gate
	// stopped writing it; nil if none.
	PcapErr error
}

// Dropped counts every frame the gate dropped for lack of room: the ring
// full, a frame too big, or the hold limit reached.
func (s Stats) Dropped() uint64 {
	return s.DroppedRingFull.Frames + s.DroppedTooBig.Frames + s.DroppedHoldLimit.Frames
}

// latencyBuckets: values below 16 ns have a bucket each; above, four
// buckets per power of two (about 19% wide), up to 2^64 ns.
const latencyBuckets = 16 + 60*4

// histogram is a log-linear histogram of nanosecond durations.
type histogram struct {
	counts [latencyBuckets]uint32
	n      uint64
	max    uint64
}

func latencyBucket(ns uint64) int {
	if ns < 16 {
		return int(ns)
	}
	e := bits.Len64(ns) // 5..64
	sub := int(ns>>(e-3)) & 3
	return 16 + (e-5)*4 + sub
}

// bucketValue is the middle of bucket b's range.
func bucketValue(b int) uint64 {
	if b < 16 {
		return uint64(b)
	}
	e := (b-16)/4 + 5
	sub := uint64((b - 16) % 4)
	lo := uint64(1)<<(e-1) | sub<<(e-3)
	return lo + uint64(1)<<(e-4)
}

func (h *histogram) add(ns uint64) {
	h.counts[latencyBucket(ns)]++
	h.n++
	if ns > h.max {
		h.max = ns
	}
}

// quantile returns the q-quantile (0 < q <= 1), at most the maximum seen.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.5)
	rank = max(rank, 1)
	var seen uint64
	for b, c := range h.counts {
		seen += uint64(c)
		if seen >= rank {
			return time.Duration(min(bucketValue(b), h.max))
		}
	}
	return time.Duration(h.max)
}

func (h *histogram) latency() Latency {
	return Latency{P50: h.quantile(0.50), P99: h.quantile(0.99), Max: time.Duration(h.max)}
}

// classifier decodes held frames with gopacket for Protocols. It uses a
// DecodingLayerParser, which decodes into preallocated layers: no
// allocation per frame.
type classifier struct {
	eth     layers.Ethernet
	dot1q   layers.Dot1Q
	arp     layers.ARP
	ip4     layers.IPv4
	ip6     layers.IPv6
	tcp     layers.TCP
	udp     layers.UDP
	icmp4   layers.ICMPv4
	icmp6   layers.ICMPv6
	payload gopacket.Payload
	parser  *gopacket.DecodingLayerParser
	decoded []gopacket.LayerType
}

func newClassifier() *classifier {
	c := &classifier{decoded: make([]gopacket.LayerType, 0, 8)}
	c.parser = gopacket.NewDecodingLayerParser(layers.LayerTypeEthernet,
		&c.eth, &c.dot1q, &c.arp, &c.ip4, &c.ip6, &c.tcp, &c.udp, &c.icmp4, &c.icmp6, &c.payload)
	c.parser.IgnoreUnsupported = true
	return c
}

// count adds frame to p. Whatever decodes before an error still counts: a
// truncated TCP header still makes an IPv4 frame.
func (c *classifier) count(frame []byte, p *Protocols) {
	_ = c.parser.DecodeLayers(frame, &c.decoded)
	known := false
	for _, t := range c.decoded {
		switch t {
		case layers.LayerTypeARP:
			p.ARP++
			known = true
		case layers.LayerTypeIPv4:
			p.IPv4++
			known = true
		case layers.LayerTypeIPv6:
			p.IPv6++
			known = true
		case layers.LayerTypeTCP:
			p.TCP++
		case layers.LayerTypeUDP:
			p.UDP++
		case layers.LayerTypeICMPv4, layers.LayerTypeICMPv6:
			p.ICMP++
		}
	}
	if !known {
		p.Other++
	}
}
