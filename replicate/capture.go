package replicate

import (
	"fmt"
	"sync"
	"time"

	"github.com/repagent/repagent/internal/cpuclock"
)

// The pause: stop the vCPUs, harvest, save, open the next epoch on the gates,
// copy the dirty pages into staging, resume. Everything here runs with the
// guest stopped, so it is kept to what must be done then; compression,
// checksums and sending come after (sender.go).

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
	p.hook(HookPause, epoch)
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
			if !p.stage.wait(n, p.lost) {
				<-p.inflight
				return p.lostErr
			}
			m.Start()
		}
		st.Stall, t = lap(t)
		job.start = p.stage.alloc(n)
		job.staged = true
		st.CopyThreads = p.copier.copy(job, &m)
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
		case <-p.lost:
			return p.lostErr
		}
	}
	st.DirtyPages = int(n)
	st.Copy, t = lap(t)
	paused = false
	if err := vm.Resume(); err != nil {
		return vmFailure{fmt.Errorf("resume VM: %w", err)}
	}
	st.Resume, t = lap(t)
	st.Pause = t.Sub(st.Start)
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

// copier copies a checkpoint's dirty pages into staging during its pause:
// on the pausing goroutine and, when that measurably pays, on helper
// goroutines too. The vCPUs are stopped, so their CPUs are free, and one
// goroutine may not use all of the memory bandwidth; but whether a second
// goroutine finds a free CPU depends on the host (with the backup in the
// same process, its goroutines often hold the other CPU), so the copier
// does not assume it. It keeps, for each number of sharers k, a moving
// average of the whole copy's wall time per page with k, and uses the
// cheapest; every copyExplore-th large copy it tries another k, so the
// averages follow the host. Epochs under copyMinPages pages are copied by
// the pausing goroutine alone: waking a helper costs tens of µs.
type copier struct {
	p       *Primary
	helpers int
	tasks   chan copyTask
	wg      sync.WaitGroup
	// perPage[k-1] is the moving average, in ns, of a copy's wall time per
	// page with k sharers (0: not measured yet). Only the pausing goroutine
	// (and calibrateCopy, before it runs) uses it.
	perPage [MaxCopyThreads]float64
	copies  int // large copies so far
}

type copyTask struct {
	job      *epochJob
	from, to int
}

// MaxCopyThreads is the most goroutines Config.CopyThreads may ask for.
const MaxCopyThreads = copyMaxHelpers + 1

const (
	copyPerPageGuess = 1000  // ns, until measured
	copyMinPages     = 1024  // pages: smaller copies use no helper
	copyAvgWeight    = 0.125 // weight of a new sample in the averages
	copyExplore      = 16    // every so many large copies, try another sharer count
	copyMaxHelpers   = 3     // beyond the pausing goroutine
)

// newCopier starts helpers helper goroutines (0: copy on the pausing
// goroutine only).
func newCopier(p *Primary, helpers int) *copier {
	c := &copier{p: p, helpers: helpers, tasks: make(chan copyTask, helpers)}
	for range helpers {
		go c.helper()
	}
	return c
}

// stop ends the helpers.
func (c *copier) stop() { close(c.tasks) }

func (c *copier) helper() {
	var m cpuclock.Meter
	for t := range c.tasks {
		m.Start()
		c.copyRange(t.job, t.from, t.to)
		t.job.cpu.Add(int64(m.Stop()))
		c.wg.Done()
	}
}

// copy copies job's pages into its staging and returns how many goroutines
// did it. m, the pause's meter, is stopped while the pause waits for helpers.
func (c *copier) copy(job *epochJob, m *cpuclock.Meter) int {
	n := len(job.gpas)
	k := c.sharers(n)
	share := (n + k - 1) / k
	t0 := time.Now()
	for h := 1; h < k; h++ {
		c.wg.Add(1)
		c.tasks <- copyTask{job: job, from: h * share, to: min(n, (h+1)*share)}
	}
	c.copyRange(job, 0, min(n, share))
	if k > 1 {
		m.Stop()
		c.wg.Wait()
		m.Start()
	}
	if n >= copyMinPages {
		c.record(k, float64(time.Since(t0).Nanoseconds())/float64(n))
	}
	return k
}

func (c *copier) record(k int, ns float64) {
	if avg := &c.perPage[k-1]; *avg == 0 {
		*avg = ns
	} else {
		*avg += copyAvgWeight * (ns - *avg)
	}
}

// sharers is how many goroutines should copy n pages: 1 for a small copy,
// else the count whose copies have been cheapest per page, trying each
// count not measured yet first and another one every copyExplore copies.
func (c *copier) sharers(n int) int {
	kmax := min(c.helpers+1, n/copyMinShare)
	if n < copyMinPages || kmax <= 1 {
		return 1
	}
	c.copies++
	best := 1
	for k := 1; k <= kmax; k++ {
		switch {
		case c.perPage[k-1] == 0:
			return k
		case c.perPage[k-1] < c.perPage[best-1]:
			best = k
		}
	}
	if c.copies%copyExplore == 0 {
		return best%kmax + 1 // the next count round the ring
	}
	return best
}

// estimate is how long copying n pages would take, from the measured costs
// (copyPerPageGuess before any).
func (c *copier) estimate(n int) time.Duration {
	ns := 0.0
	if n >= copyMinPages {
		for k := 1; k <= min(c.helpers+1, n/copyMinShare); k++ {
			if x := c.perPage[k-1]; x > 0 && (ns == 0 || x < ns) {
				ns = x
			}
		}
	}
	if ns == 0 {
		ns = c.perPage[0]
	}
	if ns == 0 {
		ns = copyPerPageGuess
	}
	return time.Duration(float64(n) * ns)
}

// copyMinShare is the fewest pages a helper is given.
const copyMinShare = 64

// copyRange copies pages [from, to) of job from guest memory into staging.
func (c *copier) copyRange(job *epochJob, from, to int) {
	p := c.p
	for k := from; k < to; k++ {
		copy(p.stage.page(job.start, uint64(k)), p.lay.page(job.gpas[k]))
	}
}
