package cpuclock

import (
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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

// HostTime counts user and system time outside guest mode, from the
// fields a stat line has after a command name that holds ") (".
func TestParseHostTime(t *testing.T) {
	line := "4865 (a) (b) R 1 4865 1 0 -1 4194560 100 0 0 0 220 49 0 0 20 0 5 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 0 0 17 1 0 0 223 0 0 0 0 0 0 0 0 0 0\n"
	// utime 220, stime 49, guest 223: the guest time exceeds utime only by
	// the kernel's separate rounding of the two, and counts as none.
	d, err := parseHostTime([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if d != 490*time.Millisecond {
		t.Fatalf("host time %v, want 490ms", d)
	}
	line2 := "1 (x) S 0 0 0 0 0 0 0 0 0 0 300 50 0 0 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 100\n"
	if d, err = parseHostTime([]byte(line2)); err != nil || d != 2500*time.Millisecond {
		t.Fatalf("host time %v, %v; want 2.5s", d, err)
	}
	if _, err := parseHostTime([]byte("1 (x) S 0 0")); err == nil {
		t.Fatal("a short stat line was accepted")
	}
	if _, err := parseHostTime([]byte("no name")); err == nil {
		t.Fatal("a line without a command name was accepted")
	}
}

// The calling thread's host time grows with the CPU it burns.
func TestHostTimeOfThisThread(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := unix.Gettid()
	d0, err := HostTime(tid)
	if err != nil {
		t.Fatal(err)
	}
	for c0 := Thread(); Thread()-c0 < 300*time.Millisecond; {
	}
	d1, err := HostTime(tid)
	if err != nil {
		t.Fatal(err)
	}
	// 300 ms of this thread's CPU time, sampled at the tick (4-10 ms) and
	// reported in 10 ms units: well over 200 ms of it shows.
	if d1-d0 < 200*time.Millisecond {
		t.Fatalf("host time grew %v over 300 ms of the thread's CPU", d1-d0)
	}
}
