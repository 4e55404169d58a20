package ebpf

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"golang.org/x/sys/unix"

	"github.com/repagent/repagent/internal/nettest"
)

// The pcap file holds exactly the released frames, byte for byte as the
// VM sent them (a VLAN tag the kernel strips before tc ingress included),
// stamped with the release time. A frame the kernel refuses to release is
// counted as failed and is not in the file.
func TestPcap(t *testing.T) {
	n := newTestNet(t)
	n.ns.MustIP(t, "link", "set", tapName, "mtu", "9000")
	c := n.collect(t)
	path := filepath.Join(t.TempDir(), "released.pcap")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var log epochLog
	g := n.newGate(t, Config{Pcap: f, OnEpoch: log.add})

	vlan := vlanFrame(t, n.tapMAC)
	frames := [][]byte{n.vmFrame(t, 1, 60), n.vmFrame(t, 2, 500), vlan, n.vmFrame(t, 3, 1514), n.vmFrame(t, 4, 9014)}
	tooLong := n.vmFrame(t, 5, 12000) // longer than the tap's MTU allows
	start := time.Now()
	must(t, g.Open(1))
	n.send(t, frames[:3]...)
	n.send(t, tooLong)
	n.send(t, frames[3:]...)
	must(t, g.Commit(1))
	end := time.Now()
	// The host has no VLAN 100: the client gets the untagged frames.
	c.expect(t, []uint64{1, 2, 3, 4})
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}

	if _, err := f.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	if r.LinkType() != layers.LinkTypeEthernet {
		t.Errorf("pcap link type %v, want Ethernet", r.LinkType())
	}
	for i, want := range frames {
		data, ci, err := r.ReadPacketData()
		if err != nil {
			t.Fatalf("pcap packet %d: %v", i, err)
		}
		if !bytes.Equal(data, want) {
			t.Errorf("pcap packet %d: %d bytes %x..., want the %d bytes the VM sent %x...", i, len(data), data[:min(len(data), 20)], len(want), want[:20])
		}
		if ci.Timestamp.Before(start.Add(-time.Millisecond)) || ci.Timestamp.After(end.Add(time.Millisecond)) {
			t.Errorf("pcap packet %d stamped %v, want the release time, between %v and %v", i, ci.Timestamp, start, end)
		}
	}
	if _, _, err := r.ReadPacketData(); err != io.EOF {
		t.Errorf("pcap has more than the %d released frames (err %v)", len(frames), err)
	}

	s := syncStats(g)
	if s.Failed != (Counter{1, uint64(len(tooLong))}) || s.LastFailure == nil || !errors.Is(s.LastFailure, unix.EMSGSIZE) {
		t.Errorf("failed %+v (last failure %v), want the %d-byte frame failed with EMSGSIZE", s.Failed, s.LastFailure, len(tooLong))
	}
	if s.Protocols.IPv4 != 6 || s.Protocols.UDP != 6 {
		t.Errorf("protocols %+v, want 6 IPv4 UDP frames", s.Protocols)
	}
	es := log.get()
	if len(es) != 1 || es[0].Held.Frames != 6 || es[0].Released.Frames != 5 || es[0].Failed.Frames != 1 {
		t.Errorf("epoch stats %+v, want 6 held, 5 released, 1 failed", es)
	}
	if s.PcapErr != nil {
		t.Errorf("pcap error: %v", s.PcapErr)
	}
}

// vlanFrame is a UDP frame from the VM tagged with VLAN 100.
func vlanFrame(tb testing.TB, dst net.HardwareAddr) []byte {
	tb.Helper()
	eth := &layers.Ethernet{SrcMAC: vmMAC, DstMAC: dst, EthernetType: layers.EthernetTypeDot1Q}
	q := &layers.Dot1Q{VLANIdentifier: 100, Priority: 5, Type: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: net.IP{10, 78, 0, 2}, DstIP: net.IP{10, 78, 0, 1}}
	udp := &layers.UDP{SrcPort: vmPort, DstPort: clientPort}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		tb.Fatal(err)
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, q, ip, udp, gopacket.Payload("tagged!!")); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// sniffer is an AF_PACKET socket on a device of a namespace that sees
// every frame the device carries, with its packet type.
type sniffer struct{ fd int }

func newSniffer(tb testing.TB, ns *nettest.Namespace, dev string) *sniffer {
	tb.Helper()
	s := &sniffer{fd: -1}
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		proto := htons(unix.ETH_P_ALL)
		s.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(proto))
		if err != nil {
			return err
		}
		return unix.Bind(s.fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index})
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { unix.Close(s.fd) })
	tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
	if err := unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		tb.Fatal(err)
	}
	return s
}

