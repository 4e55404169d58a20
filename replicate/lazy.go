package replicate

import (
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/repagent/repagent/internal/cpuclock"
	"github.com/repagent/repagent/internal/uffd"
)

// Lazy capture (copy-before-write). In the pause, after the harvest, the
// epoch's dirty runs are write-protected with userfaultfd instead of copied
// (all of them with CaptureLazy; with CaptureAuto, those the cost model says
// are cheaper to protect than to copy, the rest copied as eagerly); the
// guest resumes; a copier goroutine copies the protected pages into the
// epoch's staging, in address order, a chunk at a time, and unprotects each
// chunk once it is copied. A write to a page not yet copied blocks the
// writer in a fault; the fault handler (its own locked thread) copies the
// page first and unprotects it, which wakes the writer. So every staged page
// holds its content at the epoch boundary, as the eager copy would.
//
// Every page is copied exactly once, by whoever claims it first (the
// copier, the handler, or the write guard below), and a page is unprotected
// only once it is copied, so no write reaches a page before its copy.
//
// The VMM's own writes into guest memory (device DMA) must not fault: a Go
// goroutine blocked in a fault inside copy() holds up the garbage
// collector's stop-the-world, and the whole process with it (internal/uffd,
// "Go writers and stop-the-world"). So lazy capture needs a VM that
// implements WriteGuard: the VMM calls the guard before it writes, and the
// guard copies and unprotects the pages first.
//
// The sender sends an epoch only once its copier is done, and the next pause
// waits for the sender, so at most one epoch is being copied behind the
// guest. A failure anywhere in lazy capture closes the userfaultfd (which
// unprotects everything and wakes every blocked writer) and ends the
// session: the guest runs on unprotected, and no torn page is ever sent.

// Capture says how a checkpoint's dirty pages are captured.
type Capture int

const (
	// CaptureEager copies every dirty page into staging during the pause.
	CaptureEager Capture = iota
	// CaptureLazy write-protects the dirty runs during the pause and copies
	// them behind the running guest (copy-before-write).
	CaptureLazy
	// CaptureAuto chooses per run, from costs measured on this host: runs
	// long enough that protecting them costs the pause less than copying
	// (and the guest's faults on them less than that saves) go lazy, as
	// many as keep what lazy capture costs the guest outside the pause
	// within a budget (lazyguest.go).
	CaptureAuto
)

var captureNames = []string{CaptureEager: "eager", CaptureLazy: "lazy", CaptureAuto: "auto"}

func (c Capture) String() string {
	if int(c) >= 0 && int(c) < len(captureNames) {
		return captureNames[c]
	}
	return fmt.Sprintf("capture(%d)", int(c))
}

// ParseCapture parses eager, lazy or auto (the CLI's --capture).
func ParseCapture(s string) (Capture, error) {
	for c, n := range captureNames {
		if n == s {
			return Capture(c), nil
		}
	}
	return 0, fmt.Errorf("unknown capture %q (want eager, lazy or auto)", s)
}

// WriteGuard is implemented by a VM whose VMM writes guest memory itself
// (device DMA). Lazy capture needs it: the engine installs a guard, and the
// VMM calls it before each of its own writes of [gpa, gpa+length), from any
// goroutine; the guard returns once the range may be written (its pages of
// the epoch being captured copied and unprotected). nil removes the guard.
type WriteGuard interface {
	SetWriteGuard(guard func(gpa, length uint64))
}

// Page states of a lazy job, by the page's index in the job.
const (
	pageProtected uint32 = iota // protected, not copied yet
	pageCopying                 // claimed: being copied
	pageCopied                  // copied (and, once its chunk or fault is done, unprotected)
	pageEager                   // copied in the pause, never protected
)

const (
	lazyChunk            = 64    // pages the copier copies before unprotecting them
	lazyCallGuess        = 3500  // ns per UFFDIO_WRITEPROTECT call, until measured (PLATFORM.md, in a VM)
	lazyPageGuess        = 70    // ns per page of a call, until measured
	lazyFaultGuess       = 15000 // ns the handler takes on a fault (copy and unprotect), until measured
	lazyProbeMin         = 32    // pages: auto probes the protect cost on runs at least this long
	lazyProbeEvery       = 16    // epochs between probes
	lazyQuietEpochs      = 4     // auto: epochs the model wanted nothing lazy before it stops looking until a probe
	lazyPerPageMinSample = 16    // pages: runs at least this long sample the per-page cost
)

