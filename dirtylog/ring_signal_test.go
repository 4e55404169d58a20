package dirtylog_test

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/kvm"
	"github.com/repagent/repagent/testvm"
	"golang.org/x/sys/unix"
)

// Signals arriving while KVM_RESET_DIRTY_RINGS runs must not leave a harvested
// page writable. Since Linux 6.17 the reset stops with EINTR when a signal is
// pending, and drops the batch of entries it had gathered (up to 64 pages)
// without re-protecting them: the guest's next writes to those pages are never
// logged. The Go runtime signals threads on its own (SIGURG for preemption),
// so in the engine this happened in about one run in 30. Here a goroutine
// signals the harvesting thread without pause while the guest rewrites
// thousands of pages each phase; every phase's harvest must still hold every
// page the phase wrote.
func TestRingResetSurvivesSignals(t *testing.T) {
	const pages = 8000
	cfg := testvm.Config{MemSize: 64 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random,
		WorkingSet: pages, PhaseOps: 4 * pages, Seed: 3, DirtyRingEntries: 16384}
	m, tr := setup(t, cfg, dirtylog.Ring)

	// Harvest on this goroutine's thread, and signal that thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid, pid := unix.Gettid(), unix.Getpid()
	var stop atomic.Bool
	var sent atomic.Uint64
	var wg sync.WaitGroup
	wg.Go(func() {
		for !stop.Load() {
			if unix.Tgkill(pid, tid, unix.SIGURG) == nil {
				sent.Add(1)
			}
		}
	})
	defer func() {
		stop.Store(true)
		wg.Wait()
	}()
	for i, n := range checkPhases(t, m, tr, 6) {
		if n == 0 {
			t.Fatalf("phase %d: the guest wrote nothing", i+1)
		}
	}
	t.Logf("%d signals sent to the harvesting thread", sent.Load())
	// kvm.VM.ResetDirtyRings blocks signals, so no reset stopped early and
	// the tracker never had to repair one.
	if n := tr.ShortRingResets(); n != 0 {
		t.Errorf("%d ring resets stopped early despite blocked signals", n)
	}
}

// A ring reset that takes fewer entries than the tracker marked may have left
// pages writable; the tracker re-protects all of memory, the harvest returns
// every page, and the guest's later writes are all logged again.
func TestShortRingResetIsRepaired(t *testing.T) {
	const pages = 3000
	cfg := testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random,
		WorkingSet: pages, PhaseOps: 2 * pages, Seed: 5, DirtyRingEntries: 8192}
	m, tr := setup(t, cfg, dirtylog.Ring)
	harvest(t, tr)
	vmtest.Phase(t, m, 1)
	restore := dirtylog.SetResetDirtyRings(func(vm *kvm.VM) (int, error) {
		n, err := vm.ResetDirtyRings()
		return n - 1, err // as if the kernel stopped before the last entry
	})
	got := harvest(t, tr)
	restore()
	if tr.ShortRingResets() != 1 {
		t.Fatalf("%d short resets repaired, want 1", tr.ShortRingResets())
	}
	if got.Count() != allPages(m) {
		t.Fatalf("the repaired harvest has %d pages, want all %d", got.Count(), allPages(m))
	}
	// Logging works as before: the next phases are harvested exactly.
	prev := vmtest.Versions(m)
	for phase := uint64(2); phase <= 3; phase++ {
		vmtest.Phase(t, m, phase)
		got := harvest(t, tr)
		cur := vmtest.Versions(m)
		if n := checkExact(t, m, got, prev, cur, fmt.Sprintf("phase %d", phase)); n == 0 {
			t.Fatalf("phase %d: the guest wrote nothing", phase)
		}
		prev = cur
	}
}

// allPages is the number of pages in the machine's memory slots.
func allPages(m *testvm.Machine) int {
	n := 0
	for _, s := range m.Slots() {
		n += int(s.Size / dirtylog.PageSize)
	}
	return n
}
