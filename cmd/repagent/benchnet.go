package main

// The bench's network section: output commit as a client sees it. The
// guest's answers are held by the output gate until their epoch is
// acknowledged, so a client of a replicated guest waits, on top of the
// network, for the rest of the epoch, the pause, the transfer and the ack.
// Every mode runs on a fresh test VM on the lab's tap (netlab.go), with an
// output gate on the tap, side by side with the same VM and gate without
// replication (the gate in pass mode).

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/netlab"
	"github.com/repagent/repagent/internal/netns"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// Fixed settings of the network section.
const (
	netMaxMem      = 64 << 20               // the network guests' memory: --mem, at most this
	netWarmupMax   = 500 * time.Millisecond // the longest warm-up of a network mode
	netPing        = 5                      // round trips one at a time before a mode: the guest answers
	streamInterval = 20 * time.Millisecond  // the replicated throughput mode's interval
	streamBytes    = 64                     // UDP payload of each stream datagram
	streamRcvBuf   = 4 << 20                // the stream client's socket buffer
	goalNetExtra   = time.Millisecond       // the goal's allowance beyond interval/2 + pause + transfer
	// goalTransferShare bounds the main job's shape's transfer p50, as a
	// share of its interval.
	goalTransferShare = 0.10
)

// jobShapeIntervals are the intervals of the echo mode with the main job's
// shape (the main job's default, 100ms, first).
var jobShapeIntervals = []time.Duration{100 * time.Millisecond, 20 * time.Millisecond, 10 * time.Millisecond}

// benchNetResult is the network section's figures.
type benchNetResult struct {
	EchoRate    int               `json:"echo_rate"`
	MemSize     uint64            `json:"mem"`
	Echo        []*benchEchoMode  `json:"echo"`
	StreamRate  uint64            `json:"stream_rate"`
	StreamBytes int               `json:"stream_bytes"`
	Stream      []*benchNetStream `json:"stream"`
	// StreamRatio is the replicated stream's client frames/s over the
	// unreplicated one's.
	StreamRatio float64 `json:"stream_ratio"`
	// JobShape is the echo with the main job's guest (jobShapeConfig, of
	// JobMem bytes): without replication, then at each of jobShapeIntervals.
	JobMem   uint64           `json:"job_shape_mem"`
	JobShape []*benchEchoMode `json:"job_shape_echo"`
}

// benchGateWindow is what the output gate did in a window: counts from its
// Stats; hold times from the epochs measured (the stream) or from every frame
// released (the echo, see measureEcho). Durations in microseconds.
type benchGateWindow struct {
	Held      uint64  `json:"gate_held"`
	Released  uint64  `json:"gate_released"`
	Dropped   uint64  `json:"gate_dropped"`
	Lost      uint64  `json:"gate_lost"` // released, but not back at the tap's ingress within a second
	HoldP50US float64 `json:"hold_p50_us,omitempty"`
	HoldP99US float64 `json:"hold_p99_us,omitempty"`
}

// benchNetEpochs is the replication figures of a network mode's window, from
// the epochs whose pause started in it. Durations in microseconds.
type benchNetEpochs struct {
	Track         string  `json:"dirty_track,omitempty"`
	Epochs        uint64  `json:"epochs,omitempty"`
	DirtyPages    float64 `json:"dirty_pages_mean,omitempty"`
	PauseP50US    float64 `json:"pause_p50_us,omitempty"`
	TransferP50US float64 `json:"transfer_p50_us,omitempty"`
	AckP50US      float64 `json:"ack_p50_us,omitempty"`
}