// lazyCapture is a primary's userfaultfd, fault handler and cost model.
type lazyCapture struct {
	p    *Primary
	mode Capture
	fd   *uffd.FD
	h    *uffd.Handler
	vm   WriteGuard
	cur  atomic.Pointer[lazyJob] // the epoch being copied behind the guest, or the last one
	hot  []atomic.Uint64         // with auto: a bit per replica page written while it was copied behind
	base []uint64                // host address of each layout region

	// The cost model, in ns: the protect's cost per call and per page (fed
	// by the pause), the faults per protected page and the handler's time
	// per fault (fed by each epoch's copier once it is done).
	mu                    sync.Mutex
	callNs, pageNs        float64
	faultRate, faultStall float64
	closed                atomic.Bool

	// Scratch of capture, which only the pausing goroutine runs: the
	// epoch's runs, which of them are hot and lazy, and its eager pages.
	runs   [][2]int
	hotRun []bool
	lazy   []bool
	eager  []int
	// With auto and a VM that names its vCPU threads, the cap on lazy
	// pages (lazyguest.go), the pages this pause's model wanted lazy
	// (measureGuest reads and clears it after the resume), and
	// capRuns' scratch.
	budget      *guestBudget
	quiet       int // auto: epochs in a row whose model wanted no page lazy
	wanted      int
	order, keep []int
	splitRuns   [][2]int
	splitLazy   []bool
}

// lazyJob is one epoch's copy behind the guest.
type lazyJob struct {
	l       *lazyCapture
	job     *epochJob
	state   []atomic.Uint32
	runs    [][2]int // protected runs, job page indexes [from, to), in address order
	pages   int      // protected pages
	done    chan struct{}
	err     error // set before done closes
	faults  atomic.Int64
	faultNs atomic.Int64 // the handler's time (copy and unprotect) on the faults it copied for
	guarded atomic.Int64 // pages the write guard copied
}

// newLazyCapture opens a userfaultfd over the VM's memory and starts the
// fault handler; the error wraps ErrLazyUnsupported when it cannot.
func newLazyCapture(p *Primary, mode Capture) (*lazyCapture, error) {
	wg, ok := p.cfg.VM.(WriteGuard)
	if !ok {
		return nil, fmt.Errorf("%w: the VM does not implement replicate.WriteGuard (its own writes into guest memory must be guarded)", ErrLazyUnsupported)
	}
	fd, err := uffd.Open(uffd.FeatureWPUnpopulated)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLazyUnsupported, err)
	}
	l := &lazyCapture{p: p, mode: mode, fd: fd, vm: wg, callNs: lazyCallGuess, pageNs: lazyPageGuess, faultStall: lazyFaultGuess}
	if mode == CaptureAuto {
		l.hot = make([]atomic.Uint64, (p.lay.shape.Pages()+63)/64)
	}
	for _, r := range p.lay.regions {
		a := uffd.Addr(r.host)
		if err := fd.Register(a, r.size); err != nil {
			fd.Close()
			return nil, fmt.Errorf("%w: %w", ErrLazyUnsupported, err)
		}
		l.base = append(l.base, a)
	}
	if l.h, err = fd.StartHandler(l.resolve); err != nil {
		fd.Close()
		return nil, fmt.Errorf("%w: %w", ErrLazyUnsupported, err)
	}
	if mode == CaptureAuto {
		if _, ok := p.cfg.VM.(VCPUThreads); ok {
			l.budget = newGuestBudget(p.cfg.Interval, p.cfg.CaptureCalibration)
		} else {
			p.cfg.Log.Warn("capture auto: the VM does not name its vCPU threads (replicate.VCPUThreads), so auto cannot measure what lazy capture costs the guest outside the pause; it weighs the pause alone")
		}
	}
	wg.SetWriteGuard(l.guard)
	return l, nil
}

// close removes the guard and closes the userfaultfd: every page is
// unprotected and every blocked writer woken.
func (l *lazyCapture) close() {
	if l.closed.Swap(true) {
		return
	}
	l.vm.SetWriteGuard(nil)
	l.fd.Close()
	l.h.Stop()
}

// markHot records that the page at gpa was written while it was copied
// behind the guest (auto only).
func (l *lazyCapture) markHot(gpa uint64) {
	if l.hot == nil {
		return
	}
	if i, ok := l.p.lay.index(gpa &^ (PageSize - 1)); ok {
		l.hot[i/64].Or(1 << (i % 64))
	}
}

