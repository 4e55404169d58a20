package uffd

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/privileged"
)

// The figures feed the capture cost model: a run protected in the pause
// (BenchmarkProtectRun), each page the guest writes before the copier
// reaches it (BenchmarkFaultRoundTrip), against copying the page in the
// pause (BenchmarkCopyPage, the floor, measured in the same run).

const benchPages = 512 // 2 MiB

// benchMem returns benchPages populated pages of a memfd, registered on a
// new FD.
func benchMem(b *testing.B) ([]byte, *FD) {
	privileged.Require(b, privileged.Root)
	mem := memfdMem(b, benchPages)
	fillPages(mem)
	f := openFD(b)
	if err := f.Register(Addr(mem), uint64(len(mem))); err != nil {
		b.Fatal(err)
	}
	return mem, f
}

// BenchmarkProtectRun times one UFFDIO_WRITEPROTECT over a run of pages,
// and the unprotect (without wake) that undoes it; ns/op is the pair.
func BenchmarkProtectRun(b *testing.B) {
	for _, pages := range []int{1, 16, benchPages} {
		b.Run(fmt.Sprintf("pages=%d", pages), func(b *testing.B) {
			mem, f := benchMem(b)
			addr, size := Addr(mem), uint64(pages*pageSize)
			var protect, unprotect time.Duration
			b.ResetTimer()
			for range b.N {
				t0 := time.Now()
				if err := f.WriteProtect(addr, size); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if err := f.Unprotect(addr, size, false); err != nil {
					b.Fatal(err)
				}
				protect += t1.Sub(t0)
				unprotect += time.Since(t1)
			}
			n := float64(b.N)
			b.ReportMetric(float64(protect.Nanoseconds())/n, "protect-ns/op")
			b.ReportMetric(float64(protect.Nanoseconds())/n/float64(pages), "protect-ns/page")
			b.ReportMetric(float64(unprotect.Nanoseconds())/n, "unprotect-ns/op")
		})
	}
}

// BenchmarkFaultRoundTrip times a write to a protected page, resolved by a
// Handler that copies the page to staging and unprotects it with wake: the
// delay a guest write sees when it beats the copier. The writer is this
// goroutine, on its own thread; the handler is on another. The pages are
// protected again, off the clock, every benchPages writes. The handler's
// time in its copy and in the unprotect (which includes waking the writer)
// are reported beside it.
func BenchmarkFaultRoundTrip(b *testing.B) {
	mem, f := benchMem(b)
	base := Addr(mem)
	staging := make([]byte, len(mem))
	var copyNs, unprotectNs atomic.Int64 // time spent in the handler
	h, err := f.StartHandler(func(flt Fault) error {
		off := int(flt.Addr - base)
		t0 := time.Now()
		copy(staging[off:off+pageSize], mem[off:off+pageSize])
		t1 := time.Now()
		err := f.Unprotect(flt.Addr, uint64(pageSize), true)
		unprotectNs.Add(int64(time.Since(t1)))
		copyNs.Add(int64(t1.Sub(t0)))
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := h.Stop(); err != nil {
			b.Errorf("handler: %v", err)
		}
	})
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ResetTimer()
	for i := range b.N {
		p := i % benchPages
		if p == 0 {
			b.StopTimer()
			if err := f.WriteProtect(base, uint64(len(mem))); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		// A plain store, not copy(): a faulting memmove cannot be
		// preempted (see doc.go).
		mem[p*pageSize] = byte(i)
	}
	b.StopTimer()
	if got := h.Faults(); got < uint64(b.N) {
		b.Fatalf("%d faults for %d writes", got, b.N)
	}
	n := float64(b.N)
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/page")
	b.ReportMetric(float64(copyNs.Load())/n, "handler-copy-ns/page")
	b.ReportMetric(float64(unprotectNs.Load())/n, "handler-unprotect-ns/page")
}

// BenchmarkCopyPage copies 4 KiB pages into staging, in order: from the
// 2 MiB the round trip uses (cache-warm), and from 64 MiB (out of DRAM).
func BenchmarkCopyPage(b *testing.B) {
	for _, pages := range []int{benchPages, 16384} {
		b.Run(fmt.Sprintf("region=%dMiB", pages*pageSize>>20), func(b *testing.B) {
			mem := memfdMem(b, pages)
			fillPages(mem)
			staging := make([]byte, len(mem))
			b.SetBytes(int64(pageSize))
			b.ResetTimer()
			for i := range b.N {
				off := i % pages * pageSize
				copy(staging[off:off+pageSize], mem[off:off+pageSize])
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/page")
		})
	}
}