// benchEchoMode is one mode of the echo measurement. Durations in
// microseconds.
type benchEchoMode struct {
	Mode       string  `json:"mode"` // none, or the interval
	IntervalMS float64 `json:"interval_ms,omitempty"`
	Seconds    float64 `json:"seconds"`
	Sent       uint64  `json:"requests"`
	Answered   uint64  `json:"answered"`
	Bad        uint64  `json:"bad_answers"` // malformed, repeated or out of order
	RTTP50US   float64 `json:"rtt_p50_us"`
	RTTP99US   float64 `json:"rtt_p99_us"`
	AddedP50US float64 `json:"added_p50_us"` // rtt p50 minus none's
	// BoundUS is the goal: interval/2 + pause p50 + transfer p50 + 1 ms.
	BoundUS float64 `json:"goal_bound_us,omitempty"`
	// HoldVsBound is the gate's hold p50 over BoundUS; TransferShare the
	// transfer p50 over the interval.
	HoldVsBound   float64 `json:"hold_p50_vs_bound,omitempty"`
	TransferShare float64 `json:"transfer_p50_vs_interval,omitempty"`
	benchNetEpochs
	benchGateWindow
}

// benchNetStream is one mode of the held-frame throughput measurement.
type benchNetStream struct {
	Mode        string  `json:"mode"` // none, or the interval
	IntervalMS  float64 `json:"interval_ms,omitempty"`
	Seconds     float64 `json:"seconds"`
	GuestSent   uint64  `json:"guest_sent"` // datagrams the guest numbered in the window
	GuestRate   float64 `json:"guest_sent_per_s"`
	Received    uint64  `json:"client_frames"`
	ClientRate  float64 `json:"client_frames_per_s"`
	ClientLost  uint64  `json:"client_lost"` // sequence numbers the client never saw
	VsNone      float64 `json:"vs_none"`
	ClientOrder uint64  `json:"client_out_of_order"` // malformed, or not above the last

	benchNetEpochs
	benchGateWindow
}

// netWarmup is how long a network mode's guest runs before its window opens
// (a replicated one also waits for the first epochs acknowledged).
func (b *benchRun) netWarmup() time.Duration { return min(b.warmup(), netWarmupMax) }

// netMem is the network guests' memory size.
func (b *benchRun) netMem() uint64 { return min(b.mem, netMaxMem) }

// netGuestConfig is a 1-vCPU test VM running the network workload wl.
func (b *benchRun) netGuestConfig(wl testvm.Workload) testvm.Config {
	mac, _ := net.ParseMAC(defaultGuestMAC)
	n := &testvm.NetConfig{MAC: mac, IP: netip.MustParseAddr(defaultGuestIP)}
	if wl == testvm.UDPStream {
		n.StreamRate, n.StreamBytes = b.streamRate, streamBytes
	}
	return testvm.Config{MemSize: b.netMem(), VCPUs: 1, Workload: wl, Net: n, Seed: 1}
}

// jobShapeConfig is the main job's guest (`repagent` with its defaults but
// its disk, which the dirty workload does not write): the dirty workload at
// full speed (random pattern, stamp pages) on 1 vCPU of testvm.DefaultMemSize,
// whose vCPU 0 also answers udp-echo between page writes.
func jobShapeConfig() testvm.Config {
	mac, _ := net.ParseMAC(defaultGuestMAC)
	n := &testvm.NetConfig{MAC: mac, IP: netip.MustParseAddr(defaultGuestIP), Port: testvm.DefaultNetPort, Service: testvm.UDPEcho}
	return testvm.Config{MemSize: testvm.DefaultMemSize, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random, Net: n, Seed: 1}
}

