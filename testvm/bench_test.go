package testvm_test

import (
	"fmt"
	"math/bits"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/kvm"
	"github.com/repagent/repagent/testvm"
)

// The floors every later epoch is measured against: machine state save and
// restore, pause/resume under load, the guest's write rate with and without
// dirty logging, and the classic dirty-log harvest. See docs/BENCHMARKS.md.
// No benchmark asserts a speed; they fail only when they would measure the
// wrong thing.

// writesOf returns every vCPU's Dirty-workload write count, reusing into so
// the timed loop does not allocate.
func writesOf(m *testvm.Machine, into []uint64) []uint64 {
	into = into[:0]
	for i := 0; i < m.NumVCPUs(); i++ {
		into = append(into, m.Status(i).Writes)
	}
	return into
}

// stateMem is the memory of the machine the save and restore benchmarks use.
const stateMem = 32 << 20

// pausedMachine boots a 2-vCPU machine of stateMem, lets the guest write, pauses
// it and returns it with its saved state.
func pausedMachine(b *testing.B) (*testvm.Machine, []byte) {
	m := vmtest.Boot(b, testvm.Config{MemSize: stateMem, VCPUs: 2, Workload: testvm.Dirty, WorkingSet: 1000}, nil)
	vmtest.WaitProgress(b, m, []uint64{100, 100})
	if err := m.Pause(); err != nil {
		b.Fatal(err)
	}
	st, err := m.Save()
	if err != nil {
		b.Fatal(err)
	}
	return m, st
}

// BenchmarkMachineSave is Machine.Save of a paused 2-vCPU machine: the VM-wide
// state, both vCPUs' states and the encoding with its checksum.
func BenchmarkMachineSave(b *testing.B) {
	m, st := pausedMachine(b)
	b.SetBytes(int64(len(st)))
	for b.Loop() {
		if _, err := m.Save(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(st)), "state-bytes")
}

// newMemfd makes a memfd of size bytes, as a restoring VMM receives one.
func newMemfd(b *testing.B, size uint64) *os.File {
	fd, err := unix.MemfdCreate("bench-guest", unix.MFD_CLOEXEC)
	if err != nil {
		b.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		b.Fatal(err)
	}
	return os.NewFile(uintptr(fd), "bench-guest")
}

// BenchmarkMachineRestore is testvm.Restore of a 2-vCPU, 32 MiB machine into
// a fresh machine: decode, a new KVM VM with irqchip, PIT, slots and vCPUs
// (CPUID, MSR probe), and the saved state written in. Memory is mapped from a
// memfd, not copied, so the figure is the state's, not the memory's. Making
// the memfd and closing the restored machine are outside the timer.
func BenchmarkMachineRestore(b *testing.B) {
	m, st := pausedMachine(b)
	m.Close()
	b.SetBytes(int64(len(st)))
	for b.Loop() {
		b.StopTimer()
		f := newMemfd(b, stateMem)
		b.StartTimer()
		r, err := testvm.Restore(st, f, testvm.RestoreOptions{})
		b.StopTimer()
		if err != nil {
			f.Close()
			b.Fatal(err)
		}
		r.Close()
		b.StartTimer()
	}
}

// BenchmarkPauseResume pauses and resumes a machine whose vCPUs run the Dirty
// workload at full speed. Pause kicks every vCPU out of KVM_RUN and waits until
// all are parked; Resume lets them go. After Resume each op waits until every
// vCPU has written a page again, so the next Pause meets vCPUs that are really
// in the guest: ns/op is that whole cycle, pause-µs/op and resume-µs/op the two
// calls alone.
func BenchmarkPauseResume(b *testing.B) {
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("vcpus=%d", n), func(b *testing.B) {
			m := vmtest.Boot(b, testvm.Config{MemSize: 64 << 20, VCPUs: n, Workload: testvm.Dirty, Pattern: testvm.Random, WorkingSet: 2000}, nil)
			w := writesOf(m, nil)
			vmtest.WaitProgress(b, m, w)
			var pause, resume time.Duration
			ops := 0
			for b.Loop() {
				t0 := time.Now()
				if err := m.Pause(); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if err := m.Resume(); err != nil {
					b.Fatal(err)
				}
				t2 := time.Now()
				pause += t1.Sub(t0)
				resume += t2.Sub(t1)
				ops++
				w = writesOf(m, w)
				vmtest.WaitProgress(b, m, w)
			}
			b.ReportMetric(float64(pause.Nanoseconds())/1e3/float64(ops), "pause-µs/op")
			b.ReportMetric(float64(resume.Nanoseconds())/1e3/float64(ops), "resume-µs/op")
		})
	}
}

