package testvm

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestNetNoTap: without a tap the frames the guest puts on its TX ring are
// dropped and counted, the ring still drains, and the guest is not stopped
// by it. The frames are put on the ring by hand (the guest idles: without a
// tap nothing would make it send).
func TestNetNoTap(t *testing.T) {
	cfg := Config{MemSize: 16 << 20, VCPUs: 1, Workload: Idle,
		Net: &NetConfig{MAC: net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}, IP: netip.MustParseAddr("10.66.0.2")}}
	lens := []uint32{60, NetFrameMax + 1, 100} // the middle one is impossible
	m := boot(t, cfg, func(m *Machine) {
		for i, n := range lens {
			store32(m.mem, netTxAddr+uint64(i)*netSlotSize, n)
		}
		store32(m.mem, netAddr+nTxProd, uint32(len(lens)))
	})
	deadline := time.Now().Add(time.Minute)
	for load32(m.mem, netAddr+nTxCons) != uint32(len(lens)) {
		if time.Now().After(deadline) {
			t.Fatalf("device stopped at tx_cons %d of %d", load32(m.mem, netAddr+nTxCons), len(lens))
		}
		time.Sleep(time.Millisecond)
	}
	if ds := m.NetStats(); ds.TxFrames != 0 || ds.RxFrames != 0 || ds.TxNoTap != 2 || ds.TxErrors != 1 {
		t.Errorf("device without a tap: %+v, want 2 frames dropped for want of a tap, 1 error, none moved", ds)
	}
	if !m.HasNet() {
		t.Error("HasNet is false")
	}
	if err := m.Err(); err != nil {
		t.Fatalf("the machine stopped: %v", err)
	}
}
