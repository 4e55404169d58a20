package ebpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// announceRingSize is the ring of the temporary attachment Announce makes:
// it holds nothing, but the map must exist and fit the largest record.
const announceRingSize = MinRingSize

// GratuitousARP returns the frame that announces that ip is at mac: an
// Ethernet broadcast carrying an ARP request whose sender and target
// protocol addresses are both ip and whose target hardware address is zero
// (an "ARP announcement", RFC 5227 section 2.3), padded to the 60-byte
// Ethernet minimum. A request rather than a reply, because every ARP
// implementation processes requests, and Linux updates an existing
// neighbour entry from it (creating new entries only with arp_accept);
// bridges learn mac from the frame's source address either way.
func GratuitousARP(mac net.HardwareAddr, ip netip.Addr) ([]byte, error) {
	if len(mac) != 6 {
		return nil, fmt.Errorf("gratuitous ARP: MAC %v: want 6 bytes (Ethernet)", mac)
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("gratuitous ARP: MAC %v is a multicast address", mac)
	}
	if !ip.Is4() {
		return nil, fmt.Errorf("gratuitous ARP: address %v: ARP announces IPv4 addresses only", ip)
	}
	addr := ip.As4()
	eth := layers.Ethernet{
		SrcMAC:       mac,
		DstMAC:       layers.EthernetBroadcast,
		EthernetType: layers.EthernetTypeARP,
	}
	arp := layers.ARP{
		AddrType:          layers.LinkTypeEthernet,
		Protocol:          layers.EthernetTypeIPv4,
		HwAddressSize:     6,
		ProtAddressSize:   4,
		Operation:         layers.ARPRequest,
		SourceHwAddress:   mac,
		SourceProtAddress: addr[:],
		DstHwAddress:      make([]byte, 6),
		DstProtAddress:    addr[:],
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, &eth, &arp); err != nil {
		return nil, fmt.Errorf("gratuitous ARP: serialize: %w", err)
	}
	return buf.Bytes(), nil
}

// Announce sends a gratuitous ARP for mac and ip into the host's datapath
// as if the VM behind the tap ifname had sent it: it enters at the tap's
// ingress, so a bridge the tap is a port of learns mac on it and floods the
// announcement, and neighbours update their ARP caches. It is what a backup
// does at failover, once the VM's tap is up and before resuming the VM.
//
// Announce attaches the gate's programs to the tap (in the calling
// thread's network namespace) only for the call, and detaches them before
// it returns; the tap must not have a Gate attached. It sends one frame;
// call it again to repeat the announcement. It returns once the frame has
// passed the tap's ingress hook.
func Announce(ifname string, mac net.HardwareAddr, ip netip.Addr) error {
	frame, err := GratuitousARP(mac, ip)
	if err != nil {
		return fmt.Errorf("announce %v at %v on %s: %w", ip, mac, ifname, err)
	}
	a, err := attach(ifname, announceRingSize, false)
	if err != nil {
		return fmt.Errorf("announce %v at %v: %w", ip, mac, err)
	}
	err = injectFrame(a.ctl, a.injectFD, ifname, frame)
	return errors.Join(err, a.close())
}
