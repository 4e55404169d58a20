package ebpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// TestHoldQueue cross-checks the ring-buffer queue against a naive slice
// of frames under random pushes, pops and truncations.
func TestHoldQueue(t *testing.T) {
	type entry struct {
		epoch, ktime uint64
		flags        uint32
		frame        []byte
		pos          uint64
	}
	for _, size := range []int{MinHoldLimit, 5000, 1 << 16} {
		rng := rand.New(rand.NewPCG(uint64(size), 7))
		q := newHoldQueue(size)
		maxN := min(size/2, 3000)
		var model []entry
		used := uint64(0) // the model's idea of the bytes entries take, without skips
		for step := range 20000 {
			switch op := rng.IntN(10); {
			case op < 6: // push
				n := 1 + rng.IntN(maxN)
				if rng.IntN(20) == 0 {
					n = size // never fits
				}
				e := entry{epoch: uint64(step), ktime: rng.Uint64(), flags: rng.Uint32(), frame: make([]byte, n)}
				for i := range e.frame {
					e.frame[i] = byte(rng.Uint32())
				}
				pos, ok := q.push(e.epoch, e.ktime, e.flags, e.frame)
				need := entrySize(n)
				if !ok {
					if len(model) == 0 && need <= uint64(len(q.buf)) {
						t.Fatalf("step %d: push of %d bytes into the empty %d-byte queue refused", step, n, len(q.buf))
					}
					// Space skipped at the end of the buffer is less than one
					// entry, so anything that fits with that much to spare must
					// be taken.
					if used+need+entrySize(maxN) <= uint64(len(q.buf)) {
						t.Fatalf("step %d: push of %d bytes refused with entries taking %d of %d bytes", step, n, used, len(q.buf))
					}
					continue
				}
				e.pos = pos
				model = append(model, e)
				used += need
			case op < 9: // pop
				e, ok := q.front()
				if ok != (len(model) > 0) {
					t.Fatalf("step %d: front ok=%v with %d entries in the model", step, ok, len(model))
				}
				if !ok {
					continue
				}
				m := model[0]
				if e.epoch != m.epoch || e.ktime != m.ktime || e.flags != m.flags || !bytes.Equal(e.frame, m.frame) {
					t.Fatalf("step %d: front is epoch %d (%d bytes), want epoch %d (%d bytes)", step, e.epoch, len(e.frame), m.epoch, len(m.frame))
				}
				q.pop(e)
				model = model[1:]
				used -= entrySize(len(m.frame))
			default: // truncate at a random entry
				if len(model) == 0 {
					continue
				}
				k := rng.IntN(len(model))
				q.truncate(model[k].pos)
				for _, m := range model[k:] {
					used -= entrySize(len(m.frame))
				}
				model = model[:k]
			}
			if q.used() > uint64(len(q.buf)) {
				t.Fatalf("step %d: %d bytes used of %d", step, q.used(), len(q.buf))
			}
		}
	}
}

func TestHoldQueueFull(t *testing.T) {
	q := newHoldQueue(MinHoldLimit)
	frame := make([]byte, 1000)
	for i := range 4 {
		if _, ok := q.push(1, 0, 0, frame); !ok {
			t.Fatalf("push %d refused", i)
		}
	}
	if _, ok := q.push(1, 0, 0, frame); ok {
		t.Fatal("fifth 1000-byte frame fit in 4096 bytes")
	}
	e, _ := q.front()
	q.pop(e)
	if _, ok := q.push(1, 0, 0, frame); !ok {
		t.Fatal("push refused after a pop made room")
	}
}

