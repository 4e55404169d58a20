package testvm_test

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/testvm"
)

func TestWorkloadsMakeProgress(t *testing.T) {
	tests := []struct {
		name string
		cfg  testvm.Config
	}{
		{"idle", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Idle, IdleTickMicros: 100}},
		{"dirty/seq", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Seq, WorkingSet: 300}},
		{"dirty/random", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Random, WorkingSet: 1000, Seed: 7}},
		{"dirty/hotcold", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.HotCold, WorkingSet: 1000}},
		{"dirty/rate", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Rate: 20000, WorkingSet: 100}},
		{"dirty/4vcpus", testvm.Config{MemSize: 64 << 20, VCPUs: 4, Workload: testvm.Dirty, WorkingSet: 500}},
		{"dirty/text/seq", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Content: testvm.Text, Pattern: testvm.Seq, WorkingSet: 300}},
		{"dirty/text/random", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Content: testvm.Text, WorkingSet: 1000, Seed: 3}},
		{"dirty/sparse/seq", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Content: testvm.Sparse, Pattern: testvm.Seq, WorkingSet: 300}},
		{"dirty/sparse/hotcold", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Content: testvm.Sparse, Pattern: testvm.HotCold, WorkingSet: 1000}},
		{"counter", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Counter}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := vmtest.Boot(t, tt.cfg, nil)
			vmtest.WaitProgress(t, m, make([]uint64, tt.cfg.VCPUs))
			before := vmtest.Iterations(m)
			vmtest.WaitProgress(t, m, before)
			if err := m.Pause(); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < tt.cfg.VCPUs; i++ {
				st := m.Status(i)
				if !st.Started || st.State != testvm.GuestRunning {
					t.Errorf("vCPU %d: status %+v, want started and running", i, st)
				}
				switch tt.cfg.Workload {
				case testvm.Dirty:
					rep, err := m.VerifyPages(i)
					if err != nil {
						t.Fatalf("vCPU %d: %v", i, err)
					}
					// The guest counts a write, then the iteration: a pause
					// may fall between the two.
					if rep.Written == 0 || (st.Writes != st.Iterations && st.Writes != st.Iterations+1) {
						t.Errorf("vCPU %d: %d pages written, %d writes, %d iterations", i, rep.Written, st.Writes, st.Iterations)
					}
				case testvm.Counter:
					if want := testvm.CounterHash(testvm.CounterStart, 0, st.Counter); st.Hash != want {
						t.Errorf("vCPU %d: counter %d hash %#x, want %#x", i, st.Counter, st.Hash, want)
					}
				}
			}
		})
	}
}

// The Seq pattern's versions are fully determined by the write count; a wrong
// page is caught by VerifyPages, whatever the content. Corrupt one page (a
// word the guest wrote, or one it left zero) and check that it is.
func TestVerifyPagesCatchesCorruption(t *testing.T) {
	for _, content := range []testvm.Content{testvm.Stamp, testvm.Text, testvm.Sparse} {
		for _, word := range []uint64{100, 8 * 11} { // sparse: a zero line, and page 10's only written line
			t.Run(fmt.Sprintf("%v/word%d", content, word), func(t *testing.T) {
				m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Content: content,
					Pattern: testvm.Seq, WorkingSet: 64}, nil)
				vmtest.WaitProgress(t, m, []uint64{200})
				if err := m.Pause(); err != nil {
					t.Fatal(err)
				}
				if _, err := m.VerifyPages(0); err != nil {
					t.Fatalf("before corruption: %v", err)
				}
				victim := uint64(10)
				if m.Status(0).CurPage == victim+1 {
					victim = 11
				}
				off := m.RegionBase(0) + victim*4096 + word*8
				m.Memory()[off] ^= 1
				if _, err := m.VerifyPages(0); err == nil {
					t.Fatal("VerifyPages passed a page with a flipped bit")
				}
			})
		}
	}
}

// harvest runs KVM_GET_DIRTY_LOG on every slot and returns the dirty pages by
// guest-physical address.
func harvest(t *testing.T, m *testvm.Machine) map[uint64]bool {
	t.Helper()
	dirty := map[uint64]bool{}
	for _, s := range m.Slots() {
		pages := s.Size / 4096
		bm := make([]uint64, (pages+63)/64)
		if err := m.VM().GetDirtyLog(s.ID, bm); err != nil {
			t.Fatal(err)
		}
		for w, word := range bm {
			for word != 0 {
				b := uint64(bits.TrailingZeros64(word))
				word &= word - 1
				dirty[s.GPA+(uint64(w)*64+b)*4096] = true
			}
		}
	}
	return dirty
}

