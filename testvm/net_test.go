package testvm_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/nettest"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/testvm"
)

var (
	guestMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	guestIP  = netip.MustParseAddr("10.66.0.2")
)

// netRig is a namespace whose tap (tap0, 10.66.0.1/24) is the guest's
// network; the namespace's own stack is the client.
type netRig struct {
	ns  *nettest.Namespace
	tap *os.File
}

func newNetRig(t *testing.T) *netRig {
	t.Helper()
	ns := nettest.New(t)
	ns.AddTap(t, "tap0", "10.66.0.1/24")
	tap, err := ns.OpenTap("tap0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tap.Close() })
	return &netRig{ns: ns, tap: tap}
}

// client opens a UDP socket in the namespace, closed with the test.
func (r *netRig) client(t *testing.T) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := r.ns.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 66, 0, 1)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func netConfig(w testvm.Workload, tap *os.File) testvm.Config {
	return testvm.Config{MemSize: 64 << 20, VCPUs: 1, Workload: w, Tap: tap,
		Net: &testvm.NetConfig{MAC: guestMAC, IP: guestIP, StreamRate: 2000}}
}

var guestAddr = &net.UDPAddr{IP: guestIP.AsSlice(), Port: testvm.DefaultNetPort}

// TestNetEcho: the client resolves the guest by ARP (the guest answers it)
// and every datagram comes back with its payload behind sequence numbers
// 1, 2, 3, ...
func TestNetEcho(t *testing.T) {
	r := newNetRig(t)
	m := vmtest.Boot(t, netConfig(testvm.UDPEcho, r.tap), nil)
	c := r.client(t)
	buf := make([]byte, 2048)
	const n = 200
	for i := 1; i <= n; i++ {
		msg := []byte(strings.Repeat("x", i%50) + "hello")
		if _, err := c.WriteToUDP(msg, guestAddr); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(vmtest.Wait))
		k, from, err := c.ReadFromUDP(buf)
		if err != nil {
			t.Fatalf("datagram %d: no answer: %v (guest %+v, device %+v)", i, err, m.Status(0), m.NetStats())
		}
		if from.Port != testvm.DefaultNetPort || !from.IP.Equal(guestIP.AsSlice()) {
			t.Fatalf("answer from %v", from)
		}
		if k != 8+len(msg) {
			t.Fatalf("answer %d: %d bytes, want %d", i, k, 8+len(msg))
		}
		if seq := binary.BigEndian.Uint64(buf); seq != uint64(i) {
			t.Fatalf("answer %d carries sequence %d", i, seq)
		}
		if !bytes.Equal(buf[8:k], msg) {
			t.Fatalf("answer %d: payload %q, want %q", i, buf[8:k], msg)
		}
	}
	// The device counts a frame after its write to the tap returns, which
	// may be after the client read it: give the counter a moment.
	// Likewise the guest updates its iterations after the frame is out.
	st, ds := m.Status(0), m.NetStats()
	for deadline := time.Now().Add(vmtest.Wait); (ds.TxFrames < st.NetTx || st.Iterations < n) && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
		st, ds = m.Status(0), m.NetStats()
	}
	if st.NetSeq != n || st.Iterations != n {
		t.Errorf("guest says seq %d, iterations %d; want %d", st.NetSeq, st.Iterations, n)
	}
	// n echoes plus at least one ARP reply went out; the device sent what the
	// guest put on its ring.
	if st.NetTx < n+1 || ds.TxFrames != st.NetTx {
		t.Errorf("guest put %d frames on its TX ring, device sent %d (want >= %d, equal)", st.NetTx, ds.TxFrames, n+1)
	}
	if ds.RxFrames < n+1 || ds.TxErrors != 0 || ds.RxDropped != 0 {
		t.Errorf("device stats %+v", ds)
	}
	t.Logf("guest %+v device %+v", st, ds)
}

