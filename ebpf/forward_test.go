package ebpf

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/repagent/repagent/internal/nettest"
)

// Released frames are forwarded by the host as the VM's own frames would
// be: bridged to another port, and routed to another network.
func TestForwarded(t *testing.T) {
	for _, tt := range []struct {
		name   string
		bridge bool
	}{{"bridged", true}, {"routed", false}} {
		t.Run(tt.name, func(t *testing.T) {
			host := nettest.New(t)
			peer := nettest.New(t)
			host.AddTap(t, "tap0", "")
			tap, err := host.OpenTap("tap0")
			if err != nil {
				t.Fatal(err)
			}
			defer tap.Close()
			var vmSrc, dst netip.Addr
			var dstMAC net.HardwareAddr
			if tt.bridge {
				// VM and peer on one Ethernet: the host bridges.
				nettest.AddVeth(t, host, "veth0", "", peer, "veth1", "10.66.0.2/24")
				host.AddBridge(t, "br0", "", "tap0", "veth0")
				vmSrc, dst = netip.MustParseAddr("10.66.0.9"), netip.MustParseAddr("10.66.0.2")
				peer.Neigh(t, vmSrc, vmMACText, "veth1")
				dstMAC = macOf(t, peer, "veth1")
			} else {
				// VM on 10.77.0.0/24 behind the tap, peer on 10.99.0.0/24:
				// the host routes.
				host.MustIP(t, "addr", "add", "10.77.0.1/24", "dev", "tap0")
				nettest.AddVeth(t, host, "veth0", "10.99.0.1/24", peer, "veth1", "10.99.0.2/24")
				peer.MustIP(t, "route", "add", "10.77.0.0/24", "via", "10.99.0.1")
				if out, err := host.Command("sysctl", "-qw", "net.ipv4.ip_forward=1").CombinedOutput(); err != nil {
					t.Fatalf("sysctl ip_forward: %v: %s", err, out)
				}
				vmSrc, dst = vmIP, netip.MustParseAddr("10.99.0.2")
				host.Neigh(t, vmSrc, vmMACText, "tap0")
				dstMAC = macOf(t, host, "tap0")
			}
			var client *net.UDPConn
			if err := peer.Do(func() error {
				var err error
				client, err = net.ListenUDP("udp4", &net.UDPAddr{IP: dst.AsSlice(), Port: clientPort})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() }) // after the collector stops
			c := collectFrom(t, client)

			var g *Gate
			if err := host.Do(func() error { var err error; g, err = New(Config{Interface: "tap0"}); return err }); err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			send := func(from, to uint64) {
				for s := from; s <= to; s++ {
					p := make([]byte, 8)
					binary.BigEndian.PutUint64(p, s)
					if _, err := tap.Write(udpFrame(t, vmMAC, dstMAC, vmSrc, dst, vmPort, clientPort, p)); err != nil {
						t.Fatal(err)
					}
				}
			}
			must(t, g.Open(1))
			send(1, 20)
			c.none(t, heldWait)
			must(t, g.Commit(1))
			c.expect(t, seqRange(1, 20))
		})
	}
}

func macOf(tb testing.TB, ns *nettest.Namespace, dev string) net.HardwareAddr {
	tb.Helper()
	var mac net.HardwareAddr
	if err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err == nil {
			mac = ifi.HardwareAddr
		}
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	return mac
}
