package replicate

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/repagent/repagent/internal/cpuclock"
	"github.com/repagent/repagent/internal/faultpoint"
)

// The pause: stop the vCPUs, harvest, save, open the next epoch on the gates,
// copy the dirty pages into staging, resume. Everything here runs with the
// guest stopped, so it is kept to what must be done then; compression,
// checksums and sending come after (sender.go).

// measureGuest samples the vCPU threads' host time after a resume, for the
// stats and auto's budget: the run it covers ended with this pause, whose
// harvest holds the pages the run dirtied.
func (p *Primary) measureGuest(st *EpochStats, now time.Time) {
	var wanted int
	if p.lazy != nil {
		wanted, p.lazy.wanted = p.lazy.wanted, 0 // this pause's, read once
	}
	if p.vclock == nil {
		return
	}
	d, ok := p.vclock.sample()
	if !ok {
		return
	}
	st.VCPUHost = d
	l := p.lazy
	if l == nil || l.budget == nil {
		return
	}
	r := guestRun{host: d, dirty: st.DirtyPages, lazy: st.LazyPages, wanted: wanted}
	if gp, ok := p.cfg.VM.(GuestProgress); ok {
		n := gp.GuestProgress()
		r.progress, r.hasProgress = n-p.lastProgress, p.progressRead
		p.lastProgress, p.progressRead = n, true
	}
	// The pause the lazy pages saved is measured with the run that
	// follows it; the faults of the previous epoch's copy (finished, since
	// this pause waited for it) with the run they stalled.
	r.saved = time.Duration(p.copier.perPage*float64(st.LazyPages)) - st.Protect
	if j := p.lastJob; j != nil && j.lazy != nil && j.lazy.finished() {
		r.stall = j.stats.FaultTime
	}
	l.budget.observe(r, now)
}