// readSeqs reads stream datagrams until it has want of them (or the deadline)
// and returns their sequence numbers in arrival order.
func readSeqs(t *testing.T, c *net.UDPConn, want int) []uint64 {
	t.Helper()
	var seqs []uint64
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(vmtest.Wait))
	for len(seqs) < want {
		k, err := c.Read(buf)
		if err != nil {
			t.Fatalf("after %d datagrams: %v", len(seqs), err)
		}
		if k != testvm.DefaultStreamBytes {
			t.Fatalf("datagram of %d bytes, want %d", k, testvm.DefaultStreamBytes)
		}
		seq := binary.BigEndian.Uint64(buf)
		for i := 16; i < k; i++ {
			if buf[i] != byte(seq+uint64(i)) {
				t.Fatalf("datagram %d: byte %d is %#x, want %#x", seq, i, buf[i], byte(seq+uint64(i)))
			}
		}
		seqs = append(seqs, seq)
	}
	return seqs
}

// consecutive checks that seqs is first, first+1, ... with nothing missing,
// repeated or out of order.
func consecutive(t *testing.T, seqs []uint64, first uint64) {
	t.Helper()
	for i, s := range seqs {
		if s != first+uint64(i) {
			t.Fatalf("datagram %d has sequence %d, want %d (sequence: %v...)", i, s, first+uint64(i), seqs[max(0, i-3):min(len(seqs), i+3)])
		}
	}
}

// TestNetStream: a datagram subscribes the client, which then receives the
// stream, numbered from 1, none lost on the way.
func TestNetStream(t *testing.T) {
	r := newNetRig(t)
	m := vmtest.Boot(t, netConfig(testvm.UDPStream, r.tap), nil)
	c := r.client(t)
	if _, err := c.WriteToUDP([]byte("subscribe"), guestAddr); err != nil {
		t.Fatal(err)
	}
	consecutive(t, readSeqs(t, c, 500), 1)
	st := m.Status(0)
	if want := netip.AddrPortFrom(netip.MustParseAddr("10.66.0.1"), uint16(c.LocalAddr().(*net.UDPAddr).Port)); st.StreamPeer != want {
		t.Errorf("guest streams to %v, want %v", st.StreamPeer, want)
	}
}

// TestNetSaveRestore: a machine saved mid-stream and restored (on the same
// tap) sends exactly the datagrams that follow: frames the device had sent
// are in the saved ring position, frames still on the ring are sent by the
// restored device. The client sees 1, 2, 3, ... with no gap and no repeat.
func TestNetSaveRestore(t *testing.T) {
	r := newNetRig(t)
	cfg := netConfig(testvm.UDPStream, r.tap)
	cfg.DirtyLog = true
	m := vmtest.Boot(t, cfg, nil)
	c := r.client(t)
	if _, err := c.WriteToUDP([]byte("subscribe"), guestAddr); err != nil {
		t.Fatal(err)
	}
	seqs := readSeqs(t, c, 300)
	state, mem := checkpoint(t, m, true)
	sent := m.NetStats().TxFrames
	m.Close()
	r2, err := testvm.Restore(state, mem, testvm.RestoreOptions{Tap: r.tap})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if err := r2.Start(); err != nil {
		t.Fatal(err)
	}
	// Everything the first machine sent, then the restored one's datagrams.
	more := readSeqs(t, c, int(sent)-len(seqs)+300)
	consecutive(t, append(seqs, more...), 1)
	if st := r2.Status(0); st.NetSeq < uint64(len(seqs)+len(more)) {
		t.Errorf("restored guest at sequence %d, client has %d", st.NetSeq, len(seqs)+len(more))
	}
}

