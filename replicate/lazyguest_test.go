package replicate

import (
	"math"
	"testing"
	"time"
)

// simulateBudget runs a guest-cost budget over epochs of a guest that
// dirties dirty pages per 100 ms epoch at 2 µs of vCPU host time each under
// eager capture; a page captured lazily costs extra µs more in the run after
// its pause and saves 0.7 µs of pause. It returns the budget and the last
// epoch's lazy pages.
func simulateBudget(epochs, dirty int, extra float64) (*guestBudget, int) {
	const interval = 100 * time.Millisecond
	b := newGuestBudget(interval, lazyCalibrateTime)
	now := time.Unix(1000, 0)
	prev, lazy := 0, 0
	for range epochs {
		lazy = min(b.allowed(), dirty)
		host := time.Duration(2000*float64(dirty) + extra*1000*float64(prev))
		saved := time.Duration(700 * lazy)
		now = now.Add(interval)
		b.observe(guestRun{host: host, saved: saved, dirty: dirty, lazy: lazy, wanted: dirty}, now)
		prev = lazy
	}
	return b, lazy
}

// Auto's budget captures eagerly while it calibrates, then caps the lazy
// pages at what lazyGuestBudget of the epoch buys at their measured price.
func TestGuestBudgetPricesLazyPages(t *testing.T) {
	b := newGuestBudget(100*time.Millisecond, lazyCalibrateTime)
	if b.allowed() != 0 {
		t.Fatal("lazy pages allowed before eager's cost was calibrated")
	}
	// A lazy page costs 5.7 µs over eager and saves 0.7 µs of pause: 5 µs
	// net, so 8% of 100 ms buys 1600 pages.
	b, lazy := simulateBudget(600, 8000, 5.7)
	want := lazyGuestBudget * float64(100*time.Millisecond) / 5000
	if math.Abs(float64(b.cap)-want) > 0.1*want {
		t.Fatalf("cap %d pages, want about %.0f (price %.0f ns)", b.cap, want, b.price)
	}
	if lazy == 0 {
		t.Fatal("no page captured lazily in the last epoch")
	}
	// A lazy page that costs the guest less than the pause it saves is not
	// capped.
	if _, lazy := simulateBudget(600, 8000, 0.5); lazy != 8000 {
		t.Fatalf("%d of 8000 pages lazy at a negative price", lazy)
	}
}

// A calibration block of eager epochs comes every lazyRecalibrateTime, and
// when the dirty pages per epoch drift.
func TestGuestBudgetRecalibrates(t *testing.T) {
	const interval = 100 * time.Millisecond
	b := newGuestBudget(interval, lazyCalibrateTime)
	now := time.Unix(1000, 0)
	eager := 0
	for i := range 2000 {
		dirty := 8000
		if i >= 1500 {
			dirty = 2000 // the workload changed
		}
		lazy := min(b.allowed(), dirty)
		if i > 100 && lazy == 0 {
			eager++
		}
		now = now.Add(interval)
		b.observe(guestRun{host: time.Duration(2000*dirty + 1000*lazy), saved: time.Duration(700 * lazy), dirty: dirty, lazy: lazy, wanted: dirty}, now)
	}
	// Periodic blocks of lazyEagerRun epochs at epochs 600 and 1200, a
	// longer one for the drift at 1500, and none after (the period restarts
	// with it).
	if want := 4 * lazyEagerRun; eager < want-2 || eager > want+2 {
		t.Fatalf("%d eager epochs after the calibration, want about %d", eager, want)
	}
}

// capRuns keeps the longest runs lazy up to the cap, splits the one where
// the cap falls, and keeps the runs in address order.
func TestCapRuns(t *testing.T) {
	l := &lazyCapture{
		runs: [][2]int{{0, 100}, {100, 110}, {110, 500}, {500, 520}},
		lazy: []bool{true, true, true, false},
	}
	if wanted := l.capRuns(450); wanted != 500 {
		t.Fatalf("wanted %d, want 500", wanted)
	}
	wantRuns := [][2]int{{0, 60}, {60, 100}, {100, 110}, {110, 500}, {500, 520}}
	wantLazy := []bool{true, false, false, true, false}
	if len(l.runs) != len(wantRuns) {
		t.Fatalf("runs %v lazy %v", l.runs, l.lazy)
	}
	for i := range wantRuns {
		if l.runs[i] != wantRuns[i] || l.lazy[i] != wantLazy[i] {
			t.Fatalf("runs %v lazy %v, want %v %v", l.runs, l.lazy, wantRuns, wantLazy)
		}
	}
	// Under the cap nothing changes.
	l.runs, l.lazy = [][2]int{{0, 10}}, []bool{true}
	if l.capRuns(100); len(l.runs) != 1 || !l.lazy[0] {
		t.Fatalf("runs %v lazy %v under the cap", l.runs, l.lazy)
	}
}

// With the guest's progress, the price is the guest's rate against eager's:
// here lazy capture costs nothing on the vCPU threads' host time but slows
// the guest by 20% when every dirty page goes lazy, so 8% of its time buys
// 40% of the pages.
func TestGuestBudgetPricesByProgress(t *testing.T) {
	const interval = 100 * time.Millisecond
	const dirty = 8000
	b := newGuestBudget(interval, lazyCalibrateTime)
	now := time.Unix(1000, 0)
	prev := 0
	for range 600 {
		lazy := min(b.allowed(), dirty)
		rate := 1 - 0.2*float64(prev)/dirty // of eager's, in the run after the pause
		now = now.Add(interval)
		b.observe(guestRun{host: 2000 * dirty, progress: uint64(1e6 * rate), hasProgress: true,
			dirty: dirty, lazy: lazy, wanted: dirty}, now)
		prev = lazy
	}
	want := lazyGuestBudget / 0.2 * dirty
	if math.Abs(float64(b.cap)-want) > 0.15*want {
		t.Fatalf("cap %d pages, want about %.0f (price %.0f ns)", b.cap, want, b.price)
	}
}
