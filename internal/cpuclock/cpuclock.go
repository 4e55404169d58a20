// Package cpuclock reads the CPU time the calling OS thread has used, for
// the engine's cost accounting (what one replicated page costs, primary and
// backup side, beside a floor measured in the same run).
//
// A reading is the calling thread's, so a goroutine that accounts its own
// work must be locked to its thread (runtime.LockOSThread) from before its
// first reading to after its last: then the difference of two readings is
// exactly the CPU time, user and system, that the goroutine spent between
// them, whatever it waited for meanwhile.
package cpuclock

import (
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