// TestNetStateMismatch: a state whose ring positions disagree with the
// memory image is refused, naming the problem.
func TestNetStateMismatch(t *testing.T) {
	r := newNetRig(t)
	m := vmtest.Boot(t, netConfig(testvm.UDPEcho, r.tap), nil)
	c := r.client(t)
	if _, err := c.WriteToUDP([]byte("x"), guestAddr); err != nil {
		t.Fatal(err)
	}
	readOne := make([]byte, 64)
	c.SetReadDeadline(time.Now().Add(vmtest.Wait))
	if _, err := c.Read(readOne); err != nil {
		t.Fatal(err)
	}
	// Memory from before the guest ever sent anything: ring positions 0.
	state, mem := checkpoint(t, m, false)
	defer mem.Close()
	_, err := testvm.Restore(state, mem, testvm.RestoreOptions{Tap: r.tap})
	if !errors.Is(err, testvm.ErrBadState) || !strings.Contains(err.Error(), "network rings") {
		t.Fatalf("restore with another checkpoint's memory: %v, want ErrBadState naming the network rings", err)
	}
}

func TestNetConfigErrors(t *testing.T) {
	ok := testvm.NetConfig{MAC: guestMAC, IP: guestIP}
	for _, tc := range []struct {
		name string
		cfg  testvm.Config
		want string
	}{
		{"echo without net", testvm.Config{VCPUs: 1, Workload: testvm.UDPEcho}, "needs a network device"},
		{"short MAC", testvm.Config{VCPUs: 1, Net: &testvm.NetConfig{MAC: guestMAC[:5], IP: guestIP}}, "not a 6-byte"},
		{"multicast MAC", testvm.Config{VCPUs: 1, Net: &testvm.NetConfig{MAC: net.HardwareAddr{1, 0, 0x5e, 0, 0, 1}, IP: guestIP}}, "multicast"},
		{"IPv6", testvm.Config{VCPUs: 1, Net: &testvm.NetConfig{MAC: guestMAC, IP: netip.MustParseAddr("fe80::1")}}, "not an IPv4"},
		{"no IP", testvm.Config{VCPUs: 1, Net: &testvm.NetConfig{MAC: guestMAC}}, "not an IPv4"},
		{"broadcast IP", testvm.Config{VCPUs: 1, Net: &testvm.NetConfig{MAC: guestMAC, IP: netip.MustParseAddr("255.255.255.255")}}, "not a unicast"},
		{"tiny datagrams", testvm.Config{VCPUs: 1, Net: &testvm.NetConfig{MAC: guestMAC, IP: guestIP, StreamBytes: 8}}, "want 16 to 1472"},
		{"tap without net", testvm.Config{VCPUs: 1, Tap: os.Stdin}, "tap without a network device"},
	} {
		err := tc.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	if err := (testvm.Config{VCPUs: 2, Workload: testvm.UDPStream, Net: &ok}).Validate(); err != nil {
		t.Errorf("valid config: %v", err)
	}
	if _, err := testvm.ParseWorkload("udp-stream"); err != nil {
		t.Error(err)
	}
}

// TestNetServiceWithDirty: with Net.Service, vCPU 0 answers echoes between
// its dirty workload's page writes, and the pages still verify.
func TestNetServiceWithDirty(t *testing.T) {
	r := newNetRig(t)
	cfg := netConfig(testvm.Dirty, r.tap)
	cfg.VCPUs = 2
	cfg.Net.Service = testvm.UDPEcho
	m := vmtest.Boot(t, cfg, nil)
	c := r.client(t)
	buf := make([]byte, 64)
	for i := 1; i <= 50; i++ {
		if _, err := c.WriteToUDP([]byte("ping"), guestAddr); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(vmtest.Wait))
		k, err := c.Read(buf)
		if err != nil {
			t.Fatalf("echo %d: %v", i, err)
		}
		if seq := binary.BigEndian.Uint64(buf); k != 12 || seq != uint64(i) || string(buf[8:k]) != "ping" {
			t.Fatalf("echo %d: %d bytes, sequence %d, payload %q", i, k, seq, buf[8:k])
		}
	}
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if st := m.Status(i); st.Writes == 0 {
			t.Errorf("vCPU %d wrote no pages while serving", i)
		}
		if _, err := m.VerifyPages(i); err != nil {
			t.Errorf("vCPU %d: %v", i, err)
		}
	}
	if st := m.Status(1); st.NetSeq != 0 {
		t.Errorf("vCPU 1 served the network (sequence %d): only vCPU 0 should", st.NetSeq)
	}
}
