package bench

// Whether a large guest's measurement fits in this machine's memory.

import (
	"fmt"

	"github.com/repagent/repagent/internal/hostsys"
	"github.com/repagent/repagent/testvm"
)

// A large guest's measurement holds about memCopies times its memory
// (the guest, the backup's replica, and staging or the plain copy's two
// buffers), and may use at most memShare of the free RAM.
const (
	memCopies = 3
	memShare  = 0.8
)

// freeRAM is the free RAM now (sysinfo's freeram: not counting the page
// cache).
func freeRAM() (uint64, error) { return hostsys.FreeRAM() }

// fits says why a measurement of a guest of mem bytes would not fit
// in memory now, or "" if it fits.
func fits(mem uint64) (string, error) {
	free, err := freeRAM()
	if err != nil {
		return "", err
	}
	need := memCopies * mem
	if float64(need) <= memShare*float64(free) {
		return "", nil
	}
	return fmt.Sprintf("needs about %s (guest, replica and staging: %dx %s), more than %.0f%% of the %s of RAM free",
		testvm.FormatSize(need), memCopies, testvm.FormatSize(mem), 100*memShare, formatBytes(free)), nil
}

// formatBytes formats a byte count that need not be a whole number of
// MiB: "10.3GiB", "812.0MiB".
func formatBytes(n uint64) string {
	if n >= 1<<30 {
		return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
	}
	return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
}
