package dirtylog_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/kvm"
	"github.com/repagent/repagent/testvm"
)

// mechanisms under test, and the ring size a machine needs for each.
var mechanisms = []struct {
	mech dirtylog.Mechanism
	ring uint32
}{
	{dirtylog.Bitmap, 0},
	{dirtylog.Manual, 0},
	{dirtylog.Ring, 4096},
}

// setup boots a machine with a started tracker of mechanism mech on it.
func setup(t *testing.T, cfg testvm.Config, mech dirtylog.Mechanism) (*testvm.Machine, *dirtylog.Tracker) {
	t.Helper()
	var tr *dirtylog.Tracker
	m := vmtest.Boot(t, cfg, func(m *testvm.Machine) {
		var err error
		if tr, err = m.DirtyTracker(mech, false); err != nil {
			t.Fatal(err)
		}
		if tr.Mechanism() != mech {
			t.Fatalf("tracker uses %s, want %s", tr.Mechanism(), mech)
		}
		if err := tr.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tr.Stop() })
	})
	return m, tr
}

// bookkeeping reports whether gpa is a page written for the test's own
// purposes: a status or stack page the guest writes, or the params page, which
// the VMM writes in Machine.Go (and reports through MarkWritten).
func bookkeeping(m *testvm.Machine, gpa uint64) bool {
	return gpa == m.GPA(testvm.ParamsOffset) || vmtest.GuestBookkeeping(m, gpa)
}

func harvest(t *testing.T, tr *dirtylog.Tracker) *dirtylog.Set {
	t.Helper()
	s := tr.NewSet()
	if _, err := tr.Harvest(s); err != nil {
		t.Fatal(err)
	}
	return s
}

// checkExact: every page whose version changed is in got (nothing missed), and
// everything else in got is guest bookkeeping (no undocumented false positive).
func checkExact(t *testing.T, m *testvm.Machine, got *dirtylog.Set, prev, cur map[uint64]uint64, what string) int {
	t.Helper()
	written := 0
	for gpa, v := range cur {
		if v != prev[gpa] {
			written++
			if !got.Has(gpa) {
				t.Errorf("%s: page %#x (version %d -> %d) written but not harvested", what, gpa, prev[gpa], v)
			}
		}
	}
	got.ForEachRun(func(gpa, pages uint64) bool {
		for p := gpa; p < gpa+pages*4096; p += 4096 {
			if v, ok := cur[p]; (!ok || v == prev[p]) && !bookkeeping(m, p) {
				t.Errorf("%s: page %#x harvested but the guest did not write it", what, p)
			}
		}
		return true
	})
	return written
}

// checkPhases lets the guest run phases 1..n and checks after each that the
// harvest is exact; it returns the pages written in each phase.
func checkPhases(t *testing.T, m *testvm.Machine, tr *dirtylog.Tracker, n uint64) []int {
	t.Helper()
	harvest(t, tr) // everything before the first phase
	prev := vmtest.Versions(m)
	var written []int
	for phase := uint64(1); phase <= n; phase++ {
		vmtest.Phase(t, m, phase)
		got := harvest(t, tr)
		cur := vmtest.Versions(m)
		written = append(written, checkExact(t, m, got, prev, cur, fmt.Sprintf("phase %d", phase)))
		prev = cur
	}
	return written
}