// find waits up to a second for a frame equal to want and returns its
// packet type (PACKET_HOST, PACKET_BROADCAST, PACKET_OUTGOING...).
func (s *sniffer) find(tb testing.TB, want []byte) uint8 {
	tb.Helper()
	buf := make([]byte, 65536)
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		k, from, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			continue
		}
		if bytes.Equal(buf[:k], want) {
			return from.(*unix.SockaddrLinklayer).Pkttype
		}
	}
	tb.Fatalf("no frame equal to %x seen within a second", want)
	return 0
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// An injected frame enters the host at the tap's ingress, as a frame the
// VM sent would, and is not held even while the gate holds.
func TestInject(t *testing.T) {
	n := newTestNet(t)
	g := n.newGate(t, Config{})
	must(t, g.Open(1))
	sn := newSniffer(t, n.ns, tapName)
	garp, err := GratuitousARP(vmMAC, vmIP)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Inject(garp); err != nil {
		t.Fatal(err)
	}
	if pt := sn.find(t, garp); pt != unix.PACKET_BROADCAST {
		t.Errorf("the gratuitous ARP was seen on %s with packet type %d, want %d (incoming broadcast)", tapName, pt, unix.PACKET_BROADCAST)
	}
	if s := syncStats(g); s.Injected != 1 || s.Held.Frames != 0 || s.InRing != 0 {
		t.Errorf("injected %d held %d in ring %d: want 1 injected, nothing held", s.Injected, s.Held.Frames, s.InRing)
	}
	if err := g.Inject([]byte{1, 2, 3}); err == nil || !strings.Contains(err.Error(), "3-byte frame") {
		t.Errorf("Inject(3 bytes) = %v, want an error about the short frame", err)
	}
}

// Announce, at failover: a bridge learns the VM's MAC on the tap, and the
// host's neighbour table learns the address, from a tap that has no gate.
// Nothing stays attached afterwards.
func TestAnnounce(t *testing.T) {
	ns := nettest.New(t)
	ns.AddTap(t, "tap1", "")
	tap, err := ns.OpenTap("tap1")
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	ns.AddBridge(t, "br0", "10.88.0.1/24", "tap1")
	if out, err := ns.Command("sysctl", "-qw", "net.ipv4.conf.br0.arp_accept=1").CombinedOutput(); err != nil {
		t.Fatalf("sysctl arp_accept: %v: %s", err, out)
	}
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 0x99}
	ip := netip.MustParseAddr("10.88.0.9")
	if err := ns.Do(func() error { return Announce("tap1", mac, ip) }); err != nil {
		t.Fatal(err)
	}
	if out := ns.Command("bridge", "fdb", "show", "dev", "tap1"); true {
		b, err := out.CombinedOutput()
		if err != nil {
			t.Fatalf("bridge fdb show: %v: %s", err, b)
		}
		if !strings.Contains(string(b), mac.String()) {
			t.Errorf("bridge did not learn %v on tap1:\n%s", mac, b)
		}
	}
	if neigh := ns.MustIP(t, "neigh", "show", ip.String()); !strings.Contains(neigh, mac.String()) {
		t.Errorf("neighbour table has %q for %v, want %v", neigh, ip, mac)
	}
	assertDetached(t, ns, "tap1")
}

