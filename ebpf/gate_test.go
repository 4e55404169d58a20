package ebpf

import (
	"bytes"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// heldWait is how long a test waits to be sure held frames stay held.
const heldWait = 200 * time.Millisecond

func TestPassThrough(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)

	// No gate: the test network itself delivers.
	n.sendSeqs(t, 1, 5)
	c.expect(t, seqRange(1, 5))

	// A gate never opened passes frames without copying them: the hold
	// path is never entered.
	g := n.newGate(t, Config{})
	n.sendSeqs(t, 6, 10)
	c.expect(t, seqRange(6, 10))
	if seq := atomic.LoadUint64(&g.att.ctl.Seq); seq != 0 {
		t.Errorf("hold path entered %d times in pass mode, want 0", seq)
	}
	s := syncStats(g)
	if s.Mode != ModePass || s.Held != (Counter{}) || s.InRing != 0 || s.Released != (Counter{}) {
		t.Errorf("stats in pass mode: %+v, want pass mode and nothing held", s)
	}
}

func TestHoldCommit(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	var log epochLog
	g := n.newGate(t, Config{OnEpoch: log.add})

	must(t, g.Open(1))
	n.sendSeqs(t, 1, 10)
	c.none(t, heldWait)
	must(t, g.Open(2))
	n.sendSeqs(t, 11, 20)
	c.none(t, heldWait/2)

	must(t, g.Commit(1))
	c.expect(t, seqRange(1, 10))
	c.none(t, heldWait/2)
	must(t, g.Commit(2))
	c.expect(t, seqRange(11, 20))
	c.none(t, heldWait/2)

	s := syncStats(g)
	ten := Counter{10, 600}
	if s.Mode != ModeHold || s.OpenEpoch != 2 || s.CommittedEpoch != 2 {
		t.Errorf("mode %v, open epoch %d, committed %d: want hold, 2, 2", s.Mode, s.OpenEpoch, s.CommittedEpoch)
	}
	if s.Held != (Counter{20, 1200}) || s.Released != s.Held || s.Pending != (Counter{}) || s.InRing != 0 {
		t.Errorf("held %+v released %+v pending %+v in ring %d: want 20 frames (1200 bytes) held and released", s.Held, s.Released, s.Pending, s.InRing)
	}
	if s.Protocols != (Protocols{IPv4: 20, UDP: 20}) {
		t.Errorf("protocols %+v, want 20 IPv4 UDP", s.Protocols)
	}
	es := log.get()
	if len(es) != 2 {
		t.Fatalf("OnEpoch called %d times, want 2: %+v", len(es), es)
	}
	for i, e := range es {
		if e.Epoch != uint64(i+1) || e.Outcome != OutcomeCommitted || e.Held != ten || e.Released != ten ||
			e.Discarded != (Counter{}) || e.DroppedHoldLimit != (Counter{}) || e.DroppedRingFull != (Counter{}) || e.Failed != (Counter{}) {
			t.Errorf("epoch stats %+v, want epoch %d committed with 10 frames held and released", e, i+1)
		}
	}
	// Epoch 1's frames were held for at least heldWait*1.5.
	if min := heldWait * 3 / 2; es[0].LatencyP50 < min*8/10 || es[0].LatencyMax < es[0].LatencyP50 {
		t.Errorf("epoch 1 hold latency p50 %v max %v, want about %v or more", es[0].LatencyP50, es[0].LatencyMax, min)
	}
	if s.Latency.Max < es[0].LatencyP50 {
		t.Errorf("overall latency max %v below epoch 1's p50 %v", s.Latency.Max, es[0].LatencyP50)
	}
}