// FuzzDecodeRecord: decoding never panics, an error means no record, and
// a record re-encodes to the bytes it came from.
func FuzzDecodeRecord(f *testing.F) {
	frame := make([]byte, 60)
	f.Add(appendRecord(nil, record{epoch: 1, seq: 2, ktime: 3, frame: frame}))                                    // a valid small frame
	f.Add(append(appendRecord(nil, record{epoch: 7, flags: recVLANRestored, frame: frame}), make([]byte, 36)...)) // with the class's spare capacity
	f.Add(appendRecord(nil, record{flags: recDrain, frame: make([]byte, ethHeaderLen)}))                          // the shortest frame
	f.Add(appendRecord(nil, record{frame: make([]byte, 13)}))                                                     // shorter than an Ethernet header
	f.Add(appendRecord(nil, record{flags: 1 << 7, frame: frame}))                                                 // unknown flag
	f.Add(appendRecord(nil, record{frame: frame})[:50])                                                           // frame overruns the sample
	f.Add([]byte{1, 2, 3})                                                                                        // no header
	f.Fuzz(func(t *testing.T, raw []byte) {
		r, err := decodeRecord(raw)
		if err != nil {
			if !errors.Is(err, errMalformed) {
				t.Fatalf("error %v does not wrap errMalformed", err)
			}
			if r.frame != nil || r.epoch != 0 || r.seq != 0 || r.ktime != 0 || r.flags != 0 {
				t.Fatalf("error %v with a record %+v", err, r)
			}
			return
		}
		n := recordHeaderSize + len(r.frame)
		if got := appendRecord(nil, r); !bytes.Equal(got, raw[:n]) {
			t.Fatalf("round trip: %x, want %x", got, raw[:n])
		}
	})
}

// A malformed record is counted and skipped, and the tap program is told it
// will never come back.
func TestTakeMalformed(t *testing.T) {
	g := &Gate{cfg: Config{HoldLimit: MinHoldLimit}}
	g.att = &attachment{ctl: new(holdGateCtl), drops: make([]holdEpochDrops, epochSlots)}
	o := newOwner(g)
	for _, raw := range [][]byte{nil, {1, 2, 3}, appendRecord(nil, record{frame: make([]byte, 5)}), appendRecord(nil, record{frame: make([]byte, 60)})[:40]} {
		o.take(raw)
	}
	if o.t.Malformed != 4 || g.att.ctl.Skipped != 4 || o.t.Held.Frames != 0 {
		t.Errorf("malformed %d, skipped %d, held %d: want 4, 4, 0", o.t.Malformed, g.att.ctl.Skipped, o.t.Held.Frames)
	}
}

// The histogram's quantiles stay within a bucket's width (25%) of the
// exact ones.
func TestHistogram(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var h histogram
	var vals []uint64
	for range 10000 {
		v := uint64(rng.ExpFloat64() * float64(5*time.Millisecond))
		vals = append(vals, v)
		h.add(v)
	}
	sort.Slice(vals, func(i, j int) bool { return vals[i] < vals[j] })
	for _, q := range []float64{0.5, 0.9, 0.99} {
		exact := float64(vals[int(q*float64(len(vals)))-1])
		got := float64(h.quantile(q))
		if got < exact*0.75 || got > exact*1.25 {
			t.Errorf("q%v: %v, exact %v", q, time.Duration(got), time.Duration(exact))
		}
	}
	if h.latency().Max != time.Duration(vals[len(vals)-1]) {
		t.Errorf("max %v, want %v", h.latency().Max, time.Duration(vals[len(vals)-1]))
	}
	for b := range latencyBuckets {
		if v := bucketValue(b); latencyBucket(v) != b {
			t.Errorf("bucket %d: value %d falls in bucket %d", b, v, latencyBucket(v))
		}
	}
	var empty histogram
	if empty.quantile(0.5) != 0 {
		t.Error("quantile of an empty histogram is not 0")
	}
}

