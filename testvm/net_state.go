package testvm

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/repagent/repagent/internal/le"
)

// netState is the network device's part of a machine state (the net section
// of the format in state.go): the guest's network configuration and the
// device's ring positions, which are in guest memory too.
type netState struct {
	cfg NetConfig
	// txCons is the TX ring's consumer index: every frame before it is on
	// the tap, none after. rxProd is the RX ring's producer index.
	txCons, rxProd uint32
}

// save records the device's ring positions in s. Pause holds the device
// still (or it never ran): they are the values in guest memory too.
func (d *netDev) save(s *netState) {
	s.txCons, s.rxProd = d.cons, d.rxProd
}

// restore sets the device's ring positions from s, after checking them
// against the memory image: a state and an image that disagree are not from
// the same checkpoint.
func (d *netDev) restore(s *netState) error {
	tx, rx := load32(d.m.mem, netAddr+nTxCons), load32(d.m.mem, netAddr+nRxProd)
	if tx != s.txCons || rx != s.rxProd {
		return fmt.Errorf("%w: network rings at tx %d rx %d in the state, %d and %d in memory (not the same checkpoint)",
			ErrBadState, s.txCons, s.rxProd, tx, rx)
	}
	d.cons, d.rxProd = s.txCons, s.rxProd
	return nil
}

// appendBinary appends the net section after its present flag.
func (s *netState) appendBinary(b []byte) []byte {
	n := &s.cfg
	var mac [8]byte // 6 used
	copy(mac[:], n.MAC)
	ip := n.IP.As4()
	b = append(b, mac[:]...)
	b = append(b, ip[:]...)
	b = appendU32(b, uint32(n.Port))
	b = appendU64(b, n.StreamRate)
	return appendU32(b, n.StreamBytes, uint32(n.Service), s.txCons, s.rxProd)
}

// decode reads what appendBinary writes. The configuration is checked with
// the rest of the guest's (Config.Validate).
func (s *netState) decode(r *le.Reader) {
	var mac [8]byte
	var ip [4]byte
	n := &s.cfg
	r.Fixed("net mac", mac[:])
	r.Fixed("net ip", ip[:])
	n.MAC = net.HardwareAddr(mac[:6])
	n.IP = netip.AddrFrom4(ip)
	port := r.U32("net port")
	n.StreamRate = r.U64("net streamRate")
	n.StreamBytes = r.U32("net streamBytes")
	n.Service = Workload(r.U32("net service"))
	s.txCons, s.rxProd = r.U32("net txCons"), r.U32("net rxProd")
	switch { // Fail keeps an earlier error: a short section is reported as short
	case mac[6] != 0 || mac[7] != 0:
		// Save writes zeros; anything else would be lost on the way through.
		r.Fail(fmt.Errorf("network MAC padding %x, want zeros", mac[6:]))
	case port > 0xffff:
		r.Fail(fmt.Errorf("network port %d", port))
	}
	n.Port = uint16(port)
}