// benchNet measures the network section in a lab made for it, removed
// after it, also on an error or an interrupt.
func (b *benchRun) benchNet(ctx context.Context) (_ *benchNetResult, err error) {
	l, err := netlab.New()
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := l.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("remove the network: %w", cerr)
		}
	}()
	res := &benchNetResult{EchoRate: b.echoRate, MemSize: b.netMem(), StreamRate: b.streamRate, StreamBytes: streamBytes}

	echo := b.netGuestConfig(testvm.UDPEcho)
	b.progressf("network: udp-echo, no replication")
	none, err := b.measureEcho(ctx, l, echo, 0)
	if err != nil {
		return nil, fmt.Errorf("udp-echo, no replication: %w", err)
	}
	res.Echo = append(res.Echo, none)
	for _, iv := range b.intervals {
		b.progressf("network: udp-echo, replicated at %v", iv)
		e, err := b.measureEcho(ctx, l, echo, iv)
		if err != nil {
			return nil, fmt.Errorf("udp-echo, replicated at %v: %w", iv, err)
		}
		e.AddedP50US = e.RTTP50US - none.RTTP50US
		res.Echo = append(res.Echo, e)
	}

	job := jobShapeConfig()
	res.JobMem = job.MemSize
	for _, iv := range append([]time.Duration{0}, jobShapeIntervals...) {
		name := "no replication"
		if iv != 0 {
			name = "replicated at " + iv.String()
		}
		b.progressf("network: the main job's shape (dirty at full speed + udp-echo), %s", name)
		e, err := b.measureEcho(ctx, l, job, iv)
		if err != nil {
			return nil, fmt.Errorf("the main job's shape, %s: %w", name, err)
		}
		if iv != 0 {
			e.AddedP50US = e.RTTP50US - res.JobShape[0].RTTP50US
		}
		res.JobShape = append(res.JobShape, e)
	}

	for _, iv := range []time.Duration{0, streamInterval} {
		name := "no replication"
		if iv != 0 {
			name = "replicated at " + iv.String()
		}
		b.progressf("network: udp-stream at up to %d/s, %s", b.streamRate, name)
		s, err := b.measureStream(ctx, l, iv)
		if err != nil {
			return nil, fmt.Errorf("udp-stream, %s: %w", name, err)
		}
		res.Stream = append(res.Stream, s)
	}
	for _, s := range res.Stream {
		s.VsNone = benchRatio(s.ClientRate, res.Stream[0].ClientRate)
	}
	res.StreamRatio = res.Stream[1].VsNone
	return res, nil
}

// benchNetVM is a test VM on the lab's tap, with an output gate on the tap.
type benchNetVM struct {
	cfg   testvm.Config
	mech  dirtylog.Mechanism // the dirty tracking when replicated; 0 without
	m     *testvm.Machine
	ready time.Time
	tap   *os.File
	gate  *ebpf.Gate

	mu     sync.Mutex
	epochs []ebpf.EpochStats // every epoch the gate ended
}

// netBoot resolves the dirty tracking of a guest of cfg (which must have
// Net) to be replicated at interval (which sizes its dirty ring; none for
// 0), opens the lab's tap and puts a gate on it (in the lab's lan
// namespace), then builds and starts a VM on the tap and waits for its
// guest.
func (b *benchRun) netBoot(ctx context.Context, l *netlab.Lab, cfg testvm.Config, interval time.Duration) (_ *benchNetVM, err error) {
	v := &benchNetVM{cfg: cfg}
	if interval != 0 {
		if v.cfg, v.mech, err = b.resolveTrack(v.cfg, interval); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			v.close()
		}
	}()
	if v.tap, err = l.OpenTap(); err != nil {
		return nil, err
	}
	err = netns.Do(l.Lan, func() error {
		var err error
		v.gate, err = ebpf.New(ebpf.Config{Interface: l.Tap, ReleaseCPU: ebpf.AutoCPU, OnEpoch: v.onEpoch})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("output gate on %s: %w", l.Tap, err)
	}
	cfg = v.cfg
	cfg.Tap = v.tap
	if v.m, v.ready, err = benchBoot(ctx, cfg); err != nil {
		return nil, fmt.Errorf("start the %s guest: %w", cfg.Workload, err)
	}
	return v, nil
}

// onEpoch is the gate's per-epoch report (on the gate's goroutine).
func (v *benchNetVM) onEpoch(s ebpf.EpochStats) {
	v.mu.Lock()
	v.epochs = append(v.epochs, s)
	v.mu.Unlock()
}

