package ebpf

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkHold measures the gate's held-frame throughput: frames the VM
// writes into its tap that reach a client socket, per second, without a
// gate (the floor), with a gate in pass mode, and holding with a Commit
// every K frames (simulated epochs, opened and committed as the engine
// does: open the next epoch, commit the one before). Each holding figure is
// also reported as a ratio to the no-gate figure of the same run.
func BenchmarkHold(b *testing.B) {
	n := newTestNet(b)
	var got atomic.Uint64
	stop := make(chan struct{})
	go func() {
		buf := make([]byte, 65536)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n.client.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			if _, err := n.client.Read(buf); err == nil {
				got.Add(1)
			}
		}
	}()
	defer close(stop)

	const batch = 4096
	for _, size := range []int{64, 1500} {
		frames := make([][]byte, batch)
		for i := range frames {
			frames[i] = n.vmFrame(b, uint64(i), size)
		}
		var floor float64
		for _, mode := range []struct {
			name  string
			gate  bool
			epoch int // frames per epoch; 0: pass mode
		}{{"none", false, 0}, {"pass", true, 0}, {"hold/epoch=64", true, 64}, {"hold/epoch=1024", true, 1024}} {
			b.Run(fmt.Sprintf("size=%d/gate=%s", size, mode.name), func(b *testing.B) {
				var g *Gate
				if mode.gate {
					g = n.newGate(b, Config{})
					defer g.Close()
				}
				epoch := uint64(0)
				open := func() {
					epoch++
					if err := g.Open(epoch); err != nil {
						b.Fatal(err)
					}
				}
				commit := func(e uint64) {
					if err := g.Commit(e); err != nil {
						b.Fatal(err)
					}
				}
				if mode.epoch > 0 {
					open()
				}
				b.SetBytes(int64(size * batch))
				total := uint64(0)
				start := got.Load()
				for b.Loop() {
					for i, f := range frames {
						if mode.epoch > 0 && i > 0 && i%mode.epoch == 0 {
							open()
							commit(epoch - 1)
						}
						if _, err := n.tap.Write(f); err != nil {
							b.Fatal(err)
						}
					}
					if mode.epoch > 0 {
						open()
						commit(epoch - 1)
					}
					total += batch
					deadline := time.Now().Add(10 * time.Second)
					for got.Load()-start < total {
						if time.Now().After(deadline) {
							b.Fatalf("client got %d of %d frames", got.Load()-start, total)
						}
						time.Sleep(50 * time.Microsecond)
					}
				}
				fps := float64(total) / b.Elapsed().Seconds()
				b.ReportMetric(fps, "frames/s")
				switch {
				case !mode.gate:
					floor = fps
				case floor > 0:
					b.ReportMetric(fps/floor, "x-nogate")
				}
				if g != nil {
					if s := g.Stats(); s.Lost != 0 || s.Failed.Frames != 0 || s.DroppedRingFull.Frames != 0 || s.DroppedHoldLimit.Frames != 0 {
						b.Errorf("lost %d, failed %d, dropped ring %d, dropped limit %d", s.Lost, s.Failed.Frames, s.DroppedRingFull.Frames, s.DroppedHoldLimit.Frames)
					}
				}
			})
		}
	}
}