func TestClassifier(t *testing.T) {
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	garp, err := GratuitousARP(mac, vmIP)
	if err != nil {
		t.Fatal(err)
	}
	ser := func(ls ...gopacket.SerializableLayer) []byte {
		buf := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, ls...); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	eth := func(typ layers.EthernetType) *layers.Ethernet {
		return &layers.Ethernet{SrcMAC: mac, DstMAC: mac, EthernetType: typ}
	}
	ip6 := &layers.IPv6{Version: 6, NextHeader: layers.IPProtocolTCP, HopLimit: 64, SrcIP: net.ParseIP("fd00::1"), DstIP: net.ParseIP("fd00::2")}
	ip4 := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: net.IP{1, 2, 3, 4}, DstIP: net.IP{5, 6, 7, 8}}
	tests := []struct {
		name  string
		frame []byte
		want  Protocols
	}{
		{"ARP", garp, Protocols{ARP: 1}},
		{"IPv4 UDP", udpFrame(t, mac, mac, vmIP, hostIP, 1, 2, []byte("x")), Protocols{IPv4: 1, UDP: 1}},
		{"IPv6 TCP", ser(eth(layers.EthernetTypeIPv6), ip6, &layers.TCP{SrcPort: 1, DstPort: 2}), Protocols{IPv6: 1, TCP: 1}},
		{"ICMPv4", ser(eth(layers.EthernetTypeIPv4), ip4, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0)}), Protocols{IPv4: 1, ICMP: 1}},
		{"VLAN IPv4 UDP", vlanFrame(t, mac), Protocols{IPv4: 1, UDP: 1}},
		{"LLDP", ser(eth(layers.EthernetTypeLinkLayerDiscovery), gopacket.Payload(make([]byte, 46))), Protocols{Other: 1}},
		{"truncated IPv4", udpFrame(t, mac, mac, vmIP, hostIP, 1, 2, []byte("x"))[:20], Protocols{Other: 1}},
		{"runt", []byte{1, 2, 3}, Protocols{Other: 1}},
	}
	c := newClassifier()
	for _, tt := range tests {
		var p Protocols
		c.count(tt.frame, &p)
		if p != tt.want {
			t.Errorf("%s: %+v, want %+v", tt.name, p, tt.want)
		}
	}
}

func TestGratuitousARP(t *testing.T) {
	mac := net.HardwareAddr{2, 0xab, 0, 0, 0, 7}
	ip := netip.MustParseAddr("192.0.2.7")
	frame, err := GratuitousARP(mac, ip)
	if err != nil {
		t.Fatal(err)
	}
	if len(frame) != 60 {
		t.Errorf("frame is %d bytes, want the 60-byte Ethernet minimum", len(frame))
	}
	p := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
	eth, _ := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
	arp, _ := p.Layer(layers.LayerTypeARP).(*layers.ARP)
	if eth == nil || arp == nil {
		t.Fatalf("frame does not decode as Ethernet and ARP: %v", p)
	}
	if !bytes.Equal(eth.DstMAC, layers.EthernetBroadcast) || !bytes.Equal(eth.SrcMAC, mac) {
		t.Errorf("Ethernet %v -> %v, want %v -> broadcast", eth.SrcMAC, eth.DstMAC, mac)
	}
	a4 := ip.As4()
	if arp.Operation != layers.ARPRequest || !bytes.Equal(arp.SourceHwAddress, mac) ||
		!slices.Equal(arp.SourceProtAddress, a4[:]) || !slices.Equal(arp.DstProtAddress, a4[:]) ||
		!bytes.Equal(arp.DstHwAddress, make([]byte, 6)) {
		t.Errorf("ARP %+v, want a request from %v/%v for %v with a zero target MAC", arp, mac, ip, ip)
	}
}

// appendRecord appends r in the ring's format (header, frame, no spare
// capacity): the inverse of decodeRecord. In the gate, only the hold
// program writes records.
func appendRecord(b []byte, r record) []byte {
	var h [recordHeaderSize]byte
	binary.LittleEndian.PutUint64(h[0:], r.epoch)
	binary.LittleEndian.PutUint64(h[8:], r.seq)
	binary.LittleEndian.PutUint64(h[16:], r.ktime)
	binary.LittleEndian.PutUint32(h[24:], uint32(len(r.frame)))
	binary.LittleEndian.PutUint32(h[28:], r.flags)
	return append(append(b, h[:]...), r.frame...)
}