// assertDetached fails the test if any TCX program is attached to dev.
func assertDetached(tb testing.TB, ns *nettest.Namespace, dev string) {
	tb.Helper()
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			r, err := link.QueryPrograms(link.QueryOptions{Target: ifi.Index, Attach: at})
			if err != nil {
				return err
			}
			if len(r.Programs) != 0 {
				tb.Errorf("%d programs still attached to %s %v", len(r.Programs), dev, at)
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
}

func TestCloseDetaches(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	var log epochLog
	g := n.newGate(t, Config{OnEpoch: log.add})
	must(t, g.Open(1))
	n.sendSeqs(t, 1, 3)
	c.none(t, heldWait/2)
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	assertDetached(t, n.ns, tapName)
	c.none(t, heldWait/2) // held frames are dropped, never released
	es := log.get()
	if len(es) != 1 || es[0].Outcome != OutcomeClosed || es[0].Discarded.Frames != 3 || es[0].Released.Frames != 0 {
		t.Errorf("epoch stats %+v, want epoch 1 closed with 3 frames discarded", es)
	}
	if s := syncStats(g); s.Discarded.Frames != 3 || s.Held.Frames != 3 {
		t.Errorf("stats after Close: %+v", s)
	}
	// Without the gate, frames pass again.
	n.sendSeqs(t, 4, 4)
	if got := c.take(t, 1, time.Second); got[0] != 4 {
		t.Errorf("after Close the client got %v, want 4", got)
	}
	for name, err := range map[string]error{
		"Open": g.Open(2), "Commit": g.Commit(1), "Discard": g.Discard(0), "Release": g.Release(),
		"Inject": g.Inject(make([]byte, 60)), "Close": g.Close(),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
}

func TestTooManyEpochs(t *testing.T) {
	n := newTestNet(t)
	g := n.newGate(t, Config{})
	for e := uint64(1); e <= MaxOpenEpochs; e++ {
		if err := g.Open(e); err != nil {
			t.Fatalf("Open(%d): %v", e, err)
		}
	}
	if err := g.Open(MaxOpenEpochs + 1); !errors.Is(err, ErrTooManyEpochs) {
		t.Fatalf("Open(%d) = %v, want ErrTooManyEpochs", MaxOpenEpochs+1, err)
	}
	must(t, g.Commit(MaxOpenEpochs))
	if err := g.Open(MaxOpenEpochs + 1); err != nil {
		t.Fatalf("Open after Commit: %v", err)
	}
}

func TestBadInput(t *testing.T) {
	ns := nettest.New(t)
	ns.MustIP(t, "tuntap", "add", "dev", "tun0", "mode", "tun")
	nettest.AddVeth(t, ns, "veth0", "", ns, "veth1", "")
	ns.AddTap(t, "tap0", "")

	tests := []struct {
		name    string
		cfg     Config
		wantErr error  // matched with errors.Is, if set
		wantMsg string // contained in the error
	}{
		{name: "no interface", cfg: Config{}, wantMsg: "interface name"},
		{name: "missing tap", cfg: Config{Interface: "nosuch0"}, wantMsg: "find tap nosuch0"},
		{name: "loopback", cfg: Config{Interface: "lo"}, wantErr: ErrNotTap},
		{name: "veth", cfg: Config{Interface: "veth0"}, wantErr: ErrNotTap, wantMsg: `driver "veth"`},
		{name: "tun", cfg: Config{Interface: "tun0"}, wantErr: ErrNotTap, wantMsg: "tun device"},
		{name: "ring not a power of two", cfg: Config{Interface: "tap0", RingSize: 200 << 10}, wantMsg: "ring size 204800"},
		{name: "ring too small", cfg: Config{Interface: "tap0", RingSize: 4096}, wantMsg: "ring size 4096"},
		{name: "hold limit too small", cfg: Config{Interface: "tap0", HoldLimit: 100}, wantMsg: "hold limit 100"},
		{name: "CPU out of range", cfg: Config{Interface: "tap0", ReleaseCPU: 4000}, wantMsg: "release CPU 4000"},
		{name: "negative CPU", cfg: Config{Interface: "tap0", ReleaseCPU: -2}, wantMsg: "release CPU -2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var g *Gate
			err := ns.Do(func() error {
				var err error
				g, err = New(tt.cfg)
				return err
			})
			if err == nil {
				g.Close()
				t.Fatalf("New(%+v) succeeded, want an error", tt.cfg)
			}
			t.Logf("New: %v", err)
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("New: %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("New: %q, want it to mention %q", err, tt.wantMsg)
			}
		})
	}

	t.Run("epochs", func(t *testing.T) {
		var g *Gate
		if err := ns.Do(func() error { var err error; g, err = New(Config{Interface: "tap0"}); return err }); err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		if err := g.Open(0); err == nil {
			t.Error("Open(0) succeeded")
		}
		must(t, g.Open(3))
		for _, e := range []uint64{3, 2} {
			if err := g.Open(e); err == nil || !strings.Contains(err.Error(), "above 3") {
				t.Errorf("Open(%d) after Open(3) = %v, want an error", e, err)
			}
		}
	})

	t.Run("announce", func(t *testing.T) {
		for _, tt := range []struct {
			name, dev string
			mac       net.HardwareAddr
			ip        netip.Addr
			wantMsg   string
		}{
			{"missing tap", "nosuch0", vmMAC, vmIP, "nosuch0"},
			{"veth", "veth0", vmMAC, vmIP, "not a tap"},
			{"IPv6", "tap0", vmMAC, netip.MustParseAddr("fd00::2"), "IPv4 addresses only"},
			{"short MAC", "tap0", net.HardwareAddr{1, 2, 3}, vmIP, "want 6 bytes"},
			{"multicast MAC", "tap0", net.HardwareAddr{1, 0, 0x5e, 0, 0, 1}, vmIP, "multicast"},
		} {
			err := ns.Do(func() error { return Announce(tt.dev, tt.mac, tt.ip) })
			if err == nil || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("%s: Announce = %v, want an error mentioning %q", tt.name, err, tt.wantMsg)
			}
		}
		assertDetached(t, ns, "tap0")
	})
}

// A packet socket on the tap sees a held frame twice: when the VM sends it
// (packet sockets sit before tc ingress) and when it is released.
func TestSnifferSeesHeldFramesTwice(t *testing.T) {
	n := newTestNet(t)
	c := n.collect(t)
	g := n.newGate(t, Config{})
	sn := newSniffer(t, n.ns, tapName)
	must(t, g.Open(1))
	f := n.vmFrame(t, 1, 60)
	n.send(t, f)
	if pt := sn.find(t, f); pt != unix.PACKET_HOST {
		t.Errorf("frame seen on arrival with packet type %d, want PACKET_HOST", pt)
	}
	c.none(t, heldWait/2)
	must(t, g.Commit(1))
	if pt := sn.find(t, f); pt != unix.PACKET_HOST {
		t.Errorf("frame seen on release with packet type %d, want PACKET_HOST", pt)
	}
	c.take(t, 1, time.Second)
}
