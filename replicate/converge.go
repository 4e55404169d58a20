package replicate

import (
	"sync"
	"time"
)

// The end of the initial sync. A guest that dirties memory about as fast as
// the link carries it never converges: every round leaves about as much as
// the one before. The sync then ends with the first checkpoint copying what
// is left in its pause (stop-and-copy), which is fine as long as that pause
// is short; so the engine estimates the pause from costs it measured on
// this host and, when it would exceed Config.SyncPause, throttles the vCPUs
// for the next rounds, as QEMU's auto-converge does: it holds them paused a
// share of every throttlePeriod, starting at throttleFirst and growing by
// throttleStep a round, at most maxThrottle, until what is left fits.

const (
	throttlePeriod = 20 * time.Millisecond
	throttleFirst  = 0.2
	throttleStep   = 0.1
	maxThrottle    = 0.95
	// calibratePages are copied once before the sync to learn the pause's
	// copy cost per page on this host (about 1 ms).
	calibratePages = 1024
	// DefaultSyncPause is Config.SyncPause's default (QEMU's default
	// downtime limit).
	DefaultSyncPause = 300 * time.Millisecond
)

// throttler holds a VM's vCPUs paused a share of the time while the sync
// runs. The engine's own Pause and Resume calls come later, from the epoch
// loop, once the throttler is stopped: the VM never sees two callers.
type throttler struct {
	vm    VM
	mu    sync.Mutex
	share float64
	held  time.Duration // time held paused so far
	err   error         // a failed Pause or Resume ends the throttling
	stopc chan struct{}
	done  chan struct{}
}

func newThrottler(vm VM) *throttler {
	t := &throttler{vm: vm, stopc: make(chan struct{}), done: make(chan struct{})}
	go t.run()
	return t
}

func (t *throttler) set(share float64) {
	t.mu.Lock()
	t.share = share
	t.mu.Unlock()
}

func (t *throttler) get() (share float64, held time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.share, t.held
}

// stop ends the throttling with the vCPUs running, and returns the error
// that ended it early, if any.
func (t *throttler) stop() error {
	if t == nil {
		return nil
	}
	close(t.stopc)
	<-t.done
	return t.err
}

func (t *throttler) run() {
	defer close(t.done)
	sleep := func(d time.Duration) bool {
		tm := time.NewTimer(d)
		defer tm.Stop()
		select {
		case <-tm.C:
			return true
		case <-t.stopc:
			return false
		}
	}
	for {
		share, _ := t.get()
		on := time.Duration(share * float64(throttlePeriod))
		if on <= 0 {
			if !sleep(throttlePeriod) {
				return
			}
			continue
		}
		t0 := time.Now()
		if err := t.vm.Pause(); err != nil {
			t.err = err
			return
		}
		more := sleep(on)
		err := t.vm.Resume()
		t.mu.Lock()
		t.held += time.Since(t0)
		t.mu.Unlock()
		if err != nil {
			t.err = err
			return
		}
		if !more || !sleep(throttlePeriod-on) {
			return
		}
	}
}

// calibrateCopy measures the pause's copy on this host, once, before the
// first estimate: up to calibratePages of the dirty set (pages the guest
// wrote, so resident: a hole would measure the kernel allocating it) copied
// into staging pages already touched (a first copy touches them), which
// seeds the copier's cost per page; the copies of real pauses refine it.
func (p *Primary) calibrateCopy() {
	dirty := uint64(p.set.Count())
	n := min(uint64(calibratePages), dirty/2, p.stage.size)
	if n == 0 || !p.stage.wait(n, p.sess.done) {
		return
	}
	stride := dirty / n
	job := &epochJob{gpas: make([]uint64, 0, 2*n)}
	i := uint64(0)
	p.set.ForEachRun(func(gpa, run uint64) bool {
		for k := range run {
			if i%stride == 0 || i%stride == stride/2 {
				job.gpas = append(job.gpas, gpa+k*PageSize)
			}
			i++
		}
		return uint64(len(job.gpas)) < 2*n
	})
	if uint64(len(job.gpas)) < 2*n {
		return
	}
	job.start = p.stage.alloc(n)
	for pass := range 2 {
		part := &epochJob{gpas: make([]uint64, 0, n), start: job.start}
		for k := pass; k < len(job.gpas); k += 2 {
			part.gpas = append(part.gpas, job.gpas[k])
		}
		t0 := time.Now()
		p.copier.copyRange(part, 0, len(part.gpas))
		if pass == 1 && p.copier.single == 0 {
			p.copier.single = float64(time.Since(t0).Nanoseconds()) / float64(len(part.gpas))
		}
	}
	p.stage.free(n)
}

// pauseEstimate is how long the first checkpoint's pause would take to
// capture n pages: copied into staging at the best cost measured, or, if
// they do not fit staging, sent from guest memory at rate pages per second
// (the last round's).
func (p *Primary) pauseEstimate(n int, rate float64) time.Duration {
	if uint64(n) > p.stage.size {
		if rate <= 0 {
			return time.Duration(1<<63 - 1)
		}
		return time.Duration(float64(n) / rate * float64(time.Second))
	}
	return p.copier.estimate(n)
}
