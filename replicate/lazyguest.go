package replicate

import (
	"math"
	"time"

	"github.com/repagent/repagent/internal/cpuclock"
)

// What capture costs the guest outside the pause, and auto's budget for it.
//
// A page captured lazily is write-protected in the pause and unprotected
// once copied. Each change of protection makes the kernel's MMU notifier
// drop KVM's mapping of the page, so the guest's next access to it, read or
// write, takes a full KVM page fault to map it again, where an eager
// checkpoint leaves the mapping in place and costs at most a write-protect
// fault (PLATFORM.md measures both). How much more that is depends on the
// host's MMU (shadow paging under PVM, EPT or NPT elsewhere) and on when the
// guest touches the page again: 1.6 µs a page of vCPU host time on an Intel
// host (seq at 100 ms), more on an AMD one where lazy seq ran the guest at
// 0.59x eager's rate. The pause model (lazy.go) cannot see it.
//
// The vCPU threads can: the kernel accounts their time outside guest mode
// (KVM's faults, exits, device emulation) apart from their guest time. The
// engine samples that once per epoch, after the resume (vcpuClock), and auto
// capture runs a budget on it (guestBudget): the lazily captured pages of an
// epoch are capped, and the cap follows the measured cost. A window of
// epochs prices a lazy page: the vCPU threads' host time over what the same
// dirty pages cost with eager capture, plus the guest's stall in faults,
// less the pause the lazy pages saved (what copying them would have taken,
// less protecting them), over the pages captured lazily. The cap is what
// lazyGuestBudget of the wall time buys at that price (no cap at a price of
// nothing or less); a window that captured too few pages lazily to price
// them opens the cap a little, to measure. Where the VM counts its guest's
// progress (GuestProgress), a run's lost time is instead its wall time less
// the time its progress took the baseline runs: the guest's rate against
// eager's, pause included, which also catches a guest slowed inside guest
// mode (on hotcold the host times of auto and eager matched while the guest
// ran slower).
//
// Eager's cost per dirty page is calibrated at the start: the first
// Config.CaptureCalibration (default lazyCalibrateTime) of epochs (at least lazyWindowMin) are captured eagerly,
// and all but the first lazyEagerLag of them (whose runs may still carry an
// earlier capture's remapping) give the baseline. It is calibrated again,
// from scratch with a block of 2*lazyEagerRun eager epochs when the dirty
// pages per epoch drift by more than lazyDriftShare from the baseline's, and
// with a block of lazyEagerRun every lazyRecalibrateTime regardless; that is
// under 1% of the epochs, so the blocks do not set auto's pause p99.
//
// The times come from the kernel in 10 ms units, sampled at its tick, so a
// window spans lazyWindowTime (at least lazyWindowMin epochs) to average the
// rounding out; the host time of one epoch can even come out negative.
// Auto is thereby never more than about the budget worse for the guest than
// eager, and within that takes as much of the copy out of the pause as the
// pause model finds worth it.

const (
	lazyGuestBudget     = 0.08             // of the wall time: auto's extra guest cost over eager (the 10% tolerance, less a margin for noise)
	lazyWindowMin       = 8                // epochs in a budget window, at least
	lazyWindowTime      = 2 * time.Second  // a budget window's length, at least
	lazyCalibrateTime   = 2 * time.Second  // eager epochs at the start, for the baseline
	lazyRecalibrateTime = 60 * time.Second // between calibrations when nothing drifts
	lazyEagerRun        = 4                // epochs in a calibration block after the first
	lazyEagerLag        = 2                // the first pauses of a block that do not feed the baseline
	lazyDriftShare      = 0.5              // dirty pages per epoch this far from the baseline's: calibrate again
	lazyPriceMin        = 1024             // lazy pages a window needs to price them
	lazyPriceDecay      = 0.5              // weight of the older windows in the price, per window
	lazyBaseDecay       = 0.95             // weight of the older baseline samples, per sample
)

// vcpuClock reads the vCPU threads' host time (cpuclock.HostTime).
type vcpuClock struct {
	vm   VCPUThreads
	last time.Duration
	have bool
}

// sample returns the vCPU threads' host time since the previous sample; ok
// is false for the first sample, or when a thread's time cannot be read
// (a vCPU not started, or one that exited).
func (c *vcpuClock) sample() (d time.Duration, ok bool) {
	var sum time.Duration
	for _, tid := range c.vm.VCPUThreadIDs() {
		if tid == 0 {
			c.have = false
			return 0, false
		}
		t, err := cpuclock.HostTime(tid)
		if err != nil {
			c.have = false
			return 0, false
		}
		sum += t
	}
	d, ok = sum-c.last, c.have
	c.last, c.have = sum, true
	return d, ok
}

// guestBudget is auto capture's cap on lazily captured pages. Only the
// pausing goroutine uses it.
type guestBudget struct {
	cap     int // lazy pages an epoch may take
	window  int // epochs per window
	recal   int // epochs between calibrations
	epochs  int // observed so far
	lastCal int // epochs at the last calibration's start
	// eagerLeft is the pauses still to capture eagerly for a calibration;
	// eagerStreak counts the pauses in a row that captured nothing lazily.
	eagerLeft, eagerStreak int
	prevLazy               int // the lazily captured pages of the pause before the run measured
	// Eager's cost: decayed sums over the baseline runs of their host
	// time, dirty pages, guest progress and wall time, and their count;
	// dAvg averages the dirty pages of all runs, for the drift check.
	baseY, baseD, baseP, baseW, baseN, dAvg float64
	// The current window: the runs' host time over the baseline, their
	// wall time, how many, and whether a pause wanted more than the cap.
	extra, wall time.Duration
	n, lazyN    int     // runs, and the lazy pages captured before them
	price       float64 // ns of guest time a lazy page costs over eager (0: not priced yet)
	// priceX and priceL are the decayed sums over windows of the guest
	// time lost and the lazy pages that cost it.
	priceX, priceL float64
	bound          bool
	last           time.Time
}

