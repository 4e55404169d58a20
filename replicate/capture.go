package replicate

import (
	"fmt"
	"sync"
	"sync/atomic"
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
// on the pausing goroutine and, when the epoch is large enough to pay for
// waking them, on helper goroutines too. The
// vCPUs are stopped, so their CPUs are free, and one goroutine cannot use
// all of the memory bandwidth: on this project's hosts a scattered 4 KiB
// copy out of DRAM costs about 1.0-1.3 µs on one goroutine and 0.7 µs each
// on two.
//
// Whether helpers pay is decided from costs measured as the engine runs: a
// moving average of the copy's time per page, and of the time from handing
// a helper its share to the helper starting it.
type copier struct {
	p       *Primary
	helpers int
	tasks   chan copyTask
	wg      sync.WaitGroup
	// Moving averages, in ns: a page's copy on the pausing goroutine, and a
	// helper's wake-up. Only the pausing goroutine updates perPage; helpers
	// update wake.
	perPage float64
	wake    atomic.Int64
}

type copyTask struct {
	job      *epochJob
	from, to int
	sent     time.Time
}

// MaxCopyThreads is the most goroutines Config.CopyThreads may ask for.
const MaxCopyThreads = copyMaxHelpers + 1

// Initial estimates, replaced by measurements within a few epochs.
const (
	copyPerPageGuess = 1000             // ns
	copyWakeGuess    = 50 * 1000        // ns
	copyMinShare     = 64               // pages: no helper gets fewer
	copyAvgWeight    = 0.125            // weight of a new sample in the averages
	copyMaxHelpers   = 3                // beyond the pausing goroutine
	copyWakeCap      = 10 * 1000 * 1000 // ns: a wake-up sample longer than this is a descheduled thread, not the cost
)

// newCopier starts helpers helper goroutines (0: copy on the pausing
// goroutine only).
func newCopier(p *Primary, helpers int) *copier {
	c := &copier{p: p, helpers: helpers, tasks: make(chan copyTask, helpers), perPage: copyPerPageGuess}
	c.wake.Store(copyWakeGuess)
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
		w := time.Since(t.sent)
		m.Start()
		c.copyRange(t.job, t.from, t.to)
		t.job.cpu.Add(int64(m.Stop()))
		if ns := min(w.Nanoseconds(), copyWakeCap); ns > 0 {
			old := c.wake.Load()
			c.wake.Store(old + int64(copyAvgWeight*float64(ns-old)))
		}
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
		c.tasks <- copyTask{job: job, from: h * share, to: min(n, (h+1)*share), sent: t0}
	}
	mine := min(n, share)
	s := time.Now()
	c.copyRange(job, 0, mine)
	if mine > 0 {
		ns := float64(time.Since(s).Nanoseconds()) / float64(mine)
		c.perPage += copyAvgWeight * (ns - c.perPage)
	}
	if k > 1 {
		m.Stop()
		c.wg.Wait()
		m.Start()
	}
	return k
}

// sharers is how many goroutines should copy n pages: helpers join while
// the time a share saves exceeds what waking a helper costs.
func (c *copier) sharers(n int) int {
	k := 1
	wake := float64(c.wake.Load())
	for k <= c.helpers && n/(k+1) >= copyMinShare {
		// With k+1 sharers the pausing goroutine copies n/(k+1) pages and
		// waits for the last helper to wake and copy its share.
		now := float64(n) / float64(k) * c.perPage
		then := max(float64(n)/float64(k+1)*c.perPage, wake+float64(n)/float64(k+1)*c.perPage)
		if then >= now*0.9 {
			break
		}
		k++
	}
	return k
}

// copyRange copies pages [from, to) of job from guest memory into staging.
func (c *copier) copyRange(job *epochJob, from, to int) {
	p := c.p
	for k := from; k < to; k++ {
		copy(p.stage.page(job.start, uint64(k)), p.lay.page(job.gpas[k]))
	}
}