// Frames towards the VM pass while the gate holds the VM's own.
func TestToVMNotHeld(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	g := n.newGate(t, Config{})
	must(t, g.Open(1))
	n.sendSeqs(t, 1, 3)

	// The client sends to the VM; the VM reads its tap.
	to := &net.UDPAddr{IP: vmIP.AsSlice(), Port: vmPort}
	for i := range 5 {
		if _, err := n.client.WriteToUDP([]byte{'v', 'm', byte(i)}, to); err != nil {
			t.Fatal(err)
		}
	}
	got := 0
	buf := make([]byte, 65536)
	deadline := time.Now().Add(time.Second)
	for got < 5 {
		n.tap.SetReadDeadline(deadline)
		k, err := n.tap.Read(buf)
		if err != nil {
			t.Fatalf("VM read %d of 5 frames sent to it: %v", got, err)
		}
		p := gopacket.NewPacket(buf[:k], layers.LayerTypeEthernet, gopacket.Default)
		if u, ok := p.Layer(layers.LayerTypeUDP).(*layers.UDP); ok && u.DstPort == vmPort {
			if want := []byte{'v', 'm', byte(got)}; !bytes.Equal(u.Payload, want) {
				t.Fatalf("VM got payload %q, want %q", u.Payload, want)
			}
			got++
		}
	}
	c.none(t, heldWait/2)
	if s := syncStats(g); s.Held.Frames != 3 || s.Pending.Frames != 3 {
		t.Errorf("held %+v pending %+v: want only the VM's 3 frames", s.Held, s.Pending)
	}
	must(t, g.Commit(1))
	c.expect(t, seqRange(1, 3))
}

// Past the hold limit frames are dropped and counted, never delivered.
func TestHoldLimit(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	var log epochLog
	g := n.newGate(t, Config{HoldLimit: MinHoldLimit, OnEpoch: log.add})
	// 1000-byte frames take 1024 bytes of the 4096-byte queue: 4 fit.
	must(t, g.Open(1))
	for s := uint64(1); s <= 10; s++ {
		n.send(t, n.vmFrame(t, s, 1000))
	}
	c.none(t, heldWait/2)
	must(t, g.Commit(1))
	c.expect(t, seqRange(1, 4))
	c.none(t, heldWait/2)
	// The queue has room again.
	must(t, g.Open(2))
	n.send(t, n.vmFrame(t, 11, 1000), n.vmFrame(t, 12, 1000))
	must(t, g.Commit(2))
	c.expect(t, []uint64{11, 12})
	es := log.get()
	if len(es) != 2 {
		t.Fatalf("%d epochs reported, want 2", len(es))
	}
	if e := es[0]; e.Held != (Counter{4, 4000}) || e.Released != e.Held || e.DroppedHoldLimit != (Counter{6, 6000}) {
		t.Errorf("epoch 1: held %+v released %+v dropped at the hold limit %+v: want 4, 4, 6 frames", e.Held, e.Released, e.DroppedHoldLimit)
	}
	if s := syncStats(g); s.DroppedHoldLimit != (Counter{6, 6000}) || s.Released.Frames != 6 {
		t.Errorf("stats: dropped at the hold limit %+v, released %+v", s.DroppedHoldLimit, s.Released)
	}
}

// When userspace does not read the ring, the tap program drops what does not
// fit and counts it against the epoch; nothing leaks.
func TestRingFull(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	var log epochLog
	g := n.newGate(t, Config{RingSize: MinRingSize, OnEpoch: log.add})
	must(t, g.Open(1))
	resume := g.stall(t)
	// 1500-byte frames take 1576 bytes of ring each: 83 fit in 128 KiB.
	const sent, fit = 100, MinRingSize / (8 + recordHeaderSize + 1536)
	for s := uint64(1); s <= sent; s++ {
		n.send(t, n.vmFrame(t, s, 1500))
	}
	c.none(t, heldWait/2)
	resume()
	must(t, g.Commit(1))
	c.expect(t, seqRange(1, fit))
	c.none(t, heldWait/2)
	es := log.get()
	if len(es) != 1 {
		t.Fatalf("%d epochs reported, want 1", len(es))
	}
	e := es[0]
	if e.Held.Frames != fit || e.Released.Frames != fit || e.DroppedRingFull != (Counter{sent - fit, (sent - fit) * 1500}) {
		t.Errorf("epoch 1: held %+v released %+v dropped ring full %+v: want %d, %d, %d frames", e.Held, e.Released, e.DroppedRingFull, fit, fit, sent-fit)
	}
	if s := syncStats(g); s.DroppedRingFull.Frames != sent-fit {
		t.Errorf("stats: ring-full drops %+v, want %d", s.DroppedRingFull, sent-fit)
	}
}