// Phases of known writes: each harvest returns exactly the pages written in
// its phase, for every mechanism.
func TestHarvestIsExact(t *testing.T) {
	workloads := []struct {
		name string
		cfg  testvm.Config
	}{
		// 1 vCPU over 32 MiB: its region crosses the slot boundary at 16 MiB.
		{"seq/slot-boundary", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Pattern: testvm.Seq, WorkingSet: 7000, PhaseOps: 3000}},
		{"random/2vcpus", testvm.Config{MemSize: 64 << 20, VCPUs: 2, Pattern: testvm.Random, WorkingSet: 5000, PhaseOps: 3000, Seed: 9}},
		// Each page written about ten times per phase.
		{"rewrites", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Pattern: testvm.Random, WorkingSet: 300, PhaseOps: 3000}},
	}
	for _, mc := range mechanisms {
		for _, wl := range workloads {
			t.Run(mc.mech.String()+"/"+wl.name, func(t *testing.T) {
				cfg := wl.cfg
				cfg.Workload = testvm.Dirty
				cfg.DirtyRingEntries = mc.ring
				m, tr := setup(t, cfg, mc.mech)
				for i, n := range checkPhases(t, m, tr, 4) {
					if n == 0 {
						t.Fatalf("phase %d: the guest wrote nothing", i+1)
					}
				}
			})
		}
	}
}

// The guest writes at full speed while harvests run: a page changed between
// two harvests is in the second; a page changed while a harvest ran is in it
// or the next. Nothing is ever missed.
func TestHarvestWhileGuestRuns(t *testing.T) {
	for _, mc := range mechanisms {
		t.Run(mc.mech.String(), func(t *testing.T) {
			cfg := testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Random,
				WorkingSet: 4000, Rate: 200000, DirtyRingEntries: mc.ring}
			m, tr := setup(t, cfg, mc.mech)
			harvest(t, tr)
			end := vmtest.Versions(m) // E_0
			var during map[uint64]bool
			for k := 1; k <= 40; k++ {
				time.Sleep(2 * time.Millisecond)
				start := vmtest.Versions(m) // S_k
				got := harvest(t, tr)
				after := vmtest.Versions(m) // E_k
				for gpa, v := range start {
					if v != end[gpa] && !got.Has(gpa) {
						t.Fatalf("harvest %d: page %#x changed before the harvest started but is not in it", k, gpa)
					}
				}
				for gpa := range during {
					if !got.Has(gpa) {
						t.Fatalf("harvest %d: page %#x changed during harvest %d, in neither it nor this one", k, gpa, k-1)
					}
				}
				during = map[uint64]bool{}
				for gpa, v := range after {
					if v != start[gpa] && !got.Has(gpa) {
						during[gpa] = true
					}
				}
				end = after
			}
		})
	}
}

// A page the VMM writes between harvests is reported, on every mechanism.
func TestVMMWriteIsHarvested(t *testing.T) {
	for _, mc := range mechanisms {
		t.Run(mc.mech.String(), func(t *testing.T) {
			m, tr := setup(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Idle, DirtyRingEntries: mc.ring}, mc.mech)
			if err := m.Pause(); err != nil {
				t.Fatal(err)
			}
			harvest(t, tr)
			off := m.Slots()[1].Offset - 100 // straddles the slot boundary
			if err := m.WriteGuest(off, make([]byte, 200)); err != nil {
				t.Fatal(err)
			}
			got := harvest(t, tr)
			for _, gpa := range []uint64{m.GPA(off &^ 4095), m.Slots()[1].GPA} {
				if !got.Has(gpa) {
					t.Errorf("VMM write to page %#x not harvested", gpa)
				}
			}
			if got.Count() != 2 {
				t.Errorf("harvested %d pages, want the 2 the VMM wrote (%v)", got.Count(), got.Ranges(nil))
			}
			if again := harvest(t, tr); again.Count() != 0 {
				t.Errorf("the next harvest has %d pages, want none", again.Count())
			}
		})
	}
}

// A ring far smaller than one phase's writes fills many times; the exits are
// handled in the run loop and no entry is lost.
func TestRingFullLosesNothing(t *testing.T) {
	cfg := testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Seq,
		WorkingSet: 6000, PhaseOps: 6000, DirtyRingEntries: 256}
	m, tr := setup(t, cfg, dirtylog.Ring)
	for i, n := range checkPhases(t, m, tr, 2) {
		if n != 12000 {
			t.Fatalf("phase %d: %d pages written, want 12000", i+1, n)
		}
	}
	if tr.RingFullExits() == 0 {
		t.Fatal("no ring-full exit happened: the test did not fill the ring")
	}
	t.Logf("%d ring-full exits", tr.RingFullExits())
}

