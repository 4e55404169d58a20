package replicate_test

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/nettest"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

// commitClock is an output gate around the real one that records when the
// engine commits each epoch: the moment it has the backup's ack, before a
// single frame of the epoch is released.
type commitClock struct {
	*ebpf.Gate
	mu sync.Mutex
	at map[uint64]time.Time
}

func (c *commitClock) Commit(n uint64) error {
	c.mu.Lock()
	c.at[n] = time.Now()
	c.mu.Unlock()
	return c.Gate.Commit(n)
}

func (c *commitClock) committedAt(n uint64) (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.at[n]
	return t, ok
}

// arrival is a datagram the client received and when.
type arrival struct {
	seq uint64
	at  time.Time
}

// P1 output commit with every real part: a test VM streaming UDP through its
// tap, the BPF gate on the tap, the engine and a backup over TCP, and a
// client in its own namespace. Each datagram the guest produced before the
// pause of epoch N must not reach the client before the engine had N's
// ack; the client sees every number once, in order.
func TestOutputCommit(t *testing.T) {
	ns := nettest.New(t)
	ns.AddTap(t, "tap0", "10.66.0.1/24")
	tap, err := ns.OpenTap("tap0")
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	guestIP := netip.MustParseAddr("10.66.0.2")
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.UDPStream, Tap: tap,
		Net: &testvm.NetConfig{MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2}, IP: guestIP, StreamRate: 5000}}, nil)

	var gate *ebpf.Gate
	if err := ns.Do(func() error {
		var err error
		gate, err = ebpf.New(ebpf.Config{Interface: "tap0", ReleaseCPU: ebpf.AutoCPU})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer gate.Close()
	clock := &commitClock{Gate: gate, at: map[uint64]time.Time{}}

	// The client subscribes and records every datagram with its arrival.
	var conn *net.UDPConn
	if err := ns.Do(func() error {
		var err error
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 66, 0, 1)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var amu sync.Mutex
	var got []arrival
	go func() {
		buf := make([]byte, 2048)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			now := time.Now()
			if n >= 8 {
				amu.Lock()
				got = append(got, arrival{binary.BigEndian.Uint64(buf), now})
				amu.Unlock()
			}
		}
	}()
	if _, err := conn.WriteToUDP([]byte("subscribe"), &net.UDPAddr{IP: guestIP.AsSlice(), Port: testvm.DefaultNetPort}); err != nil {
		t.Fatal(err)
	}
	count := func() int { amu.Lock(); defer amu.Unlock(); return len(got) }
	for deadline := time.Now().Add(vmtest.Wait); count() < 50; {
		if time.Now().After(deadline) {
			t.Fatal("the stream did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	unprotected := count() // these flowed before replication began

	// Replicate. Each epoch's note is the guest's sequence number in its pause.
	var nmu sync.Mutex
	seqAt := map[uint64]uint64{} // epoch -> the guest's sequence number in its pause
	// The client keeps writing to the guest, so the device's writes into
	// guest memory (RX frames, ring positions) go on during replication; the
	// audit in every pause proves they are all replicated.
	sctx, sstop := context.WithCancel(context.Background())
	defer sstop()
	go func() {
		for sctx.Err() == nil {
			conn.WriteToUDP([]byte("subscribe"), &net.UDPAddr{IP: guestIP.AsSlice(), Port: testvm.DefaultNetPort})
			time.Sleep(3 * time.Millisecond)
		}
	}()
	pair := replicatetest.NewPair(t, replicate.Config{VM: m, Interval: 20 * time.Millisecond, Gates: []replicate.OutputGate{clock}, AuditEvery: 1,
		Note:    func() any { return m.Status(0).NetSeq },
		OnEpoch: func(s *replicate.EpochStats) { nmu.Lock(); seqAt[s.Epoch] = s.Note.(uint64); nmu.Unlock() }},
		replicate.BackupConfig{NewMemory: testvm.NewMemFile})
	pair.WaitAcked(60)
	// Check up to the last acknowledged epoch: stopping replication
	// releases what is held.
	last := pair.Primary.LastAcked()
	sstop()
	if err := pair.Stop(); err != nil {
		t.Fatal(err)
	}

	amu.Lock()
	defer amu.Unlock()
	nmu.Lock()
	defer nmu.Unlock()
	checked := 0
	for i, a := range got {
		if i > 0 && a.seq <= got[i-1].seq {
			t.Fatalf("datagram %d: sequence %d after %d (reordered or duplicated)", i, a.seq, got[i-1].seq)
		}
		if i < unprotected {
			continue
		}
		// The epoch whose checkpoint first holds the guest having sent it.
		var epoch uint64
		for n := uint64(1); n <= last; n++ {
			if seqAt[n] >= a.seq {
				epoch = n
				break
			}
		}
		if epoch < 2 {
			// Epoch 1 began with replication, while the guest ran: what it
			// sent just before that passed unheld. Epoch 0: after the last
			// checked epoch.
			continue
		}
		at, ok := clock.committedAt(epoch)
		if !ok || a.at.Before(at) {
			t.Fatalf("P1 broken: datagram %d (epoch %d) reached the client at %v, the engine had the epoch's ack at %v (committed %v)",
				a.seq, epoch, a.at.Format(time.StampMicro), at.Format(time.StampMicro), ok)
		}
		checked++
	}
	if checked < 1000 {
		t.Fatalf("only %d datagrams checked against their epoch's ack (want at least 1000)", checked)
	}
	if rx := m.NetStats().RxFrames; rx < 100 {
		t.Errorf("the device received only %d frames: the audit did not see it write much", rx)
	}
	st := gate.Stats()
	t.Logf("%d datagrams checked over %d epochs; gate: held %d released %d, hold p50 %v p99 %v", checked, last,
		st.Held.Frames, st.Released.Frames, st.Latency.P50, st.Latency.P99)
}