func TestDiscard(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	var log epochLog
	g := n.newGate(t, Config{OnEpoch: log.add})
	for e := uint64(1); e <= 3; e++ {
		must(t, g.Open(e))
		n.sendSeqs(t, e*10+1, e*10+5)
	}
	must(t, g.Discard(1))
	must(t, g.Commit(1))
	c.expect(t, seqRange(11, 15))
	c.none(t, heldWait/2)
	// Epoch numbers above the discarded point can be opened again, once the
	// gate was released.
	if err := g.Open(2); err == nil {
		t.Fatal("Open(2) right after Discard(1) was accepted; want Release first")
	}
	must(t, g.Release())
	if err := g.Open(2); err != nil {
		t.Fatalf("reopen epoch 2 after Discard(1) and Release: %v", err)
	}
	n.sendSeqs(t, 41, 43)
	must(t, g.Commit(2))
	c.expect(t, seqRange(41, 43))
	c.none(t, heldWait/2)

	want := []struct {
		epoch     uint64
		outcome   Outcome
		released  uint64
		discarded uint64
	}{{2, OutcomeDiscarded, 0, 5}, {3, OutcomeDiscarded, 0, 5}, {1, OutcomeCommitted, 5, 0}, {2, OutcomeCommitted, 3, 0}}
	es := log.get()
	if len(es) != len(want) {
		t.Fatalf("epochs reported: %+v, want %d", es, len(want))
	}
	for i, w := range want {
		e := es[i]
		if e.Epoch != w.epoch || e.Outcome != w.outcome || e.Released.Frames != w.released || e.Discarded.Frames != w.discarded {
			t.Errorf("report %d: epoch %d %v released %d discarded %d, want epoch %d %v released %d discarded %d",
				i, e.Epoch, e.Outcome, e.Released.Frames, e.Discarded.Frames, w.epoch, w.outcome, w.released, w.discarded)
		}
	}
	if s := syncStats(g); s.Discarded.Frames != 10 || s.Released.Frames != 8 || s.Pending.Frames != 0 {
		t.Errorf("stats: discarded %+v released %+v pending %+v", s.Discarded, s.Released, s.Pending)
	}
}

// Release lets out everything held, then new frames, with a writer that
// keeps sending throughout: the client sees one unbroken sequence.
func TestRelease(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	var log epochLog
	g := n.newGate(t, Config{OnEpoch: log.add})
	must(t, g.Open(1))
	const held, total = 10000, 16000
	n.sendSeqs(t, 1, held/2)
	must(t, g.Open(2))
	n.sendSeqs(t, held/2+1, held)
	// The writer goes on while Release sends the held frames out.
	var next atomic.Uint64
	next.Store(held + 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for s := next.Load(); s <= total; s = next.Add(1) {
			if _, err := n.tap.Write(n.vmFrame(t, s, 60)); err != nil {
				t.Errorf("write frame %d: %v", s, err)
				return
			}
			if s%100 == 0 {
				time.Sleep(100 * time.Microsecond)
			}
		}
	}()
	for next.Load() < held+100 {
		time.Sleep(10 * time.Microsecond)
	}
	must(t, g.Release())
	<-done
	got := c.take(t, total, 5*time.Second)
	if !slices.Equal(got, seqRange(1, total)) {
		for i, s := range got {
			if s != uint64(i+1) {
				t.Fatalf("client got frame %d at position %d (want %d): order broken or frame lost", s, i, i+1)
			}
		}
	}
	c.none(t, heldWait/2)
	s := syncStats(g)
	if s.Mode != ModePass {
		t.Errorf("mode %v after Release, want pass", s.Mode)
	}
	es := log.get()
	if len(es) != 2 || es[0].Outcome != OutcomeReleased || es[1].Outcome != OutcomeReleased {
		t.Errorf("epochs reported %+v, want 1 and 2 released", es)
	}
	t.Logf("held %d, of which drained after Release %d; passed unheld %d", s.Held.Frames, s.Drained.Frames, total-s.Held.Frames)

	// Caught up: frames pass without entering the hold path.
	seq := atomic.LoadUint64(&g.att.ctl.Seq)
	n.sendSeqs(t, total+1, total+10)
	c.expect(t, seqRange(total+1, total+10))
	if now := atomic.LoadUint64(&g.att.ctl.Seq); now != seq {
		t.Errorf("%d frames entered the hold path after the gate caught up, want 0", now-seq)
	}

	// Open holds again.
	must(t, g.Open(3))
	n.sendSeqs(t, total+11, total+12)
	c.none(t, heldWait/2)
	must(t, g.Commit(3))
	c.expect(t, seqRange(total+11, total+12))
}

