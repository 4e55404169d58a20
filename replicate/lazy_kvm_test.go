package replicate_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

// Lazy and auto capture on a real guest: guest writes (two vCPUs at full
// rate), device writes (the disk workload's reads land in guest memory by
// DMA) and the copier race in every epoch. An audit in every pause digests
// all of memory at the epoch boundary; the epoch's digest, computed from
// the pages staged behind the guest, must equal it, or replication stops
// with an audit failure. So no page is captured with content written after
// its checkpoint.
func TestKVMLazyCapture(t *testing.T) {
	const blocks = 2048
	for _, capture := range []replicate.Capture{replicate.CaptureLazy, replicate.CaptureAuto} {
		for _, tc := range []struct {
			name string
			cfg  testvm.Config
		}{
			{"dirty-seq", testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Seq}},
			{"dirty-random", testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Random}},
			{"dirty-hotcold", testvm.Config{MemSize: 64 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.HotCold}},
			{"counter", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Counter}},
			{"disk", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Disk, Pattern: testvm.Random,
				Disk: &testvm.DiskConfig{Blocks: blocks, WorkingSet: blocks}}},
		} {
			t.Run(fmt.Sprintf("%v/%s", capture, tc.name), func(t *testing.T) {
				cfg := tc.cfg
				if cfg.Disk != nil {
					cfg.DiskIO = diskImage(t, "disk.img", blocks*testvm.DiskBlockSize, false)
				}
				m := vmtest.Boot(t, cfg, nil)
				var mu sync.Mutex
				var lazyPages, faults, guarded, epochs int
				pair := replicatetest.NewPair(t, replicate.Config{VM: m, Interval: 20 * time.Millisecond, AuditEvery: 1,
					Capture: capture, CaptureCalibration: time.Millisecond, OnEpoch: func(s *replicate.EpochStats) {
						mu.Lock()
						defer mu.Unlock()
						epochs++
						lazyPages += s.LazyPages
						faults += s.Faults
						guarded += s.GuardedPages
					}}, replicate.BackupConfig{NewMemory: testvm.NewMemFile})
				pair.WaitAcked(40)
				if err := pair.Stop(); err != nil {
					t.Fatalf("replication: %v", err)
				}
				if err := m.Err(); err != nil {
					t.Fatalf("guest: %v", err)
				}
				mu.Lock()
				defer mu.Unlock()
				t.Logf("%d epochs audited: %d pages protected and copied behind the guest, %d guest faults, %d pages copied before a device write",
					epochs, lazyPages, faults, guarded)
				if capture == replicate.CaptureLazy && lazyPages == 0 {
					t.Fatal("lazy capture protected no page: the test proved nothing")
				}
				// Long runs are worth protecting wherever a write-protect
				// costs less than copying, and auto starts pricing them
				// after its shortest calibration.
				if capture == replicate.CaptureAuto && tc.name == "dirty-seq" && lazyPages == 0 {
					t.Fatal("auto capture protected no page of a sequential guest: the test proved nothing of auto")
				}
			})
		}
	}
}

// Lazy capture needs a VM whose own writes into guest memory can be
// guarded: without replicate.WriteGuard, Run refuses lazy, naming why, and
// auto falls back to copying in the pause.
func TestLazyNeedsWriteGuard(t *testing.T) {
	pair := replicatetest.NewPair(t, replicate.Config{VM: newToyVM(8 << 20), Interval: 20 * time.Millisecond, Capture: replicate.CaptureLazy},
		replicate.BackupConfig{})
	err := pair.PrimaryErr()
	if !errors.Is(err, replicate.ErrLazyUnsupported) {
		t.Fatalf("Run with lazy capture on a VM without WriteGuard: %v; want ErrLazyUnsupported", err)
	}
	t.Logf("lazy: %v", err)

	pair = replicatetest.NewPair(t, replicate.Config{VM: newToyVM(8 << 20), Interval: 20 * time.Millisecond, Capture: replicate.CaptureAuto},
		replicate.BackupConfig{})
	pair.WaitAcked(5)
	if err := pair.Stop(); err != nil {
		t.Fatalf("auto capture on a VM without WriteGuard: %v; want eager, and replication", err)
	}
}