// harvester harvests every slot of a machine with KVM_GET_DIRTY_LOG.
type harvester struct {
	m   *testvm.Machine
	bms [][]uint64
}

func newHarvester(m *testvm.Machine) *harvester {
	h := &harvester{m: m}
	for _, s := range m.Slots() {
		pages := s.Size / 4096
		h.bms = append(h.bms, make([]uint64, (pages+63)/64))
	}
	return h
}

// fetch runs KVM_GET_DIRTY_LOG on every slot (which also re-protects the
// pages it reports) and returns how many pages were dirty and how long the
// ioctls took (without the bitmap walk that counts the pages).
func (h *harvester) fetch() (uint64, time.Duration, error) {
	t0 := time.Now()
	for i, s := range h.m.Slots() {
		if err := h.m.VM().GetDirtyLog(s.ID, h.bms[i]); err != nil {
			return 0, 0, err
		}
	}
	d := time.Since(t0)
	var n uint64
	for _, bm := range h.bms {
		for _, w := range bm {
			n += uint64(bits.OnesCount64(w))
		}
	}
	return n, d, nil
}

// periodic harvests every period until stop is closed, then reports what it
// did on done.
type harvestStats struct {
	harvests int
	pages    uint64
	busy     time.Duration
	err      error
}

func (h *harvester) periodic(period time.Duration, stop <-chan struct{}, done chan<- harvestStats) {
	var st harvestStats
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-stop:
			done <- st
			return
		case <-t.C:
		}
		n, d, err := h.fetch()
		st.busy += d
		if err != nil {
			st.err = err
			done <- st
			return
		}
		st.harvests++
		st.pages += n
	}
}

// writeRate measures vCPU 0's page writes over a wall-clock window.
func writeRate(b *testing.B, m *testvm.Machine, window time.Duration) (writes uint64, elapsed time.Duration) {
	w0, t0 := m.Status(0).Writes, time.Now()
	time.Sleep(window)
	w1, t1 := m.Status(0).Writes, time.Now()
	if err := m.Err(); err != nil {
		b.Fatalf("machine stopped: %v", err)
	}
	return w1 - w0, t1.Sub(t0)
}

// BenchmarkGuestWriteRate is the guest's page-write throughput (the Dirty
// workload, random pattern over 16384 pages = 64 MiB, 1 vCPU) with dirty
// logging off, on but never harvested, and on with a harvest of every slot
// every 100 ms and every 10 ms. Each op is a 200 ms wall-clock window; the
// figure is pages/s. All subs share one machine; each first measures logging
// off for 600 ms (off-pages/s) and reports its own rate as a ratio against
// that (ratio-vs-off), so every ratio comes from adjacent windows of one run.
// The log=off sub's ratio shows the noise.
func BenchmarkGuestWriteRate(b *testing.B) {
	const (
		ws     = 16384
		window = 200 * time.Millisecond
	)
	m := vmtest.Boot(b, testvm.Config{MemSize: 128 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random, WorkingSet: ws, Seed: 1}, nil)
	// Warm up: about 12 passes' worth of random writes touch every page.
	vmtest.WaitProgress(b, m, []uint64{12 * ws})

	// run measures logging off for three windows, then calls setup and
	// measures one window per op. The baseline is taken right before, on the
	// same machine, because the rate drifts by 10-20% over a minute here.
	run := func(b *testing.B, setup func() (teardown func())) {
		var offW uint64
		var offT time.Duration
		for i := 0; i < 3; i++ {
			w, t := writeRate(b, m, window)
			offW, offT = offW+w, offT+t
		}
		off := float64(offW) / offT.Seconds()
		teardown := setup()
		defer teardown()
		var writes uint64
		var elapsed time.Duration
		for b.Loop() {
			w, t := writeRate(b, m, window)
			writes, elapsed = writes+w, elapsed+t
		}
		rate := float64(writes) / elapsed.Seconds()
		b.ReportMetric(rate, "pages/s")
		b.ReportMetric(rate/off, "ratio-vs-off")
		b.ReportMetric(off, "off-pages/s")
	}
	setFlags := func(b *testing.B, flags uint32) {
		if err := m.SetSlotFlags(flags); err != nil {
			b.Fatal(err)
		}
	}

	b.Run("log=off", func(b *testing.B) {
		run(b, func() func() { return func() {} })
	})
	b.Run("log=on/harvest=none", func(b *testing.B) {
		run(b, func() func() {
			setFlags(b, kvm.KVM_MEM_LOG_DIRTY_PAGES)
			// Let the first pass after turning logging on (one write fault per
			// page) finish, so the windows see only the steady state.
			vmtest.WaitProgress(b, m, []uint64{m.Status(0).Writes + 12*ws})
			return func() { setFlags(b, 0) }
		})
	})
	for _, period := range []time.Duration{100 * time.Millisecond, 10 * time.Millisecond} {
		b.Run(fmt.Sprintf("log=on/harvest=%v", period), func(b *testing.B) {
			var stats harvestStats
			run(b, func() func() {
				setFlags(b, kvm.KVM_MEM_LOG_DIRTY_PAGES)
				h := newHarvester(m)
				stop, done := make(chan struct{}), make(chan harvestStats, 1)
				go h.periodic(period, stop, done)
				time.Sleep(3 * period)
				return func() {
					close(stop)
					stats = <-done
					setFlags(b, 0)
				}
			})
			if stats.err != nil {
				b.Fatal(stats.err)
			}
			if stats.harvests > 0 {
				b.ReportMetric(float64(stats.pages)/float64(stats.harvests), "pages/harvest")
				b.ReportMetric(float64(stats.busy.Nanoseconds())/1e3/float64(stats.harvests), "harvest-µs")
			}
		})
	}
}