// newGuestBudget returns a budget for epochs of interval that calibrates
// eager's cost over the first calibrate of them (Config.CaptureCalibration).
func newGuestBudget(interval, calibrate time.Duration) *guestBudget {
	iv := max(interval, time.Millisecond)
	epochs := func(d time.Duration) int { return max(lazyWindowMin, int(d/iv)) }
	return &guestBudget{window: epochs(lazyWindowTime), recal: epochs(lazyRecalibrateTime),
		eagerLeft: epochs(calibrate)}
}

// allowed is the cap for the next pause. Until a window has priced lazy
// pages, half the dirty pages may go lazy, to price them.
func (b *guestBudget) allowed() int {
	if b.eagerLeft > 0 || b.baseD == 0 {
		return 0
	}
	if b.price == 0 {
		return max(lazyProbeMin, int(b.dAvg/2))
	}
	return b.cap
}

// guestRun is what the engine measured of the run that just ended, from the
// previous resume to this one.
type guestRun struct {
	host  time.Duration // the vCPU threads' host time
	stall time.Duration // the guest's time blocked in faults
	saved time.Duration // the pause its lazy pages saved (copying them, less protecting them)
	// progress is the guest's progress over the run (GuestProgress), when
	// hasProgress.
	progress    uint64
	hasProgress bool
	dirty       int // the pages it dirtied (this pause's harvest)
	// lazy and wanted are what this pause captured lazily, and would have
	// without the cap.
	lazy, wanted int
}

// lost is the guest time the run lost over what eager capture would have
// cost it, by the baseline. With the guest's progress, that is the wall
// time less the time the progress took eager's runs; without, the host
// time over eager's per dirty page, plus the stall, less the pause saved.
func (b *guestBudget) lost(r guestRun, wall time.Duration) time.Duration {
	if r.hasProgress && b.baseP > 0 {
		return wall - time.Duration(float64(r.progress)*b.baseW/b.baseP)
	}
	return r.host + r.stall - r.saved - time.Duration(b.baseY/b.baseD*float64(r.dirty))
}

// observe feeds the run that just ended, at now.
func (b *guestBudget) observe(r guestRun, now time.Time) {
	dirty, lazy, wanted := r.dirty, r.lazy, r.wanted
	prev := b.prevLazy
	b.prevLazy = lazy
	b.epochs++
	if b.eagerLeft > 0 {
		b.eagerLeft--
	}
	if wanted > lazy {
		b.bound = true
	}
	if prev == 0 {
		b.eagerStreak++
	} else {
		b.eagerStreak = 0
	}
	wall := now.Sub(b.last)
	first := b.last.IsZero()
	b.last = now
	if first || wall <= 0 || dirty == 0 {
		return
	}
	b.dAvg = avg(b.dAvg, float64(dirty))
	if b.eagerStreak > lazyEagerLag {
		b.baseY = b.baseY*lazyBaseDecay + float64(r.host)
		b.baseD = b.baseD*lazyBaseDecay + float64(dirty)
		b.baseN = b.baseN*lazyBaseDecay + 1
		if r.hasProgress {
			b.baseP = b.baseP*lazyBaseDecay + float64(r.progress)
			b.baseW = b.baseW*lazyBaseDecay + float64(wall)
		}
	}
	if b.baseD == 0 {
		return
	}
	if b.eagerLeft == 0 {
		dBase := b.baseD / b.baseN
		switch {
		case b.dAvg > dBase*(1+lazyDriftShare) || b.dAvg < dBase*(1-lazyDriftShare):
			// Another workload: a baseline of its own, from a longer block.
			b.eagerLeft, b.lastCal = 2*lazyEagerRun, b.epochs
			b.baseY, b.baseD, b.baseP, b.baseW, b.baseN = 0, 0, 0, 0, 0
			b.dAvg = float64(dirty)
			return
		case b.epochs-b.lastCal >= b.recal:
			b.eagerLeft, b.lastCal = lazyEagerRun, b.epochs
		}
	}
	b.extra += b.lost(r, wall)
	b.wall += wall
	b.lazyN += prev
	if b.n++; b.n < b.window {
		return
	}
	// The window's extra cost per lazily captured page sets the cap: as
	// many pages as the budget pays for at that price. A window with too
	// few lazy pages to price them opens the cap a little, to measure.
	if b.lazyN >= lazyPriceMin {
		// The price is over the last few windows, each weighted by its
		// lazy pages: a window that took few is a poor measure of them.
		b.priceX = b.priceX*lazyPriceDecay + float64(b.extra)
		b.priceL = b.priceL*lazyPriceDecay + float64(b.lazyN)
		b.price = b.priceX / b.priceL
		if b.price == 0 {
			b.price = math.SmallestNonzeroFloat64 // priced: free
		}
		perEpoch := lazyGuestBudget * float64(b.wall) / float64(b.n)
		if b.price <= 0 {
			b.cap = math.MaxInt32
		} else {
			b.cap = int(min(perEpoch/b.price, math.MaxInt32))
		}
	} else if b.bound {
		b.cap = max(b.cap, lazyProbeMin, dirty/4)
	}
	b.extra, b.wall, b.n, b.lazyN, b.bound = 0, 0, 0, 0, false
}