// checkpoint is one pause. The epoch then goes to the sender.
func (p *Primary) checkpoint(epoch uint64, st *EpochStats) (err error) {
	vm := p.cfg.VM
	ready := make(chan struct{})
	defer close(ready)
	// The compression workers yield while the VM is paused: on a small host
	// they would otherwise hold every CPU the pause needs.
	p.hold.set(true)
	defer p.hold.set(false)
	job := &epochJob{epoch: epoch, kind: kindCheckpoint, ready: ready, sent: make(chan struct{}), stats: st}
	// The pause's CPU time: what it does between its waits (for the vCPUs
	// to stop, for room in staging, for copy helpers).
	var m cpuclock.Meter
	defer func() { m.Stop(); job.cpu.Add(int64(m.Total())) }()
	st.Start = time.Now()
	st.LazyCap = -1
	if err := vm.Pause(); err != nil {
		<-p.inflight
		return vmFailure{fmt.Errorf("pause VM: %w", err)}
	}
	paused := true
	defer func() {
		if paused {
			if rerr := vm.Resume(); rerr != nil && err == nil {
				err = vmFailure{fmt.Errorf("resume VM: %w", rerr)}
			}
		}
	}()
	m.Start()
	t := time.Now()
	st.Kick = t.Sub(st.Start)
	if _, err := p.src.Harvest(p.set); err != nil {
		<-p.inflight
		return fmt.Errorf("harvest dirty pages: %w", err)
	}
	job.gpas = p.gpasOf(p.gpaList())
	st.Harvest, t = lap(t)
	if job.state, err = vm.Save(); err != nil {
		<-p.inflight
		return vmFailure{fmt.Errorf("save VM state: %w", err)}
	}
	if p.cfg.Note != nil {
		st.Note = p.cfg.Note() // guest state, beside the machine state
	}
	st.Save, t = lap(t)
	if p.cfg.AuditEvery > 0 && epoch%p.cfg.AuditEvery == 0 {
		job.auditCRCs = p.auditTable()
		job.audit, job.audited = digestSlots(p.lay.hosts(), job.auditCRCs), true
		st.Audit, t = lap(t)
	}
	p.hook(faultpoint.Pause, epoch)
	// Open the next epoch before the pages are staged: an oversized epoch is
	// sent during the pause, and its disk writes can be taken only once the
	// next epoch is open. The vCPUs and devices are stopped, so no output
	// falls between.
	if err := p.gateCall(p.gates, func(g OutputGate) error { return g.Open(epoch + 1) }); err != nil {
		<-p.inflight
		return err
	}
	st.Gates, t = lap(t)
	audited := job.auditCRCs != nil // read before the sender owns the job
	n := uint64(len(job.gpas))
	if n <= p.stage.size {
		// Wait, paused, for room: the link is slower than the guest dirties.
		if !p.stage.has(n) {
			p.hold.set(false) // the sender needs the workers to make room
			m.Stop()
			if !p.stage.wait(n, p.sess.done) {
				<-p.inflight
				return p.sess.cause()
			}
			m.Start()
		}
		st.Stall, t = lap(t)
		job.start = p.stage.alloc(n)
		job.staged = true
		if p.lazy != nil {
			if job.lazy, err = p.lazy.capture(job, st, &m); err != nil {
				<-p.inflight
				return err
			}
		}
		if job.lazy == nil {
			st.CopyThreads = p.copier.copy(job, &m)
		}
	} else {
		// Stop-and-copy: send from guest memory while paused.
		st.Oversize = true
		p.hold.set(false)
		job.live, job.done = true, make(chan struct{})
	}
	p.set.Clear()
	if job.live {
		m.Stop() // the sender's CPU time is its own
		p.jobs <- job
		select {
		case <-job.done:
		case <-p.sess.done:
			return p.sess.cause()
		}
	}
	st.DirtyPages = int(n)
	if job.lazy != nil {
		t = time.Now() // capture set Copy and Protect
	} else {
		st.Copy, t = lap(t)
	}
	paused = false
	if epoch != p.finalEpoch.Load() { // a handover's final pause leaves the VM stopped
		if err := vm.Resume(); err != nil {
			return vmFailure{fmt.Errorf("resume VM: %w", err)}
		}
	}
	st.Resume, t = lap(t)
	st.Pause = t.Sub(st.Start)
	if job.lazy != nil {
		go job.lazy.behind(st) // first: every µs before it is the guest's to fault in
	}
	p.measureGuest(st, t) // before the sender owns st (the copier sets other fields)
	if !job.live {
		p.jobs <- job
	}
	p.lastJob = job
	if audited {
		p.spareAuditTable() // for the next audit's pause, allocated outside this one
	}
	return nil
}

func lap(t time.Time) (time.Duration, time.Time) {
	now := time.Now()
	return now.Sub(t), now
}

// copier copies a checkpoint's dirty pages into staging during its pause,
// on the pausing goroutine and on helper goroutines that join if they get
// a CPU in time. The vCPUs are stopped, so their CPUs are free, and one
// goroutine may not use all of the memory bandwidth; but whether a helper
// finds a free CPU soon depends on the host (with the backup in the same
// process, its goroutines often hold the other one, and a helper can wake
// milliseconds late). So the work is not divided up front: the pages go in
// chunks of copyChunk, which every copier claims in turn from a shared
// counter. The pausing goroutine copies from the first chunk on and never
// waits for a helper to start; at the end it waits only for the chunks a
// helper has claimed and is still copying, at most one per helper. A
// helper that wakes after the last claim finds nothing to do. Copies under
// copyMinPages are not offered to helpers: waking one costs more than it
// can save.
type copier struct {
	p       *Primary
	helpers int
	tasks   chan *copyWork
	// perPage is the moving average, in ns, of a large copy's wall time
	// per page, and single the same for copies done by the pausing
	// goroutine alone (0: not measured yet), for the sync's estimate. Only
	// the pausing goroutine (and calibrateCopy, before it runs) uses them.
	perPage, single float64
}

// copyWork is one pause's copy, shared by its copiers.
type copyWork struct {
	job    *epochJob
	idx    []int // the job's pages to copy, by index; nil: all of them
	n      int
	next   atomic.Int64 // the next chunk to claim
	copied atomic.Int64 // pages copied
	joined atomic.Int32 // helpers that copied at least one chunk
}

// MaxCopyThreads is the most goroutines Config.CopyThreads may ask for.
const MaxCopyThreads = copyMaxHelpers + 1