// close closes the VM, then the gate, then the tap.
func (v *benchNetVM) close() error {
	var err error
	if v.m != nil {
		err = v.m.Close()
	}
	if v.gate != nil {
		if cerr := v.gate.Close(); cerr != nil && !errors.Is(cerr, ebpf.ErrClosed) {
			err = errors.Join(err, fmt.Errorf("close the output gate: %w", cerr))
		}
	}
	if v.tap != nil {
		v.tap.Close()
	}
	return err
}

// gateWindow is what the gate did between the snapshots s0 and s1, with the
// hold times of the frames released in the epochs measured: the median of
// the epochs' medians and the 99th percentile of their 99th percentiles.
// Each epoch's own percentiles are good only when it releases many frames
// (with two, its median is the smaller one): the stream's epochs do.
func (v *benchNetVM) gateWindow(s0, s1 ebpf.Stats, measured []replicate.EpochStats) benchGateWindow {
	w := benchGateWindow{
		Held:     s1.Held.Frames - s0.Held.Frames,
		Released: s1.Released.Frames - s0.Released.Frames,
		Dropped:  dropped(s1) - dropped(s0),
		Lost:     s1.Lost - s0.Lost,
	}
	in := make(map[uint64]bool, len(measured))
	for _, s := range measured {
		in[s.Epoch] = true
	}
	var p50, p99 hist
	v.mu.Lock()
	for _, s := range v.epochs {
		if in[s.Epoch] && s.Released.Frames > 0 {
			p50.Add(s.LatencyP50)
			p99.Add(s.LatencyP99)
		}
	}
	v.mu.Unlock()
	w.HoldP50US, w.HoldP99US = benchUS(p50.Quantile(0.5)), benchUS(p99.Quantile(0.99))
	return w
}

// netEpochs sums up the replication figures of the epochs r measured, and
// returns those epochs; nothing for nil (no replication).
func netEpochs(r *benchMode) (benchNetEpochs, []replicate.EpochStats) {
	if r == nil {
		return benchNetEpochs{}, nil
	}
	e := benchNetEpochs{Track: r.Track, Epochs: r.Epochs, DirtyPages: r.DirtyPages, PauseP50US: r.PauseP50US, AckP50US: r.AckP50US}
	var tr hist
	for _, s := range r.epochs {
		tr.Add(s.Transfer)
	}
	e.TransferP50US = benchUS(tr.Quantile(0.5))
	return e, r.epochs
}

// netMode names a network mode: "none" for 0, else the interval.
func netMode(interval time.Duration) (mode string, ms float64) {
	if interval == 0 {
		return "none", 0
	}
	return interval.String(), benchMS(interval)
}