// isHot reports whether markHot recorded the page at gpa, which is in r.
func (l *lazyCapture) isHot(r *layoutRegion, gpa uint64) bool {
	i := r.first + (gpa-r.gpa)/PageSize
	return l.hot[i/64].Load()&(1<<(i%64)) != 0
}

// hostAddr is the host address of the page at gpa.
func (l *lazyCapture) hostAddr(gpa uint64) uint64 {
	for i := range l.p.lay.regions {
		r := &l.p.lay.regions[i]
		if gpa >= r.gpa && gpa-r.gpa < r.size {
			return l.base[i] + gpa - r.gpa
		}
	}
	return 0
}

// gpaOf is the guest-physical address of host address a, if it is guest memory.
func (l *lazyCapture) gpaOf(a uint64) (uint64, bool) {
	for i, b := range l.base {
		r := &l.p.lay.regions[i]
		if a >= b && a-b < r.size {
			return r.gpa + (a-b)&^(PageSize-1), true
		}
	}
	return 0, false
}

// index is the job index of the page at gpa, or -1.
func (j *lazyJob) index(gpa uint64) int {
	g := j.job.gpas
	k := sort.Search(len(g), func(i int) bool { return g[i] >= gpa })
	if k < len(g) && k < len(j.state) && g[k] == gpa {
		return k
	}
	return -1
}

// finished reports whether the copy behind the guest is over (every page
// copied and unprotected).
func (j *lazyJob) finished() bool {
	select {
	case <-j.done:
		return true
	default:
		return false
	}
}

// take copies page k into staging unless someone else claimed it, and
// returns once it is copied; it reports whether this call copied it.
func (j *lazyJob) take(k int) bool {
	s := &j.state[k]
	if s.CompareAndSwap(pageProtected, pageCopying) {
		p := j.l.p
		copy(p.stage.page(j.job.start, uint64(k)), p.lay.page(j.job.gpas[k]))
		s.Store(pageCopied)
		return true
	}
	for spins := 0; s.Load() == pageCopying; spins++ {
		if spins < 100 {
			runtime.Gosched()
		} else {
			time.Sleep(time.Microsecond)
		}
	}
	return false
}

// resolve handles a write fault: copy the page first if it is the current
// epoch's and not copied yet, then unprotect it, which wakes the writer. A
// fault on a page that is no epoch's (protected no more) is unprotected too.
func (l *lazyCapture) resolve(f uffd.Fault) error {
	page := f.Addr &^ (PageSize - 1)
	if gpa, ok := l.gpaOf(page); ok {
		if j := l.cur.Load(); j != nil && !j.finished() {
			if k := j.index(gpa); k >= 0 {
				t := time.Now()
				if j.take(k) {
					err := l.unprotectFaulted(page)
					j.faults.Add(1)
					j.faultNs.Add(int64(time.Since(t)))
					l.markHot(gpa)
					return err
				}
			}
		}
	}
	return l.unprotectFaulted(page)
}

// unprotectFaulted unprotects a faulted page and wakes its writer; on an
// error it closes the userfaultfd, which unprotects everything: the writer
// runs on, and the epoch's copier fails.
func (l *lazyCapture) unprotectFaulted(page uint64) error {
	if err := l.fd.Unprotect(page, PageSize, true); err != nil {
		l.p.cfg.Log.Error("lazy capture: resolve a write fault", "addr", fmt.Sprintf("%#x", page), "err", err)
		l.close()
		return err
	}
	return nil
}

// guard is the WriteGuard: before the VMM writes [gpa, gpa+n), the pages of
// the epoch being copied are copied and unprotected.
func (l *lazyCapture) guard(gpa, n uint64) {
	j := l.cur.Load()
	if j == nil || n == 0 {
		return
	}
	if j.finished() {
		return // copied and unprotected
	}
	for pg := gpa &^ (PageSize - 1); pg < gpa+n; pg += PageSize {
		k := j.index(pg)
		if k < 0 || j.state[k].Load() == pageEager {
			continue
		}
		if j.take(k) {
			j.guarded.Add(1)
			l.markHot(pg)
		}
		if err := l.fd.Unprotect(l.hostAddr(pg), PageSize, true); err != nil && !l.closed.Load() {
			l.p.cfg.Log.Error("lazy capture: unprotect before a VMM write", "gpa", fmt.Sprintf("%#x", pg), "err", err)
			l.close()
		}
	}
}