// After Release, a frame that arrives while held frames are still on their
// way out is held behind them (a drain record) and released right after
// them, never before.
func TestReleaseDrain(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	g := n.newGate(t, Config{})
	must(t, g.Open(1))
	n.sendSeqs(t, 1, 10)
	c.none(t, heldWait/2)
	// The VM sends 11..15 just as the first held frame goes out.
	sent := false
	g.own.beforeSend = func() {
		if !sent {
			sent = true
			seq0 := atomic.LoadUint64(&g.att.ctl.Seq)
			n.sendSeqs(t, 11, 15)
			// Wait until the TC program has taken them (they travel
			// through the kernel on their own time): only then is the first
			// held frame's send "just as" they arrive, not before.
			for deadline := time.Now().Add(5 * time.Second); atomic.LoadUint64(&g.att.ctl.Seq) < seq0+5; {
				if time.Now().After(deadline) {
					t.Errorf("frames 11..15 did not reach the hold path in 5s")
					break
				}
				time.Sleep(100 * time.Microsecond)
			}
		}
	}
	must(t, g.Release())
	c.expect(t, seqRange(1, 15))
	s := syncStats(g)
	if s.Drained != (Counter{5, 300}) || s.Held.Frames != 15 || s.Released.Frames != 15 {
		t.Errorf("drained %+v held %+v released %+v: want 5 drained, 15 held and released", s.Drained, s.Held, s.Released)
	}
	seq := atomic.LoadUint64(&g.att.ctl.Seq)
	n.sendSeqs(t, 16, 20)
	c.expect(t, seqRange(16, 20))
	if now := atomic.LoadUint64(&g.att.ctl.Seq); now != seq {
		t.Errorf("%d frames entered the hold path after the gate caught up, want 0", now-seq)
	}
}

// Thousands of frames over many epochs, committed one epoch behind like
// the engine does: strict order, nothing lost or doubled.
func TestOrderUnderLoad(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	g := n.newGate(t, Config{ReleaseCPU: AutoCPU})
	const epochs, perEpoch = 20, 500
	seq := uint64(0)
	for e := uint64(1); e <= epochs; e++ {
		must(t, g.Open(e))
		if e > 1 {
			must(t, g.Commit(e-1))
		}
		for range perEpoch {
			seq++
			n.send(t, n.vmFrame(t, seq, 60+int(seq%1400)))
		}
	}
	must(t, g.Commit(epochs))
	got := c.take(t, epochs*perEpoch, 10*time.Second)
	for i, s := range got {
		if s != uint64(i+1) {
			t.Fatalf("client got frame %d at position %d, want %d", s, i, i+1)
		}
	}
	c.none(t, heldWait/2)
	s := syncStats(g)
	if s.Released.Frames != epochs*perEpoch || s.Lost != 0 || s.Failed.Frames != 0 {
		t.Errorf("released %d lost %d failed %d, want %d released", s.Released.Frames, s.Lost, s.Failed.Frames, epochs*perEpoch)
	}
}

// After Discard the gate takes no Open until Release: frames the VM sends
// meanwhile have no epoch, and Release lets them out in order.
func TestDiscardThenRelease(t *testing.T) {
	n := newTestNet(t)
	g := n.newGate(t, Config{})
	c := n.collect(t)
	for e := uint64(1); e <= 3; e++ {
		must(t, g.Open(e))
	}
	n.sendSeqs(t, 1, 5)
	must(t, g.Discard(1))
	if err := g.Open(2); err == nil || !strings.Contains(err.Error(), "Release the gate first") {
		t.Fatalf("Open after Discard: %v, want a refusal", err)
	}
	n.sendSeqs(t, 6, 8)
	c.none(t, 100*time.Millisecond)
	must(t, g.Release())
	if got := c.take(t, 3, 5*time.Second); !slices.Equal(got, seqRange(6, 8)) {
		t.Fatalf("released %v, want only the frames sent after Discard, %v", got, seqRange(6, 8))
	}
	if err := g.Open(2); err != nil {
		t.Fatalf("Open after Release: %v", err)
	}
}

// syncStats is g's statistics once the owner has handled every record the
// ring holds: the owner publishes its counters after a batch, which may be
// after a test saw the frames arrive, so a bare Stats can lag behind.
// After Close, it is Stats.
func syncStats(g *Gate) Stats {
	g.call(func() error { return nil }) // drains the ring, then publishes; an error means the gate is closed
	return g.Stats()
}
