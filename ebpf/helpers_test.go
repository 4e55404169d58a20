package ebpf

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/repagent/repagent/internal/nettest"
)

// The test network: a namespace with a tap, tapName, whose host side has
// hostIP; the test plays the VM (vmIP, vmMAC) by writing frames into the
// tap's file descriptor, and a UDP socket on hostIP:clientPort in the
// namespace plays the client the VM talks to.
const (
	tapName    = "tap0"
	vmMACText  = "02:00:00:00:00:02"
	clientPort = 6000
	vmPort     = 5000
)

var (
	hostIP = netip.MustParseAddr("10.77.0.1")
	vmIP   = netip.MustParseAddr("10.77.0.2")
	vmMAC  = net.HardwareAddr{2, 0, 0, 0, 0, 2}
)

type testNet struct {
	ns      *nettest.Namespace
	tap     *os.File // the VM's end
	tapMAC  net.HardwareAddr
	ifindex int
	client  *net.UDPConn
}

// newTestNet makes the namespace, the tap, the neighbour entry for the VM
// and the client socket.
func newTestNet(tb testing.TB) *testNet {
	tb.Helper()
	ns := nettest.New(tb)
	ns.AddTap(tb, tapName, hostIP.String()+"/24")
	tap, err := ns.OpenTap(tapName)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tap.Close() })
	ns.Neigh(tb, vmIP, vmMACText, tapName)
	n := &testNet{ns: ns, tap: tap}
	err = ns.Do(func() error {
		ifi, err := net.InterfaceByName(tapName)
		if err != nil {
			return err
		}
		n.tapMAC, n.ifindex = ifi.HardwareAddr, ifi.Index
		n.client, err = net.ListenUDP("udp4", &net.UDPAddr{IP: hostIP.AsSlice(), Port: clientPort})
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { n.client.Close() })
	// Room for every frame a test sends while it is not reading.
	setRcvbuf(tb, n.client, 64<<20)
	return n
}

func setRcvbuf(tb testing.TB, c *net.UDPConn, size int) {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
	}); err != nil {
		tb.Fatal(err)
	}
	if serr != nil {
		tb.Fatalf("SO_RCVBUFFORCE: %v", serr)
	}
}

// newGate attaches a gate to the test tap (inside the namespace) and closes
// it when the test ends unless the test did.
func (n *testNet) newGate(tb testing.TB, cfg Config) *Gate {
	tb.Helper()
	cfg.Interface = tapName
	var g *Gate
	err := n.ns.Do(func() error {
		var err error
		g, err = New(cfg)
		return err
	})
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	tb.Cleanup(func() {
		if err := g.Close(); err != nil && !errors.Is(err, ErrClosed) {
			tb.Errorf("Close: %v", err)
		}
	})
	return g
}

// vmFrame is a UDP frame from the VM to the client, size bytes long (at
// least 60), whose payload starts with seq.
func (n *testNet) vmFrame(tb testing.TB, seq uint64, size int) []byte {
	tb.Helper()
	payload := make([]byte, max(size-14-20-8, 8))
	binary.BigEndian.PutUint64(payload, seq)
	return udpFrame(tb, vmMAC, n.tapMAC, vmIP, hostIP, vmPort, clientPort, payload)
}

func udpFrame(tb testing.TB, src, dst net.HardwareAddr, sip, dip netip.Addr, sport, dport int, payload []byte, extra ...gopacket.SerializableLayer) []byte {
	tb.Helper()
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: sip.AsSlice(), DstIP: dip.AsSlice()}
	udp := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		tb.Fatal(err)
	}
	buf := gopacket.NewSerializeBuffer()
	ls := []gopacket.SerializableLayer{eth, ip, udp, gopacket.Payload(payload)}
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// send writes frames into the tap as the VM.
func (n *testNet) send(tb testing.TB, frames ...[]byte) {
	tb.Helper()
	for _, f := range frames {
		if _, err := n.tap.Write(f); err != nil {
			tb.Fatalf("write %d-byte frame into the tap: %v", len(f), err)
		}
	}
}

// sendSeqs sends one 60-byte frame per seq.
func (n *testNet) sendSeqs(tb testing.TB, from, to uint64) {
	tb.Helper()
	for s := from; s <= to; s++ {
		n.send(tb, n.vmFrame(tb, s, 60))
	}
}

// collector reads the client socket in the background and hands over the
// sequence numbers it receives.
type collector struct {
	ch   chan uint64
	stop chan struct{}
	wg   sync.WaitGroup
}

func (n *testNet) collect(tb testing.TB) *collector { return collectFrom(tb, n.client) }

// collectFrom reads conn in the background, as collect does the client's.
func collectFrom(tb testing.TB, conn *net.UDPConn) *collector {
	c := &collector{ch: make(chan uint64, 1<<20), stop: make(chan struct{})}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		b := make([]byte, 65536)
		for {
			select {
			case <-c.stop:
				return
			default:
			}
			conn.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			k, err := conn.Read(b)
			if err != nil {
				continue
			}
			if k >= 8 {
				c.ch <- binary.BigEndian.Uint64(b)
			}
		}
	}()
	tb.Cleanup(func() { close(c.stop); c.wg.Wait() })
	return c
}

// take returns the next want sequence numbers, failing the test if they do
// not all come within timeout.
func (c *collector) take(tb testing.TB, want int, timeout time.Duration) []uint64 {
	tb.Helper()
	got := make([]uint64, 0, want)
	deadline := time.After(timeout)
	for len(got) < want {
		select {
		case s := <-c.ch:
			got = append(got, s)
		case <-deadline:
			tb.Fatalf("client got %d of %d frames within %v: %v", len(got), want, timeout, abbrev(got))
		}
	}
	return got
}

// expect fails the test unless the next sequence numbers, within a second,
// are want.
func (c *collector) expect(tb testing.TB, want []uint64) {
	tb.Helper()
	if got := c.take(tb, len(want), time.Second); !slices.Equal(got, want) {
		tb.Fatalf("client got %v, want %v", abbrev(got), abbrev(want))
	}
}

// none fails the test if the client receives anything within wait.
func (c *collector) none(tb testing.TB, wait time.Duration) {
	tb.Helper()
	select {
	case s := <-c.ch:
		tb.Fatalf("client got frame %d, want nothing (held)", s)
	case <-time.After(wait):
	}
}

// must fails the test if err is not nil.
func must(tb testing.TB, err error) {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
}

// seqRange is from..to.
func seqRange(from, to uint64) []uint64 {
	var s []uint64
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}

func abbrev(s []uint64) []uint64 {
	if len(s) > 20 {
		return s[:20]
	}
	return s
}

// epochLog records OnEpoch calls.
type epochLog struct {
	mu sync.Mutex
	es []EpochStats
}

func (l *epochLog) add(s EpochStats) {
	l.mu.Lock()
	l.es = append(l.es, s)
	l.mu.Unlock()
}

func (l *epochLog) get() []EpochStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]EpochStats(nil), l.es...)
}

// stall blocks the gate's goroutine, so the ring buffer is not read, until
// resume is called.
func (g *Gate) stall(tb testing.TB) (resume func()) {
	tb.Helper()
	started, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- g.call(func() error { close(started); <-release; return nil })
	}()
	<-started
	return func() {
		close(release)
		if err := <-done; err != nil {
			tb.Errorf("stall: %v", err)
		}
	}
}
