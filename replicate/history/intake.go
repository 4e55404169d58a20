package history

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/repagent/repagent/replicate"
)

// Intake feeds a Store from a backup's checkpoints
// (replicate.BackupConfig.OnApply: Apply) under a Policy: a point every
// Policy.Interval, the points thinned as the policy's tiers say after each
// one, garbage collected beside the intake, and the oldest tier thinned
// further while the store is over Policy.Cap.
//
// Apply runs on the backup's session goroutine and takes the point there:
// the replica must not change while its pages are hashed, so the next epoch
// waits for it (not the ack of the checkpoint: that went out before).
type Intake struct {
	Store  *Store
	Policy Policy
	// Disk, when set, is the backup's disk image (DiskSize bytes), at the
	// checkpoint's epoch when Apply is called; each point hashes all of it
	// (the engine knows no disk block a checkpoint wrote).
	Disk     io.ReaderAt
	DiskSize int64
	// Now is the clock (time.Now when nil).
	Now func() time.Time
	// OnPoint, when set, is told of each point taken, or why one failed.
	OnPoint func(p Point, err error)
	Log     *slog.Logger

	mu      sync.Mutex
	session replicate.SessionID
	started bool
	last    time.Time
	changed map[int64]struct{} // pages written since the last point
	full    bool               // the next point hashes every page
	gc      sync.WaitGroup
	gcBusy  bool
	Stats   IntakeStats
}

// IntakeStats counts an Intake's work.
type IntakeStats struct {
	Points  int           // points taken
	Failed  int           // points that failed
	Thinned int           // points dropped by the tiers
	Capped  int           // points dropped by the size cap
	Took    time.Duration // time in Add, summed
	Max     time.Duration // the longest Add
}

func (in *Intake) now() time.Time {
	if in.Now != nil {
		return in.Now()
	}
	return time.Now()
}

func (in *Intake) log() *slog.Logger {
	if in.Log != nil {
		return in.Log
	}
	return slog.Default()
}

// Apply is a replicate.BackupConfig.OnApply.
func (in *Intake) Apply(cp *replicate.Checkpoint, mem []byte, pages []int64) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if !in.started || cp.Session != in.session || cp.Epoch == 1 {
		// A new session's replica: nothing carries over from the last one.
		in.started, in.session, in.full = true, cp.Session, true
		in.changed = map[int64]struct{}{}
	}
	for _, p := range pages {
		in.changed[p] = struct{}{}
	}
	now := in.now()
	if !in.full && now.Sub(in.last) < in.Policy.Interval {
		return
	}
	c := &Capture{Epoch: cp.Epoch, Time: now, Session: cp.Session, Digest: cp.Digest, State: cp.State, Memory: mem,
		Disk: in.Disk, DiskSize: in.DiskSize}
	if !in.full {
		c.MemChanged = make([]int64, 0, len(in.changed))
		for p := range in.changed {
			c.MemChanged = append(c.MemChanged, p)
		}
	}
	t0 := time.Now()
	p, err := in.Store.Add(c)
	took := time.Since(t0)
	in.Stats.Took += took
	in.Stats.Max = max(in.Stats.Max, took)
	if err != nil {
		in.Stats.Failed++
		in.full = true // the store forgot the last point's trees
		in.log().Error("history: keep a point", "epoch", cp.Epoch, "err", err)
		if in.OnPoint != nil {
			in.OnPoint(Point{Epoch: cp.Epoch}, err)
		}
		return
	}
	in.Stats.Points++
	in.last, in.full = now, false
	clear(in.changed)
	if in.OnPoint != nil {
		in.OnPoint(p, nil)
	}
	in.thin(now)
}

// thin drops what the tiers no longer keep and starts a collection (one
// at a time) that enforces the cap after it.
func (in *Intake) thin(now time.Time) {
	pts, err := in.Store.Points()
	if err != nil {
		in.log().Error("history: list points", "err", err)
	}
	times := make([]time.Time, len(pts))
	for i, p := range pts {
		times[i] = p.Time
	}
	var drop []uint64
	for i, keep := range in.Policy.Keep(times, now) {
		if !keep {
			drop = append(drop, pts[i].ID)
		}
	}
	if len(drop) > 0 {
		if err := in.Store.Delete(drop...); err != nil {
			in.log().Error("history: thin points", "err", err)
			return
		}
		in.Stats.Thinned += len(drop)
	}
	if in.gcBusy || (len(drop) == 0 && (in.Policy.Cap == 0 || in.Store.Size() <= in.Policy.Cap)) {
		return
	}
	in.gcBusy = true
	in.gc.Add(1)
	go func() {
		defer in.gc.Done()
		err := in.collect(now)
		in.mu.Lock()
		in.gcBusy = false
		in.mu.Unlock()
		if err != nil {
			in.log().Error("history: collect garbage", "err", err)
		}
	}()
}

// collect runs GC, then while the store is over the cap drops the oldest
// point of the oldest tier and collects again.
func (in *Intake) collect(now time.Time) error {
	for {
		if _, err := in.Store.GC(); err != nil {
			return err
		}
		if in.Policy.Cap == 0 {
			return nil
		}
		size := in.Store.Size()
		if size <= in.Policy.Cap {
			return nil
		}
		pts, err := in.Store.Points()
		if err != nil {
			return err
		}
		times := make([]time.Time, len(pts))
		for i, p := range pts {
			times[i] = p.Time
		}
		i, tier := in.Policy.Shed(times, now)
		if i < 0 {
			in.log().Warn("history: over the size cap with one point left", "size", size, "cap", in.Policy.Cap)
			return nil
		}
		if err := in.Store.Delete(pts[i].ID); err != nil {
			return err
		}
		in.mu.Lock()
		in.Stats.Capped++
		in.mu.Unlock()
		in.log().Warn("history: over the size cap: dropped the oldest point of the oldest tier",
			"size", size, "cap", in.Policy.Cap, "tier", tier, "epoch", pts[i].Epoch, "time", pts[i].Time.Format(time.RFC3339Nano))
	}
}

// Close waits for a collection in progress.
func (in *Intake) Close() error {
	in.gc.Wait()
	return nil
}

// String summarises the intake's work.
func (s IntakeStats) String() string {
	avg := time.Duration(0)
	if s.Points > 0 {
		avg = s.Took / time.Duration(s.Points)
	}
	return fmt.Sprintf("%d points (%d failed), %d thinned, %d capped, add %v on average, %v at most", s.Points, s.Failed, s.Thinned, s.Capped, avg, s.Max)
}
