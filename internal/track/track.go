package track

import (
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/kvm"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// RingEntries is the dirty ring size (entries per vCPU) for --dirty-track ring.
const RingEntries = 4096

// Recommend picks a dirty tracking mechanism for a VM about to be built with
// cfg from the pages its workload is expected to dirty per interval, with
// dirtylog.Recommend (which weighs the ring's per-page cost against the
// bitmap's scan of all memory).
func Recommend(cfg testvm.Config, interval time.Duration) (dirtylog.Mechanism, uint32, error) {
	sys, err := kvm.Open()
	if err != nil {
		return 0, 0, err
	}
	defer sys.Close()
	mech, entries := dirtylog.Recommend(sys, cfg.MemSize, ExpectedDirty(cfg, interval), cfg.VCPUs)
	return mech, entries, nil
}

// diskBufPages is the pages of the block device's buffer area (512 KiB, see
// testvm's doc), which the disk workload's writes and reads go through.
const diskBufPages = 128

// ExpectedDirty estimates the distinct pages cfg's guest dirties in one
// interval: its working set at full speed, fewer at a set rate, and a few
// (status and stack pages) for the idle and counter workloads. The disk
// workload dirties the block device's buffers and ring and, at most, its
// whole version table (8 bytes per block).
func ExpectedDirty(cfg testvm.Config, interval time.Duration) uint64 {
	vcpus := uint64(cfg.VCPUs)
	fixed := 4 * vcpus
	if cfg.Workload == testvm.Disk && cfg.Disk != nil {
		ws := cfg.Disk.WorkingSet
		if ws == 0 {
			ws = cfg.Disk.Blocks
		}
		return fixed + diskBufPages + 2 + (ws*8+replicate.PageSize-1)/replicate.PageSize
	}
	if cfg.Workload != testvm.Dirty {
		return fixed
	}
	ws := cfg.WorkingSet
	if ws == 0 && cfg.MemSize > testvm.DataAddr {
		ws = (cfg.MemSize - testvm.DataAddr) / replicate.PageSize / vcpus
	}
	pages := ws * vcpus
	if cfg.Rate > 0 {
		pages = min(pages, uint64(float64(cfg.Rate*vcpus)*interval.Seconds())+1)
	}
	return pages + fixed
}