// capture is the pause's part of a lazy or auto checkpoint, for a job with
// staging: it copies what goes eagerly, protects the rest, and returns the
// job for the copier to finish after the resume. When the cost model sends
// every run eager it does nothing and returns nil: the caller copies the
// epoch as an eager one (with the copy helpers).
func (l *lazyCapture) capture(job *epochJob, st *EpochStats, m *cpuclock.Meter) (*lazyJob, error) {
	auto := l.mode == CaptureAuto
	if auto && l.quiet >= lazyQuietEpochs && job.epoch%lazyProbeEvery > 1 {
		// The model has wanted no page lazy for a while (scattered pages):
		// no bookkeeping in the pause until the next probe looks again.
		if l.budget != nil {
			st.LazyCap = l.budget.allowed()
		}
		return nil, nil
	}
	n := len(job.gpas)
	j := &lazyJob{l: l, job: job, state: make([]atomic.Uint32, n), done: make(chan struct{})}
	// Runs of contiguous pages in one region; with auto, a page the guest
	// wrote while it was being copied behind (hot) breaks a run and goes
	// eager: protecting it again would most likely cost the guest a fault.
	if auto && job.epoch%lazyProbeEvery == 0 {
		for i := range l.hot {
			l.hot[i].Store(0) // learn again
		}
	}
	runs, hotRun := l.runs[:0], l.hotRun[:0]
	for k := 0; k < n; {
		r := l.p.lay.find(job.gpas[k])
		end := r.gpa + r.size
		h := auto && l.isHot(r, job.gpas[k])
		e := k + 1
		for e < n && job.gpas[e] == job.gpas[e-1]+PageSize && job.gpas[e] < end && (auto && l.isHot(r, job.gpas[e])) == h {
			e++
		}
		runs = append(runs, [2]int{k, e})
		hotRun = append(hotRun, h)
		k = e
	}
	l.runs, l.hotRun = runs, hotRun
	l.mu.Lock()
	callNs, pageNs, faultCost := l.callNs, l.pageNs, l.faultRate*l.faultStall
	l.mu.Unlock()
	copyNs := l.p.copier.perPage // a large copy's wall time per page, helpers and all
	if copyNs == 0 {
		copyNs = float64(l.p.copier.estimate(1).Nanoseconds())
	}
	longest := -1
	for i, r := range runs {
		if longest < 0 || r[1]-r[0] > runs[longest][1]-runs[longest][0] {
			longest = i
		}
	}
	// Every lazyProbeEvery epochs, auto protects the longest run even when
	// the model says copy, so the protect cost stays measured on this host;
	// the other epochs the model alone decides.
	probe := job.epoch%lazyProbeEvery == 1
	lazy := l.lazy[:0]
	for i, r := range runs {
		lazy = append(lazy, false)
		m := float64(r[1] - r[0])
		switch l.mode {
		case CaptureLazy:
			lazy[i] = true
		case CaptureAuto:
			lazy[i] = !hotRun[i] && callNs+m*(pageNs+faultCost) < m*copyNs ||
				(probe && i == longest && !hotRun[i] && r[1]-r[0] >= lazyProbeMin) // keep the protect cost measured
		}
	}
	l.lazy = lazy
	if auto {
		l.quiet++
		for _, z := range lazy {
			if z {
				l.quiet = 0
				break
			}
		}
	}
	if l.budget != nil {
		st.LazyCap = l.budget.allowed()
		l.wanted = l.capRuns(st.LazyCap)
		runs, lazy = l.runs, l.lazy
	}
	eager := l.eager[:0]
	for i, r := range runs {
		if lazy[i] {
			j.runs = append(j.runs, r)
			j.pages += r[1] - r[0]
			continue
		}
		for k := r[0]; k < r[1]; k++ {
			eager = append(eager, k)
			j.state[k].Store(pageEager)
		}
	}
	l.eager = eager
	if j.pages == 0 {
		return nil, nil // all eager: the caller's copier copies it, with its helpers
	}
	t0 := time.Now()
	if len(eager) > 0 {
		st.CopyThreads = l.p.copier.copyIdx(job, eager, m)
	}
	st.Copy = time.Since(t0)
	l.cur.Store(j) // before protecting: a VMM write meanwhile copies first
	t0 = time.Now()
	var callSum, pageSum float64
	var calls, sampled int
	for _, r := range j.runs {
		m := r[1] - r[0]
		t := time.Now()
		if err := l.fd.WriteProtect(l.hostAddr(job.gpas[r[0]]), uint64(m)*PageSize); err != nil {
			l.close()
			return nil, fmt.Errorf("lazy capture: write-protect %d pages at %#x: %w", m, job.gpas[r[0]], err)
		}
		ns := float64(time.Since(t).Nanoseconds())
		if m <= 2 {
			callSum += ns
			calls++
		} else if m >= lazyPerPageMinSample {
			pageSum += (ns - callNs) / float64(m)
			sampled++
		}
	}
	st.Protect = time.Since(t0)
	st.LazyPages = j.pages
	l.mu.Lock()
	if calls > 0 {
		l.callNs = avg(l.callNs, callSum/float64(calls))
	}
	if sampled > 0 {
		l.pageNs = max(0, avg(l.pageNs, pageSum/float64(sampled)))
	}
	l.mu.Unlock()
	return j, nil
}

