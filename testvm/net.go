package testvm

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/repagent/repagent/internal/hostsys"
)

// NetConfig is the guest's network identity and the network workloads'
// settings. It is part of the guest configuration (saved with the state); the
// tap the device uses is not (Config.Tap, RestoreOptions.Tap).
type NetConfig struct {
	// MAC is the guest's Ethernet address: 6 bytes, unicast.
	MAC net.HardwareAddr
	// IP is the guest's IPv4 address.
	IP netip.Addr
	// Port is the UDP port UDPEcho and UDPStream serve. 0 means DefaultNetPort.
	Port uint16
	// StreamRate is UDPStream's datagrams per second. 0 means
	// DefaultStreamRate.
	StreamRate uint64
	// StreamBytes is the UDP payload of each UDPStream datagram, 16 to
	// MaxStreamBytes. 0 means DefaultStreamBytes.
	StreamBytes uint32
	// Service, UDPEcho or UDPStream, makes vCPU 0 serve the network between
	// the operations of Config.Workload, so one guest both dirties memory and
	// talks to clients. 0: no service, unless Config.Workload is itself
	// UDPEcho or UDPStream (then vCPU 0 runs only that, the others idle).
	Service Workload
}

// Network defaults and limits.
const (
	DefaultNetPort     = 7777
	DefaultStreamRate  = 1000
	DefaultStreamBytes = 64
	// MaxStreamBytes is the largest UDP payload of one frame.
	MaxStreamBytes = NetFrameMax - 14 - 20 - 8
)

func (n NetConfig) withDefaults() NetConfig {
	if n.Port == 0 {
		n.Port = DefaultNetPort
	}
	if n.StreamRate == 0 {
		n.StreamRate = DefaultStreamRate
	}
	if n.StreamBytes == 0 {
		n.StreamBytes = DefaultStreamBytes
	}
	return n
}

func (n NetConfig) validate() error {
	n = n.withDefaults()
	switch {
	case len(n.MAC) != 6:
		return fmt.Errorf("guest MAC %q is not a 6-byte Ethernet address", n.MAC)
	case n.MAC[0]&1 != 0:
		return fmt.Errorf("guest MAC %s is a multicast address", n.MAC)
	case !n.IP.Is4():
		return fmt.Errorf("guest IP %q is not an IPv4 address", n.IP)
	case n.IP.IsUnspecified() || n.IP.IsMulticast() || n.IP == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("guest IP %s is not a unicast address", n.IP)
	case n.Service != 0 && !n.Service.IsNet():
		return fmt.Errorf("network service %s: want udp-echo or udp-stream", n.Service)
	case n.StreamBytes < 16 || n.StreamBytes > MaxStreamBytes:
		return fmt.Errorf("stream datagrams of %d bytes: want 16 to %d", n.StreamBytes, MaxStreamBytes)
	}
	return nil
}

// NetStats counts what the VMM's network device did.
type NetStats struct {
	TxFrames, TxBytes uint64 // frames taken from the TX ring and written to the tap
	TxErrors          uint64 // TX slots with an impossible length, or tap write errors
	TxNoTap           uint64 // frames dropped because the machine has no tap
	RxFrames, RxBytes uint64 // frames read from the tap and put on the RX ring
	RxDropped         uint64 // frames dropped because the RX ring was full
	RxTooBig          uint64 // frames longer than NetFrameMax
	Kicks             uint64 // doorbells (PORT_NET_KICK) the device woke for
}

// netDev is the VMM side of the paravirtual network device: a TX goroutine
// that sends the guest's frames to the tap, woken by an ioeventfd doorbell
// only when it went idle, and an RX goroutine that puts the tap's frames on
// the guest's RX ring, where the guest polls for them.
//
// Every batch the device processes runs under mu, and Machine.Pause takes mu
// after the vCPUs are parked (see device), so a checkpoint never splits a
// frame from its ring update: a frame is on the tap if and only if the saved
// tx_cons says it was sent, and an RX frame is in the saved ring if and only
// if rx_prod says so. That is what lets an output gate tag frames by epoch
// exactly.
type netDev struct {
	device          // the TX ring (cons is tx_cons) and PORT_NET_KICK
	tap    *os.File // nil: frames the guest sends are dropped (counted)

	rxProd uint32 // guarded by mu: the device's copy of rx_prod
	stats  struct {
		txFrames, txBytes, txErrors, txNoTap   atomic.Uint64
		rxFrames, rxBytes, rxDropped, rxTooBig atomic.Uint64
	}
}