// BenchmarkGetDirtyLog is the classic harvest of a 1 GiB guest: KVM_GET_DIRTY_LOG
// on every slot, which returns the bitmap and write-protects the dirty pages
// again. Before each harvest the guest (1 vCPU, Seq pattern, WorkingSet =
// PhaseOps = N) runs one phase and so writes exactly N distinct pages; the
// harvest must report those N plus at most the guest's status and stack page.
// harvest-µs/op is the harvest alone; ns/op also includes the guest's phase,
// and guest-µs/page is that phase's wall-clock time per page written.
func BenchmarkGetDirtyLog(b *testing.B) {
	for _, c := range []struct {
		name  string
		pages uint64
	}{{"0", 0}, {"1k", 1000}, {"10k", 10000}, {"100k", 100000}} {
		b.Run("mem=1GiB/dirty="+c.name, func(b *testing.B) {
			n := c.pages
			cfg := testvm.Config{MemSize: 1 << 30, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq,
				WorkingSet: n, PhaseOps: n, DirtyLog: true}
			if n == 0 {
				// The guest waits for phase 1, which never comes: it writes nothing.
				cfg.WorkingSet, cfg.PhaseOps = 1, 1
			}
			m := vmtest.Boot(b, cfg, nil)
			ctx := vmtest.Context(b)
			h := newHarvester(m)
			phase := uint64(0)
			next := func() {
				if n == 0 {
					return
				}
				phase++
				m.Go(phase)
				if err := m.WaitPhase(ctx, phase); err != nil {
					b.Fatal(err)
				}
			}
			// Warm up: the first phase touches fresh memory; then start clean.
			next()
			if _, _, err := h.fetch(); err != nil {
				b.Fatal(err)
			}
			var busy, guest time.Duration
			var pages uint64
			ops := 0
			for b.Loop() {
				tg := time.Now()
				next()
				guest += time.Since(tg)
				got, d, err := h.fetch()
				busy += d
				if err != nil {
					b.Fatal(err)
				}
				if got < n || got > n+2 {
					b.Fatalf("phase %d: harvested %d dirty pages, want %d (+ up to 2 bookkeeping pages)", phase, got, n)
				}
				pages += got
				ops++
			}
			b.ReportMetric(float64(busy.Nanoseconds())/1e3/float64(ops), "harvest-µs/op")
			b.ReportMetric(float64(pages)/float64(ops), "dirty-pages")
			if n > 0 {
				// The guest's side: a phase of N first writes to pages that the
				// previous harvest write-protected, wall clock, per page.
				b.ReportMetric(float64(guest.Nanoseconds())/1e3/float64(ops)/float64(n), "guest-µs/page")
			}
		})
	}
}
