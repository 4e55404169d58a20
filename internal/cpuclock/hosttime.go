package cpuclock

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"time"
)

// userHZ is the unit of the times in /proc/<pid>/task/<tid>/stat: the
// kernel's ABI fixes USER_HZ at 100 on every architecture Go runs KVM on.
const userHZ = 100

// HostTime returns the CPU time thread tid of this process has spent outside
// guest mode: its user time less its guest time (the kernel counts time in a
// KVM guest as user time too) plus its system time. For a vCPU thread that
// is what its exits and faults cost the guest, from KVM's page faults to the
// VMM's device emulation.
//
// The kernel samples these times at its tick (CONFIG_TICK_CPU_ACCOUNTING)
// and reports them in 10 ms units, so one reading says little about a short
// span; differences summed over many spans are unbiased.
func HostTime(tid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if err != nil {
		return 0, err
	}
	return parseHostTime(b)
}

// parseHostTime reads utime (field 14), stime (15) and guest_time (43) of a
// stat line. The command name (field 2) may hold spaces and parentheses, so
// the fields are counted from its last ')'.
func parseHostTime(b []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("thread stat %q: no command name", b)
	}
	f := bytes.Fields(b[i+1:]) // f[0] is field 3
	const utime, stime, guest = 14 - 3, 15 - 3, 43 - 3
	if len(f) <= guest {
		return 0, fmt.Errorf("thread stat: %d fields, want at least %d", len(f)+2, guest+3)
	}
	var v [3]uint64
	for k, idx := range []int{utime, stime, guest} {
		n, err := strconv.ParseUint(string(f[idx]), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("thread stat field %d: %w", idx+3, err)
		}
		v[k] = n
	}
	ticks := v[0] + v[1] - min(v[2], v[0])
	return time.Duration(ticks) * (time.Second / userHZ), nil
}