// netRun runs measure on v's guest: without replication after the warm-up
// when interval is 0, else replicated at interval with the gate in
// Config.Gates. It returns the replicated mode's epochs (nil without).
func (b *benchRun) netRun(ctx context.Context, v *benchNetVM, interval time.Duration,
	measure func(ctx context.Context) (t0, t1 time.Time, err error)) (*benchMode, error) {
	if interval == 0 {
		if err := benchSleep(ctx, v.m, max(0, b.netWarmup()-time.Since(v.ready))); err != nil {
			return nil, err
		}
		_, _, err := measure(ctx)
		return nil, err
	}
	r := &benchMode{Mode: interval.String(), IntervalMS: benchMS(interval), Track: v.mech.String()}
	err := b.runReplicated(ctx, v.m, v.ready, benchRepl{interval: interval, mech: v.mech, gates: []replicate.OutputGate{v.gate},
		warmup: b.netWarmup(), measure: func(ctx context.Context) (time.Time, time.Time, error) {
			t0, t1, err := measure(ctx)
			r.Seconds = t1.Sub(t0).Seconds()
			return t0, t1, err
		}}, r)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// measureEcho measures the round trips of a client of a guest of cfg that
// answers udp-echo (its workload or its service): without replication when
// interval is 0, else replicated at interval.
func (b *benchRun) measureEcho(ctx context.Context, l *netlab.Lab, cfg testvm.Config, interval time.Duration) (*benchEchoMode, error) {
	v, err := b.netBoot(ctx, l, cfg, interval)
	if err != nil {
		return nil, err
	}
	defer v.close()
	guest := netip.AddrPortFrom(v.cfg.Net.IP, testvm.DefaultNetPort)
	c, err := l.NewEchoClient(guest, b.echoRate)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	// Before replication: the guest answers, and the client knows its MAC.
	if _, err := c.Ping(netPing); err != nil {
		return nil, err
	}

	e := &benchEchoMode{}
	e.Mode, e.IntervalMS = netMode(interval)
	var s0, s1 ebpf.Stats
	measure := func(ctx context.Context) (t0, t1 time.Time, err error) {
		s0, t0 = v.gate.Stats(), time.Now()
		wctx, cancel := context.WithTimeout(ctx, b.modeTime)
		c.Run(wctx) // its reader runs until the client closes
		cancel()
		t1 = time.Now()
		if err := ctx.Err(); err != nil {
			return t0, t1, err
		}
		// The answers still held: the last requests' epoch ends within an
		// interval, and its ack follows.
		for limit := time.Now().Add(2*interval + 250*time.Millisecond); time.Now().Before(limit); {
			if t := c.Totals(); t.Answered+t.Bad >= t.Sent {
				break
			}
			if err := benchSleep(ctx, v.m, time.Millisecond); err != nil {
				return t0, t1, err
			}
		}
		s1 = v.gate.Stats()
		e.Seconds = t1.Sub(t0).Seconds()
		return t0, t1, nil
	}
	r, err := b.netRun(ctx, v, interval, measure)
	if err != nil {
		return nil, err
	}
	t := c.Totals()
	e.Sent, e.Answered, e.Bad = t.Sent, t.Answered, t.Bad
	e.RTTP50US, e.RTTP99US = benchUS(t.P50), benchUS(t.P99)
	if e.Answered == 0 {
		return nil, fmt.Errorf("no answer to %d requests in %v", e.Sent, b.modeTime)
	}
	var epochs []replicate.EpochStats
	e.benchNetEpochs, epochs = netEpochs(r)
	e.benchGateWindow = v.gateWindow(s0, s1, epochs)
	if r != nil {
		// The echo guest sends only answers (and the odd ARP reply), and
		// the client starts at the window: every frame the gate ever
		// released is an answer of the window, and its hold-time
		// percentiles are over those frames, not per epoch (an epoch holds
		// only interval × --echo-rate of them).
		e.HoldP50US, e.HoldP99US = benchUS(s1.Latency.P50), benchUS(s1.Latency.P99)
		e.BoundUS = benchUS(interval/2+goalNetExtra) + e.PauseP50US + e.TransferP50US
		e.HoldVsBound = benchRatio(e.HoldP50US, e.BoundUS)
		e.TransferShare = benchRatio(e.TransferP50US, benchUS(interval))
	}
	return e, nil
}

// streamSink subscribes to the udp-stream guest and counts what it gets.
type streamSink struct {
	conn       *net.UDPConn
	frames     atomic.Uint64
	lost       atomic.Uint64 // sequence numbers skipped
	outOfOrder atomic.Uint64 // malformed, or not above the last
	done       chan struct{}
}

// newStreamSink opens the client's socket in the lab's client namespace.
func newStreamSink(l *netlab.Lab) (*streamSink, error) {
	conn, err := l.ListenUDP()
	if err != nil {
		return nil, fmt.Errorf("open the stream client's socket: %w", err)
	}
	c := &streamSink{conn: conn, done: make(chan struct{})}
	// Replicated, a whole epoch's datagrams arrive at once.
	if err := c.conn.SetReadBuffer(streamRcvBuf); err != nil {
		c.conn.Close()
		return nil, fmt.Errorf("size the stream client's socket buffer: %w", err)
	}
	go c.read()
	return c, nil
}

func (c *streamSink) read() {
	defer close(c.done)
	buf := make([]byte, 2048)
	var last uint64
	for {
		n, err := c.conn.Read(buf)
		if err != nil {
			return // closed
		}
		c.frames.Add(1)
		if n < 8 {
			c.outOfOrder.Add(1)
			continue
		}
		switch seq := binary.BigEndian.Uint64(buf); {
		case seq <= last:
			c.outOfOrder.Add(1)
		default:
			if last != 0 {
				c.lost.Add(seq - last - 1)
			}
			last = seq
		}
	}
}

// subscribe sends datagrams to the guest until its stream flows.
func (c *streamSink) subscribe(ctx context.Context, m *testvm.Machine, guest netip.AddrPort) error {
	deadline := time.Now().Add(10 * time.Second)
	for c.frames.Load() == 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest's stream did not reach the client in 10s (guest peer %v)", m.Status(0).StreamPeer)
		}
		if _, err := c.conn.WriteToUDPAddrPort([]byte("subscribe"), guest); err != nil {
			return fmt.Errorf("subscribe to the guest's stream: %w", err)
		}
		if err := benchSleep(ctx, m, 100*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

func (c *streamSink) close() {
	c.conn.Close()
	<-c.done
}

// measureStream measures the frames per second a client of the udp-stream
// guest receives: without replication when interval is 0, else replicated
// at interval, every frame held and then released.
func (b *benchRun) measureStream(ctx context.Context, l *netlab.Lab, interval time.Duration) (*benchNetStream, error) {
	v, err := b.netBoot(ctx, l, b.netGuestConfig(testvm.UDPStream), interval)
	if err != nil {
		return nil, err
	}
	defer v.close()
	c, err := newStreamSink(l)
	if err != nil {
		return nil, err
	}
	defer c.close()
	if err := c.subscribe(ctx, v.m, netip.AddrPortFrom(v.cfg.Net.IP, testvm.DefaultNetPort)); err != nil {
		return nil, err
	}

	s := &benchNetStream{}
	s.Mode, s.IntervalMS = netMode(interval)
	var g0, g1 ebpf.Stats
	measure := func(ctx context.Context) (t0, t1 time.Time, err error) {
		g0, t0 = v.gate.Stats(), time.Now()
		seq0, rx0, lost0, ooo0 := v.m.Status(0).NetSeq, c.frames.Load(), c.lost.Load(), c.outOfOrder.Load()
		if err := benchSleep(ctx, v.m, b.modeTime); err != nil {
			return t0, t0, err
		}
		g1, t1 = v.gate.Stats(), time.Now()
		seq1, rx1, lost1, ooo1 := v.m.Status(0).NetSeq, c.frames.Load(), c.lost.Load(), c.outOfOrder.Load()
		s.Seconds = t1.Sub(t0).Seconds()
		s.GuestSent, s.Received, s.ClientLost, s.ClientOrder = seq1-seq0, rx1-rx0, lost1-lost0, ooo1-ooo0
		s.GuestRate, s.ClientRate = float64(s.GuestSent)/s.Seconds, float64(s.Received)/s.Seconds
		return t0, t1, nil
	}
	r, err := b.netRun(ctx, v, interval, measure)
	if err != nil {
		return nil, err
	}
	if s.Received == 0 {
		return nil, fmt.Errorf("the client received nothing in %v (the guest sent %d)", b.modeTime, s.GuestSent)
	}
	var epochs []replicate.EpochStats
	s.benchNetEpochs, epochs = netEpochs(r)
	s.benchGateWindow = v.gateWindow(g0, g1, epochs)
	return s, nil
}

// netGoals compares each interval's added echo latency with its bound.
func netGoals(nr *benchNetResult, verdict func(bool) string) []benchGoal {
	var out []benchGoal
	for _, e := range nr.Echo {
		if e.Mode == "none" {
			continue
		}
		ok := e.Epochs > 0 && e.AddedP50US <= e.BoundUS
		out = append(out, benchGoal{Met: ok, Text: fmt.Sprintf(
			"echo added latency at %s: p50 %.2f ms (rtt p50 %.2f ms, %.2f ms without replication) (goal <= %s/2 + pause p50 %.2f ms + transfer p50 %.2f ms + 1 ms = %.2f ms): %s",
			e.Mode, e.AddedP50US/1e3, e.RTTP50US/1e3, nr.Echo[0].RTTP50US/1e3, e.Mode, e.PauseP50US/1e3, e.TransferP50US/1e3, e.BoundUS/1e3, verdict(ok))})
	}
	return append(out, jobShapeGoals(nr, verdict)...)
}

// jobShapeGoals compares each interval of the main job's shape with its
// goals: the gate's hold p50 at most interval/2 + pause p50 + transfer p50 +
// 1 ms, and the transfer p50 at most goalTransferShare of the interval.
func jobShapeGoals(nr *benchNetResult, verdict func(bool) string) []benchGoal {
	var out []benchGoal
	for _, e := range nr.JobShape {
		if e.Mode == "none" {
			continue
		}
		ok := e.Epochs > 0 && e.HoldP50US > 0 && e.HoldP50US <= e.BoundUS
		out = append(out, benchGoal{Met: ok, Text: fmt.Sprintf(
			"main job's shape at %s: hold p50 %.2f ms (client rtt p50 %.2f ms) = %.2fx the prediction (goal <= %s/2 + pause p50 %.2f ms + transfer p50 %.2f ms + 1 ms = %.2f ms): %s",
			e.Mode, e.HoldP50US/1e3, e.RTTP50US/1e3, e.HoldVsBound, e.Mode, e.PauseP50US/1e3, e.TransferP50US/1e3, e.BoundUS/1e3, verdict(ok))})
		ok = e.Epochs > 0 && e.TransferShare <= goalTransferShare
		out = append(out, benchGoal{Met: ok, Text: fmt.Sprintf(
			"main job's shape at %s: transfer p50 %.2f ms = %.1f%% of the interval, %.0f dirty pages/epoch (goal <= %.0f%%): %s",
			e.Mode, e.TransferP50US/1e3, 100*e.TransferShare, e.DirtyPages, 100*goalTransferShare, verdict(ok))})
	}
	return out
}

// benchPrintNet prints the network section's tables.
func benchPrintNet(w io.Writer, nr *benchNetResult, modeTime time.Duration) {
	fmt.Fprintf(w, "Output commit (network): udp-echo, 1 vCPU, %s, %d requests/s for %v per mode:\n\n",
		testvm.FormatSize(nr.MemSize), nr.EchoRate, modeTime)
	var rows [][]string
	for _, e := range nr.Echo {
		row := []string{benchNetModeName(e.Mode), strconv.FormatUint(e.Sent, 10), strconv.FormatUint(e.Answered, 10),
			benchDur(e.RTTP50US), benchDur(e.RTTP99US)}
		if e.Mode == "none" {
			rows = append(rows, append(row, "-", "-", "-", "-", "-", strconv.FormatUint(e.Held, 10), "-", "-", "-"))
			continue
		}
		rows = append(rows, append(row, benchSignedDur(e.AddedP50US), strconv.FormatUint(e.Epochs, 10), benchDur(e.PauseP50US),
			benchDur(e.TransferP50US), benchDur(e.AckP50US), strconv.FormatUint(e.Held, 10), benchDur(e.HoldP50US),
			benchDur(e.HoldP99US), benchDur(e.BoundUS)))
	}
	benchTable(w, []string{"mode", "requests", "answered", "rtt p50", "rtt p99", "added p50", "epochs", "pause p50",
		"transfer p50", "ack p50", "held", "hold p50", "hold p99", "goal bound"}, rows)

	benchPrintJobShape(w, nr, modeTime)

	fmt.Fprintf(w, "\nHeld-frame throughput: udp-stream, %d-byte datagrams at up to %d/s, %v per mode:\n\n",
		nr.StreamBytes, nr.StreamRate, modeTime)
	rows = nil
	for _, s := range nr.Stream {
		row := []string{benchNetModeName(s.Mode), si(s.GuestRate), si(s.ClientRate), fmt.Sprintf("%.2f", s.VsNone),
			strconv.FormatUint(s.ClientLost, 10), strconv.FormatUint(s.Held, 10), strconv.FormatUint(s.Released, 10),
			strconv.FormatUint(s.Dropped, 10)}
		if s.Mode == "none" {
			rows = append(rows, append(row, "-", "-", "-", "-"))
			continue
		}
		rows = append(rows, append(row, strconv.FormatUint(s.Epochs, 10), benchDur(s.PauseP50US), benchDur(s.HoldP50US), benchDur(s.HoldP99US)))
	}
	benchTable(w, []string{"mode", "guest sent/s", "client frames/s", "vs none", "client lost", "held", "released",
		"dropped", "epochs", "pause p50", "hold p50", "hold p99"}, rows)
	fmt.Fprintf(w, "\nheld-frame throughput: %s frames/s replicated at %v, %.2f of %s frames/s without replication\n",
		si(nr.Stream[1].ClientRate), streamInterval, nr.StreamRatio, si(nr.Stream[0].ClientRate))
}

// benchNetModeName names a network mode in a table.
func benchNetModeName(mode string) string {
	if mode == "none" {
		return "none"
	}
	return "replicated " + mode
}

// benchSignedDur formats a difference of durations in microseconds.
func benchSignedDur(us float64) string {
	if us < 0 {
		return "-" + benchDur(-us)
	}
	return benchDur(us)
}

// benchPrintJobShape prints the echo with the main job's shape.
func benchPrintJobShape(w io.Writer, nr *benchNetResult, modeTime time.Duration) {
	if len(nr.JobShape) == 0 {
		return
	}
	fmt.Fprintf(w, "\nOutput commit with the main job's shape: the dirty workload at full speed (random, stamp pages) and udp-echo on vCPU 0, "+
		"1 vCPU, %s, %d requests/s for %v per mode; prediction = interval/2 + pause p50 + transfer p50 + 1 ms:\n\n",
		testvm.FormatSize(nr.JobMem), nr.EchoRate, modeTime)
	var rows [][]string
	for _, e := range nr.JobShape {
		row := []string{benchNetModeName(e.Mode), strconv.FormatUint(e.Sent, 10), strconv.FormatUint(e.Answered, 10),
			benchDur(e.RTTP50US), benchDur(e.RTTP99US)}
		if e.Mode == "none" {
			rows = append(rows, append(row, "-", "-", "-", "-", "-", "-", "-", strconv.FormatUint(e.Held, 10), "-", "-", "-"))
			continue
		}
		rows = append(rows, append(row, benchSignedDur(e.AddedP50US), strconv.FormatUint(e.Epochs, 10), fmt.Sprintf("%.0f", e.DirtyPages),
			benchDur(e.PauseP50US), benchDur(e.TransferP50US), fmt.Sprintf("%.1f%%", 100*e.TransferShare), benchDur(e.AckP50US),
			strconv.FormatUint(e.Held, 10), benchDur(e.HoldP50US), benchDur(e.BoundUS), fmt.Sprintf("%.2f", e.HoldVsBound)))
	}
	benchTable(w, []string{"mode", "requests", "answered", "rtt p50", "rtt p99", "added p50", "epochs", "dirty pages/epoch", "pause p50",
		"transfer p50", "transfer/interval", "ack p50", "held", "hold p50", "prediction", "hold/prediction"}, rows)
}
