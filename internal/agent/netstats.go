package agent

import (
	"fmt"
	"io"
	"time"

	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/netlab"
)

// echoClient is the main job's client (internal/netlab, shared with the bench).
type echoClient = netlab.EchoClient

// netAgg sums up the output gate's epochs that ended in a window.
type netAgg struct {
	p50 hist          // each epoch's median hold time
	p99 time.Duration // the largest of the epochs' 99th percentiles
}

func (a *netAgg) add(s ebpf.EpochStats) {
	if s.Released.Frames == 0 {
		return
	}
	a.p50.Add(s.LatencyP50)
	a.p99 = max(a.p99, s.LatencyP99)
}

// onGateEpoch is the gate's per-epoch report (on the gate's goroutine).
func (r *replicator) onGateEpoch(s ebpf.EpochStats) {
	r.netMu.Lock()
	r.netWin.add(s)
	r.netMu.Unlock()
}

// netLine is the network part of a status line.
type netLine struct {
	held, released, dropped float64       // frames per second
	holdP50, holdP99        time.Duration // the time frames were held
	rttN                    uint64        // the job's client: round trips answered
	rttP50, rttP99          time.Duration
}

func (n *netLine) String() string {
	s := fmt.Sprintf("  net held %s/s rel %s/s", si(n.held), si(n.released))
	if n.dropped > 0 {
		s += fmt.Sprintf(" DROPPED %s/s", si(n.dropped))
	}
	s += fmt.Sprintf(" hold p50 %s p99 %s", dur(n.holdP50), dur(n.holdP99))
	if n.rttN > 0 {
		s += fmt.Sprintf("  client rtt p50 %s p99 %s", dur(n.rttP50), dur(n.rttP99))
	}
	return s
}

// netSecond makes the network part of the status line for the second that
// ends, and starts the next. nil without a gate.
func (r *replicator) netSecond(secs float64) *netLine {
	if r.gate == nil {
		return nil
	}
	st := r.gate.Stats()
	r.netMu.Lock()
	w := r.netWin
	r.netWin = netAgg{}
	prev := r.netPrev
	r.netPrev = st
	r.netMu.Unlock()
	n := &netLine{
		held:     float64(st.Held.Frames-prev.Held.Frames) / secs,
		released: float64(st.Released.Frames-prev.Released.Frames) / secs,
		dropped:  float64(st.Dropped()-prev.Dropped()) / secs,
		holdP50:  w.p50.Quantile(0.5),
		holdP99:  w.p99,
	}
	if c := r.client; c != nil {
		n.rttN, n.rttP50, n.rttP99 = c.Second()
	}
	return n
}

// netSummary prints what the output gate (and the job's client) saw.
func (r *replicator) netSummary(w io.Writer) {
	if r.gate == nil {
		return
	}
	s := r.gate.Stats()
	fmt.Fprintf(w, "  output commit on %s: held %d frames (%s), released %d, dropped %d (ring %d, hold limit %d, too big %d), discarded %d, failed %d\n",
		r.gate.Interface(), s.Held.Frames, bytesSI(float64(s.Held.Bytes)), s.Released.Frames, s.Dropped(),
		s.DroppedRingFull.Frames, s.DroppedHoldLimit.Frames, s.DroppedTooBig.Frames, s.Discarded.Frames, s.Failed.Frames)
	fmt.Fprintf(w, "  hold time (added latency): p50 %s p99 %s max %s\n", dur(s.Latency.P50), dur(s.Latency.P99), dur(s.Latency.Max))
	p := s.Protocols
	fmt.Fprintf(w, "  held by protocol: ARP %d, IPv4 %d (UDP %d, TCP %d, ICMP %d), IPv6 %d, other %d\n", p.ARP, p.IPv4, p.UDP, p.TCP, p.ICMP, p.IPv6, p.Other)
	if r.o.Pcap != "" {
		fmt.Fprintf(w, "  pcap: released frames in %s\n", r.o.Pcap)
	}
	if c := r.client; c != nil {
		t := c.Totals()
		fmt.Fprintf(w, "  client: %d echoes sent, %d answered, %d out of order; rtt p50 %s p99 %s (%s before replication)\n",
			t.Sent, t.Answered, t.Bad, dur(t.P50), dur(t.P99), dur(t.Baseline))
	}
}
