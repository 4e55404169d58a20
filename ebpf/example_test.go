package ebpf_test

import (
	"fmt"
	"log"
	"net"
	"net/netip"

	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/replicate"
)

// A Gate is the engine's network output gate.
var _ replicate.OutputGate = (*ebpf.Gate)(nil)

// The primary attaches a gate to the VM's tap and hands it to the engine,
// which opens an epoch at each checkpoint pause and commits it when the
// backup acknowledges it.
func Example() {
	g, err := ebpf.New(ebpf.Config{
		Interface:  "tap0",
		ReleaseCPU: ebpf.AutoCPU,
		OnEpoch: func(s ebpf.EpochStats) {
			fmt.Printf("epoch %d %v: %d frames released, added latency p50 %v p99 %v\n",
				s.Epoch, s.Outcome, s.Released.Frames, s.LatencyP50, s.LatencyP99)
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer g.Close()

	// What the engine does, epoch after epoch:
	_ = g.Open(1) // during the pause that starts epoch 1
	_ = g.Open(2) // during the pause that ends it
	_ = g.Commit(1)

	// At failover, the backup announces the VM from its own tap.
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	if err := ebpf.Announce("tap0", mac, netip.MustParseAddr("192.0.2.10")); err != nil {
		log.Print(err)
	}
}