// capRuns keeps at most limit of the pages of capture's lazy runs lazy:
// the longest runs first (their protect costs least per page), the last one
// taken split where the limit falls, the rest copied eagerly. The runs stay
// in address order. It returns the pages the runs held before.
func (l *lazyCapture) capRuns(limit int) (wanted int) {
	order := l.order[:0]
	for i, r := range l.runs {
		if l.lazy[i] {
			wanted += r[1] - r[0]
			order = append(order, i)
		}
	}
	l.order = order
	if wanted <= limit {
		return wanted
	}
	sort.Slice(order, func(a, b int) bool {
		ra, rb := l.runs[order[a]], l.runs[order[b]]
		return ra[1]-ra[0] > rb[1]-rb[0]
	})
	keep := l.keep[:0]
	for range l.runs {
		keep = append(keep, 0)
	}
	left := limit
	for _, i := range order {
		m := l.runs[i][1] - l.runs[i][0]
		if m > left {
			m = left
			if m < lazyProbeMin {
				m = 0 // too short to be worth a call of its own
			}
		}
		keep[i] = m
		left -= m
	}
	l.keep = keep
	runs, lazy := l.splitRuns[:0], l.splitLazy[:0]
	for i, r := range l.runs {
		switch k := keep[i]; {
		case !l.lazy[i] || k == r[1]-r[0]:
			runs, lazy = append(runs, r), append(lazy, l.lazy[i])
		case k == 0:
			runs, lazy = append(runs, r), append(lazy, false)
		default:
			runs, lazy = append(runs, [2]int{r[0], r[0] + k}, [2]int{r[0] + k, r[1]}), append(lazy, true, false)
		}
	}
	// Swap the scratch slices, so that the next epoch reuses both.
	l.splitRuns, l.splitLazy, l.runs, l.lazy = l.runs, l.lazy, runs, lazy
	return wanted
}

// behind copies a lazy job's protected pages after the resume, a chunk at a
// time, unprotecting each chunk once it is copied; then it feeds the cost
// model and closes done.
func (j *lazyJob) behind(st *EpochStats) {
	l := j.l
	t0 := time.Now()
	defer func() {
		st.Behind = time.Since(t0)
		faults := j.faults.Load()
		st.Faults = int(faults)
		st.GuardedPages = int(j.guarded.Load())
		st.FaultTime = time.Duration(j.faultNs.Load())
		l.mu.Lock()
		l.faultRate = avg(l.faultRate, float64(faults+j.guarded.Load())/float64(j.pages))
		if faults > 0 {
			l.faultStall = avg(l.faultStall, float64(st.FaultTime.Nanoseconds())/float64(faults))
		}
		l.mu.Unlock()
		close(j.done)
	}()
	for _, r := range j.runs {
		for from := r[0]; from < r[1]; from += lazyChunk {
			to := min(from+lazyChunk, r[1])
			for k := from; k < to; k++ {
				j.take(k)
			}
			if l.closed.Load() {
				j.err = errors.New("lazy capture: the userfaultfd was closed while the epoch was copied")
				return
			}
			if err := l.fd.Unprotect(l.hostAddr(j.job.gpas[from]), uint64(to-from)*PageSize, true); err != nil {
				l.close()
				j.err = fmt.Errorf("lazy capture: unprotect %d pages at %#x: %w", to-from, j.job.gpas[from], err)
				return
			}
		}
	}
}
