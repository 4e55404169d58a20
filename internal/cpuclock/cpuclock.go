// Package cpuclock reads the CPU time the calling OS thread has used, for
// the engine's cost accounting (what one replicated page costs, primary and
// backup side, beside a floor measured in the same run).
//
// A reading is the calling thread's, and a goroutine moves between threads,
// so a Meter locks the goroutine to its thread for the length of a section
// only: from Start to Stop the difference of two readings is exactly the CPU
// time, user and system, the goroutine spent. Sections are kept to work that
// does not wait: a goroutine that blocks while locked to its thread costs
// the scheduler two thread hand-offs, and with many such goroutines on a
// small host the engine slows down measurably. Code that must wait inside a
// section stops the meter around the wait.
package cpuclock

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// Thread returns the CPU time the calling OS thread has used since it
// started (CLOCK_THREAD_CPUTIME_ID). It is 0 if the kernel refuses the
// clock, which Linux never does.
func Thread() time.Duration {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts) != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// Meter sums the CPU time of the sections one goroutine marks with Start and
// Stop. Its zero value is ready; it is not safe for concurrent use.
type Meter struct {
	t0, sum time.Duration
	on      bool
}

// Start begins a section: it locks the goroutine to its thread and reads
// the thread's clock. Start on a running meter does nothing.
func (m *Meter) Start() {
	if m.on {
		return
	}
	runtime.LockOSThread()
	m.on, m.t0 = true, Thread()
}

// Stop ends the section and returns its CPU time. Stop on a stopped meter
// returns 0.
func (m *Meter) Stop() time.Duration {
	if !m.on {
		return 0
	}
	d := Thread() - m.t0
	runtime.UnlockOSThread()
	m.on = false
	m.sum += d
	return d
}

// Total returns the CPU time of the sections ended so far.
func (m *Meter) Total() time.Duration { return m.sum }

// Take returns Total and resets it to 0.
func (m *Meter) Take() time.Duration {
	d := m.sum
	m.sum = 0
	return d
}