// newNetDev registers the doorbell with KVM. It does not start the
// goroutines (start does).
func newNetDev(m *Machine, tap *os.File) (*netDev, error) {
	d := &netDev{tap: tap}
	tx := ringRegs{prod: netAddr + nTxProd, cons: netAddr + nTxCons, kick: netAddr + nTxKick, slots: netSlots}
	if err := d.init(m, portNetKick, "network device", tx); err != nil {
		return nil, err
	}
	return d, nil
}

// start runs the TX loop, which drains the TX ring, then announces that it
// sleeps (tx_kick = 1) and waits for the doorbell; and, with a tap, the RX
// loop.
func (d *netDev) start() {
	d.goRun(func() {
		d.serve(0, d.sendTX, func() { d.stats.txErrors.Add(1) })
	})
	if d.tap != nil {
		d.goRun(d.rxLoop)
	}
}

// stop ends the goroutines, if they were started, and closes the doorbell.
// The tap stays open: it belongs to the caller.
func (d *netDev) stop(started bool) {
	if !started || d.tap == nil {
		d.device.stop(started, nil)
		return
	}
	d.device.stop(true, func() { d.tap.SetReadDeadline(time.Unix(1, 0)) }) // wakes the RX loop
	d.tap.SetReadDeadline(time.Time{})
}

// sendTX sends the frames of TX ring entries from to to. With mu held.
func (d *netDev) sendTX(from, to uint32) {
	mem := d.m.mem
	for c := from; c != to; c++ {
		slot := netTxAddr + uint64(c%netSlots)*netSlotSize
		n := load32(mem, slot)
		switch {
		case n < 14 || n > NetFrameMax:
			d.stats.txErrors.Add(1)
		case d.tap == nil:
			d.stats.txNoTap.Add(1)
		default:
			frame := mem[slot+netSlotData : slot+netSlotData+uint64(n)]
			if _, err := d.tap.Write(frame); err != nil {
				d.stats.txErrors.Add(1)
			} else {
				d.stats.txFrames.Add(1)
				d.stats.txBytes.Add(uint64(n))
			}
		}
	}
}

// rxLoop puts each frame read from the tap on the RX ring, or drops it
// (counted) when the ring is full or the frame is too long.
func (d *netDev) rxLoop() {
	mem := d.m.mem
	buf := make([]byte, 65536)
	for {
		n, err := d.tap.Read(buf)
		if err != nil {
			d.mu.Lock()
			stopped := d.stopped
			d.mu.Unlock()
			if stopped {
				return
			}
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			// A tap whose link went down returns EIO until it is up again;
			// wait rather than spin.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if n > NetFrameMax {
			d.stats.rxTooBig.Add(1)
			continue
		}
		d.mu.Lock()
		if d.stopped {
			d.mu.Unlock()
			return
		}
		if d.rxProd-load32(mem, netAddr+nRxCons) >= netSlots {
			d.stats.rxDropped.Add(1)
		} else {
			slot := netRxAddr + uint64(d.rxProd%netSlots)*netSlotSize
			d.m.guardWrite(slot, netSlotData+uint64(n))
			d.m.guardWrite(netAddr+nRxProd, 4)
			copy(mem[slot+netSlotData:], buf[:n])
			store32(mem, slot, uint32(n))
			d.m.recordWrite(slot, netSlotData+uint64(n))
			d.rxProd++
			store32(mem, netAddr+nRxProd, d.rxProd)
			d.m.recordWrite(netAddr+nRxProd, 4)
			d.stats.rxFrames.Add(1)
			d.stats.rxBytes.Add(uint64(n))
		}
		d.mu.Unlock()
	}
}

func (d *netDev) snapshot() NetStats {
	s := &d.stats
	return NetStats{
		TxFrames: s.txFrames.Load(), TxBytes: s.txBytes.Load(), TxErrors: s.txErrors.Load(), TxNoTap: s.txNoTap.Load(),
		RxFrames: s.rxFrames.Load(), RxBytes: s.rxBytes.Load(), RxDropped: s.rxDropped.Load(), RxTooBig: s.rxTooBig.Load(),
		Kicks: d.kicks.Load(),
	}
}

// NetStats returns the network device's counters; zero without a device.
func (m *Machine) NetStats() NetStats {
	if m.net == nil {
		return NetStats{}
	}
	return m.net.snapshot()
}

// HasNet reports whether the machine has a network device.
func (m *Machine) HasNet() bool { return m.net != nil }

// OpenTap opens the tap device called name in the calling thread's network
// namespace, creating it if it does not exist, as a VMM does: IFF_TAP |
// IFF_NO_PI, non-blocking (reads and writes go through Go's poller). The
// caller owns the file and closes it after the machine.
func OpenTap(name string) (*os.File, error) { return hostsys.OpenTap(name) }