const (
	copyPerPageGuess = 1000  // ns, until measured
	copyMinPages     = 1024  // pages: smaller copies are not offered to helpers
	copyChunk        = 64    // pages a copier claims at a time
	copyAvgWeight    = 0.125 // weight of a new sample in the averages
	copyMaxHelpers   = 3     // beyond the pausing goroutine
)

// newCopier starts helpers helper goroutines (0: copy on the pausing
// goroutine only).
func newCopier(p *Primary, helpers int) *copier {
	c := &copier{p: p, helpers: helpers, tasks: make(chan *copyWork, helpers)}
	for range helpers {
		go c.helper()
	}
	return c
}

// stop ends the helpers.
func (c *copier) stop() { close(c.tasks) }

func (c *copier) helper() {
	var m cpuclock.Meter
	for w := range c.tasks {
		m.Start()
		if c.claim(w) > 0 {
			w.joined.Add(1)
		}
		w.job.cpu.Add(int64(m.Stop()))
	}
}

// claim copies chunks of w until none is left and returns how many pages
// it copied.
func (c *copier) claim(w *copyWork) int {
	done := 0
	for {
		from := int(w.next.Add(1)-1) * copyChunk
		if from >= w.n {
			return done
		}
		to := min(from+copyChunk, w.n)
		if w.idx != nil {
			c.copyPages(w.job, w.idx[from:to])
		} else {
			c.copyRange(w.job, from, to)
		}
		w.copied.Add(int64(to - from))
		done += to - from
	}
}

// copy copies job's pages into its staging and returns how many goroutines
// took part. m, the pause's meter, is stopped while the pause waits for a
// helper's last chunk.
func (c *copier) copy(job *epochJob, m *cpuclock.Meter) int { return c.copyIdx(job, nil, m) }

// copyIdx is copy for the job's pages idx (nil: all of them).
func (c *copier) copyIdx(job *epochJob, idx []int, m *cpuclock.Meter) int {
	n := len(job.gpas)
	if idx != nil {
		n = len(idx)
	}
	w := &copyWork{job: job, idx: idx, n: n}
	offered := 0
	if n >= copyMinPages {
		for range c.helpers {
			select {
			case c.tasks <- w:
				offered++
			default: // a helper still busy with an earlier pause's leftovers
			}
		}
	}
	t0 := time.Now()
	c.claim(w)
	if w.copied.Load() < int64(n) {
		// A helper is finishing its last chunk (tens of µs), unless the
		// host took its CPU away meanwhile.
		m.Stop()
		for t := time.Now(); w.copied.Load() < int64(n); {
			if time.Since(t) < 50*time.Microsecond {
				runtime.Gosched()
			} else {
				time.Sleep(20 * time.Microsecond)
			}
		}
		m.Start()
	}
	k := 1 + int(w.joined.Load())
	if n >= copyMinPages {
		ns := float64(time.Since(t0).Nanoseconds()) / float64(n)
		c.perPage = avg(c.perPage, ns)
		if k == 1 {
			c.single = avg(c.single, ns)
		}
	}
	return k
}

func avg(old, sample float64) float64 {
	if old == 0 {
		return sample
	}
	return old + copyAvgWeight*(sample-old)
}

// estimate is how long copying n pages would take, from the measured costs
// (copyPerPageGuess before any).
func (c *copier) estimate(n int) time.Duration {
	ns := c.perPage
	if n < copyMinPages || ns == 0 {
		ns = c.single
	}
	if ns == 0 {
		ns = copyPerPageGuess
	}
	return time.Duration(float64(n) * ns)
}

// copyPages copies the job's pages idx from guest memory into staging.
func (c *copier) copyPages(job *epochJob, idx []int) {
	p := c.p
	for _, k := range idx {
		copy(p.stage.page(job.start, uint64(k)), p.lay.page(job.gpas[k]))
	}
}

// copyRange copies pages [from, to) of job from guest memory into staging.
func (c *copier) copyRange(job *epochJob, from, to int) {
	p := c.p
	for k := from; k < to; k++ {
		copy(p.stage.page(job.start, uint64(k)), p.lay.page(job.gpas[k]))
	}
}