// Manual protect with initially-set: the first harvest is all of memory, also
// when the machine's slots were built with logging on already.
func TestInitiallySet(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	for _, logOn := range []bool{false, true} {
		t.Run(fmt.Sprintf("slots-logging=%v", logOn), func(t *testing.T) {
			m := vmtest.Build(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Idle, DirtyLog: logOn})
			tr, err := m.DirtyTracker(dirtylog.Manual, true)
			if err != nil {
				t.Fatal(err)
			}
			if err := tr.Start(); err != nil {
				t.Fatal(err)
			}
			got := harvest(t, tr)
			if got.Count() != 32<<20/4096 {
				t.Fatalf("first harvest: %d pages, want all %d", got.Count(), 32<<20/4096)
			}
			if again := harvest(t, tr); again.Count() != 0 {
				t.Fatalf("second harvest of an unstarted machine: %d pages", again.Count())
			}
		})
	}
}

// Manual protect with a clear chunk of one bitmap word: many
// KVM_CLEAR_DIRTY_LOG calls per slot, and still exact.
func TestManualSmallClearChunks(t *testing.T) {
	var tr *dirtylog.Tracker
	// Boot waits for the guest to be ready: during boot KVM reports a few pages
	// the guest only reads (its code and params pages, once), and the exact
	// checks start after it.
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random, WorkingSet: 6000, PhaseOps: 2500},
		func(m *testvm.Machine) {
			var err error
			tr, err = dirtylog.New(dirtylog.Config{VM: m.VM(), Slots: m.DirtySlots(), Mechanism: dirtylog.Manual, ClearChunk: 64})
			if err != nil {
				t.Fatal(err)
			}
			if err := tr.Start(); err != nil {
				t.Fatal(err)
			}
		})
	// Go's write of the params page is not marked here (no recorder), so only
	// guest writes are expected.
	checkPhases(t, m, tr, 3)
}

// A dirty ring that fills before its tracker started stops the machine with a
// clear error instead of spinning on ring-full exits.
func TestRingFullBeforeStartIsAnError(t *testing.T) {
	m := vmtest.Build(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq,
		WorkingSet: 2000, DirtyLog: true, DirtyRingEntries: 256})
	if _, err := m.DirtyTracker(dirtylog.Ring, false); err != nil {
		t.Fatal(err)
	}
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done():
	case <-time.After(vmtest.Wait):
		t.Fatal("the machine kept running with a full ring and no started tracker")
	}
	if err := m.Err(); err == nil || !strings.Contains(err.Error(), "before tracking started") {
		t.Fatalf("Err() = %v, want the ring-full-before-start error", err)
	}
}

// The bitmap cannot be used on a VM with a dirty ring: KVM answers ENXIO, and
// the harvest says so instead of returning an empty set.
func TestBitmapOnRingVMIsAClearError(t *testing.T) {
	_, tr := setup(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Idle, DirtyRingEntries: 1024}, dirtylog.Bitmap)
	_, err := tr.Harvest(tr.NewSet())
	if err == nil || !strings.Contains(err.Error(), "dirty ring") {
		t.Fatalf("Harvest = %v, want an error that names the dirty ring", err)
	}
}