// With dirty logging on, KVM_GET_DIRTY_LOG reports exactly the pages the guest
// wrote in a phase: every page whose stamp changed (none missed), and beyond
// those only the guest's status and stack pages.
func TestDirtyLogMatchesGuestRecord(t *testing.T) {
	tests := []struct {
		name string
		cfg  testvm.Config
	}{
		// 1 vCPU over 32 MiB: the region spans the slot boundary at 16 MiB.
		{"seq/slot-boundary", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq, WorkingSet: 7000, PhaseOps: 3000}},
		{"random/2vcpus", testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Random, WorkingSet: 5000, PhaseOps: 4000, Seed: 3}},
		{"hotcold/rewrites", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.HotCold, WorkingSet: 2000, PhaseOps: 5000}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.DirtyLog = true
			m := vmtest.Boot(t, tt.cfg, nil)
			harvest(t, m) // everything the boot wrote
			prev := vmtest.Versions(m)
			for phase := uint64(1); phase <= 4; phase++ {
				vmtest.Phase(t, m, phase)
				dirty := harvest(t, m)
				cur := vmtest.Versions(m)
				written := 0
				for p, v := range cur {
					if v != prev[p] {
						written++
						if !dirty[p] {
							t.Errorf("phase %d: page %#x (version %d -> %d) written but not reported dirty", phase, p, prev[p], v)
						}
					}
				}
				for p := range dirty {
					if cur[p] == prev[p] && !vmtest.GuestBookkeeping(m, p) {
						t.Errorf("phase %d: page %#x reported dirty but the guest did not write it", phase, p)
					}
				}
				if written == 0 {
					t.Fatalf("phase %d: the guest wrote no page", phase)
				}
				t.Logf("phase %d: %d pages written, %d reported", phase, written, len(dirty))
				prev = cur
			}
		})
	}
}

// 1000 pause/resume cycles under load with 2 vCPUs: every pause stops both
// vCPUs (no progress while paused), every resume lets both go on, and the
// guest's pages verify at the end.
func TestPauseResumeCycles(t *testing.T) {
	m := vmtest.Boot(t, testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Random, WorkingSet: 2000}, nil)
	last := vmtest.Iterations(m)
	for cycle := 0; cycle < 1000; cycle++ {
		if err := m.Pause(); err != nil {
			t.Fatalf("cycle %d: %v", cycle, err)
		}
		if s := m.State(); s != testvm.Paused {
			t.Fatalf("cycle %d: state %s after Pause", cycle, s)
		}
		a := vmtest.Iterations(m)
		for i := range a {
			if a[i] < last[i] {
				t.Fatalf("cycle %d: vCPU %d went back from %d to %d iterations", cycle, i, last[i], a[i])
			}
		}
		if cycle%100 == 0 {
			time.Sleep(2 * time.Millisecond)
			if b := vmtest.Iterations(m); fmt.Sprint(a) != fmt.Sprint(b) {
				t.Fatalf("cycle %d: progress while paused: %v -> %v", cycle, a, b)
			}
			for i := 0; i < 2; i++ {
				if _, err := m.VerifyPages(i); err != nil {
					t.Fatalf("cycle %d: %v", cycle, err)
				}
			}
		}
		if err := m.Resume(); err != nil {
			t.Fatalf("cycle %d: %v", cycle, err)
		}
		vmtest.WaitProgress(t, m, a)
		last = a
	}
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := m.VerifyPages(i); err != nil {
			t.Fatal(err)
		}
	}
}

func TestLargeMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("4 GiB guest in -short mode")
	}
	// 4 vCPUs over 4 GiB: vCPU 3's region lies in slot 1, above the 4 GiB GPA.
	m := vmtest.Boot(t, testvm.Config{MemSize: 4 << 30, VCPUs: 4, Workload: testvm.Dirty, Pattern: testvm.Seq, WorkingSet: 256}, nil)
	vmtest.WaitProgress(t, m, []uint64{1000, 1000, 1000, 1000})
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	if base := m.RegionBase(3); m.GPA(base) < 4<<30 {
		t.Fatalf("vCPU 3's region at GPA %#x, want it in the high slot", m.GPA(base))
	}
	for i := 0; i < 4; i++ {
		if _, err := m.VerifyPages(i); err != nil {
			t.Fatal(err)
		}
	}
}

func TestBadConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     testvm.Config
		wantErr string
	}{
		{"mem not 2MiB multiple", testvm.Config{MemSize: 33 << 20, VCPUs: 1}, "not a multiple of 2 MiB"},
		{"mem too small", testvm.Config{MemSize: 4 << 20, VCPUs: 1}, "outside"},
		{"mem too large", testvm.Config{MemSize: 128 << 30, VCPUs: 1}, "outside"},
		{"0 vcpus", testvm.Config{MemSize: 32 << 20, VCPUs: 0}, "0 vCPUs"},
		{"5 vcpus", testvm.Config{MemSize: 32 << 20, VCPUs: 5}, "5 vCPUs"},
		{"unknown workload", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: 99}, "unknown workload"},
		{"unknown pattern", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Pattern: 42}, "unknown pattern"},
		{"working set too big", testvm.Config{MemSize: 32 << 20, VCPUs: 2, WorkingSet: 1 << 20}, "exceeds"},
		{"ring not power of two", testvm.Config{MemSize: 32 << 20, VCPUs: 1, DirtyRingEntries: 1000}, "power of two"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := testvm.New(tt.cfg)
			if err == nil {
				m.Close()
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %q does not mention %q", err, tt.wantErr)
			}
		})
	}
	if _, err := testvm.ParseWorkload("bogus"); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Errorf("ParseWorkload(bogus) = %v", err)
	}
	if _, err := testvm.ParsePattern("zigzag"); err == nil || !strings.Contains(err.Error(), "zigzag") {
		t.Errorf("ParsePattern(zigzag) = %v", err)
	}
}

// A guest that finds its params page wrong reports an error through the
// control port, and the machine stops with it.
func TestGuestReportsBadParams(t *testing.T) {
	m := vmtest.Build(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Counter})
	m.Memory()[testvm.ParamsOffset] ^= 0xff // break the magic
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done():
	case <-time.After(vmtest.Wait):
		t.Fatal("machine did not stop")
	}
	var ge *testvm.GuestError
	if !errors.As(m.Err(), &ge) || ge.Code != 1 {
		t.Fatalf("Err() = %v, want a GuestError with code 1 (bad params)", m.Err())
	}
	if err := m.Pause(); !errors.Is(err, testvm.ErrStopped) {
		t.Fatalf("Pause on a stopped machine = %v, want ErrStopped", err)
	}
}

// Every write the VMM makes into guest memory reaches the recorder as
// guest-physical ranges, split where the slots split.
func TestVMMWritesAreRecorded(t *testing.T) {
	m := vmtest.Build(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Idle})
	type rng struct{ gpa, n uint64 }
	var got []rng
	m.SetWriteRecorder(func(gpa, n uint64) { got = append(got, rng{gpa, n}) })
	high := m.Slots()[1]
	if err := m.WriteGuest(high.Offset-4096, make([]byte, 8192)); err != nil {
		t.Fatal(err)
	}
	m.Go(3)
	want := []rng{{high.Offset - 4096, 4096}, {high.GPA, 4096}, {testvm.ParamsOffset + 64, 8}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("recorded %v, want %v", got, want)
	}
	got = nil
	if err := m.WriteGuest(32<<20-10, make([]byte, 11)); err == nil {
		t.Fatal("WriteGuest past the end of memory succeeded")
	}
	m.SetWriteRecorder(nil)
	if err := m.WriteGuest(0x300000, []byte{1}); err != nil || len(got) != 0 {
		t.Fatalf("after unregistering: err %v, recorded %v", err, got)
	}
}

// After Close, Pause, Resume and Save report ErrStopped, reads of guest state
// are safe, and waiters racing Close return instead of touching freed memory.
func TestUseAfterClose(t *testing.T) {
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, WorkingSet: 100, PhaseOps: 1 << 40}, nil)
	errc := make(chan error, 2)
	go func() { errc <- m.WaitPhase(context.Background(), 1) }()
	go func() {
		for m.State() != testvm.Stopped {
			m.Status(0)
			m.ReadStamp(1, 5)
		}
		errc <- nil
	}()
	time.Sleep(5 * time.Millisecond)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err == nil {
		// Either goroutine may finish first; the waiter must fail, the reader not.
		if err = <-errc; !errors.Is(err, testvm.ErrStopped) {
			t.Fatalf("WaitPhase across Close = %v, want ErrStopped", err)
		}
	} else if !errors.Is(err, testvm.ErrStopped) {
		t.Fatalf("WaitPhase across Close = %v, want ErrStopped", err)
	} else {
		<-errc
	}
	if err := m.Pause(); !errors.Is(err, testvm.ErrStopped) {
		t.Errorf("Pause after Close = %v, want ErrStopped", err)
	}
	if err := m.Resume(); !errors.Is(err, testvm.ErrStopped) {
		t.Errorf("Resume after Close = %v, want ErrStopped", err)
	}
	if _, err := m.Save(); !errors.Is(err, testvm.ErrStopped) {
		t.Errorf("Save after Close = %v, want ErrStopped", err)
	}
	if st := m.Status(0); st.Started {
		t.Errorf("Status after Close = %+v, want the zero Status", st)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
