package cpuclock

import (
	"testing"
	"time"
)

// A section's time is the work done in it, not the time waited in it, and
// not what ran outside it.
func TestMeter(t *testing.T) {
	spin := func(d time.Duration) {
		for t0 := time.Now(); time.Since(t0) < d; {
		}
	}
	var m Meter
	m.Start()
	m.Start() // no effect on a running meter
	spin(30 * time.Millisecond)
	d := m.Stop()
	if m.Stop() != 0 {
		t.Fatal("Stop on a stopped meter returned time")
	}
	spin(30 * time.Millisecond) // outside any section
	m.Start()
	m.Stop()
	m.Start()
	time.Sleep(30 * time.Millisecond) // a wait costs no CPU
	m.Stop()
	// The spin ran on a busy-or-not host: its CPU time is at most its wall
	// time and, unless the host took the thread away for most of it, well
	// above a millisecond.
	if d <= time.Millisecond || d > 200*time.Millisecond {
		t.Fatalf("30 ms spin measured %v", d)
	}
	if tot := m.Total(); tot < d || tot > d+20*time.Millisecond {
		t.Fatalf("total %v after a %v section, an empty one and a sleep", tot, d)
	}
	if m.Take() == 0 || m.Total() != 0 {
		t.Fatal("Take did not reset the meter")
	}
}