func TestConfigErrors(t *testing.T) {
	if _, err := dirtylog.ParseMechanism("magic"); err == nil || !strings.Contains(err.Error(), "magic") {
		t.Errorf("ParseMechanism(magic) = %v", err)
	}
	for _, s := range []string{"auto", "bitmap", "manual", "ring"} {
		if m, err := dirtylog.ParseMechanism(s); err != nil || m.String() != s {
			t.Errorf("ParseMechanism(%s) = %v, %v", s, m, err)
		}
	}
	m := vmtest.Build(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1})
	if _, err := m.DirtyTracker(dirtylog.Ring, false); err == nil {
		t.Error("a ring tracker on a machine without a ring was accepted")
	}
	tr, err := m.DirtyTracker(dirtylog.Bitmap, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Harvest(tr.NewSet()); err == nil {
		t.Error("harvest before Start succeeded")
	}
	if err := tr.MarkWritten(1<<40, 4096); err == nil {
		t.Error("MarkWritten outside every slot succeeded")
	}
	if err := tr.RingFull(0); err == nil {
		t.Error("RingFull on a bitmap tracker succeeded")
	}
	// The package doc promises that kvm's not-supported errors match too.
	if !errors.Is(fmt.Errorf("x: %w", kvm.ErrNotSupported), dirtylog.ErrNotSupported) {
		t.Error("a kvm.ErrNotSupported error does not match dirtylog.ErrNotSupported")
	}
}

// Stop turns dirty logging off: KVM no longer keeps a log for the slots.
func TestStopTurnsLoggingOff(t *testing.T) {
	m, tr := setup(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Idle}, dirtylog.Bitmap)
	bm := make([]uint64, m.Slots()[0].Size/4096/64)
	if err := m.VM().GetDirtyLog(0, bm); err != nil {
		t.Fatalf("while tracking: %v", err)
	}
	if err := tr.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := m.VM().GetDirtyLog(0, bm); err == nil {
		t.Fatal("KVM still keeps a dirty log after Stop")
	}
	if _, err := tr.Harvest(tr.NewSet()); err == nil {
		t.Fatal("Harvest after Stop succeeded")
	}
}

func TestRecommend(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	tests := []struct {
		name       string
		mem, dirty uint64
		vcpus      int
		want       dirtylog.Mechanism
	}{
		{"unknown rate", 1 << 30, 0, 1, dirtylog.Manual},
		{"dense writes", 1 << 30, 100000, 2, dirtylog.Manual},
		{"sparse writes over 64 GiB", 64 << 30, 1000, 2, dirtylog.Ring},
		{"too many for a ring", 64 << 30, 1 << 20, 1, dirtylog.Manual},
	}
	for _, tt := range tests {
		mech, entries := dirtylog.Recommend(sys, tt.mem, tt.dirty, tt.vcpus)
		if mech != tt.want {
			t.Errorf("%s: Recommend = %s, want %s", tt.name, mech, tt.want)
		}
		if mech == dirtylog.Ring && (entries < 256 || entries&(entries-1) != 0 || uint64(entries) < 2*tt.dirty/uint64(tt.vcpus)) {
			t.Errorf("%s: ring of %d entries for %d pages over %d vCPUs", tt.name, entries, tt.dirty, tt.vcpus)
		}
	}
}

// If mapping one vCPU's ring fails, Start fails and maps nothing, so a retry
// cannot leave a tracker that misses a ring or indexes empty state.
func TestRingStartIsAllOrNothing(t *testing.T) {
	m := vmtest.Build(t, testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Idle, DirtyRingEntries: 1024})
	if _, err := m.VCPU(1).MapDirtyRing(1024); err != nil { // someone else holds vCPU 1's ring
		t.Fatal(err)
	}
	tr, err := m.DirtyTracker(dirtylog.Ring, false)
	if err != nil {
		t.Fatal(err)
	}
	for try := 1; try <= 2; try++ {
		err := tr.Start()
		if err == nil || !strings.Contains(err.Error(), "vCPU 1") {
			t.Fatalf("Start %d = %v, want a failure naming vCPU 1", try, err)
		}
	}
	if _, err := tr.Harvest(tr.NewSet()); err == nil {
		t.Fatal("Harvest on a tracker that never started succeeded")
	}
	// Once the ring is free, Start maps every ring and harvests work.
	if err := m.VCPU(1).UnmapDirtyRing(); err != nil {
		t.Fatal(err)
	}
	if err := tr.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Harvest(tr.NewSet()); err != nil {
		t.Fatal(err)
	}
}
