package bench

// The bench's initial sync section: how long a large guest that dirties its
// memory as fast as it can takes to be protected, against a plain copy of as
// much memory over loopback TCP in the same run.

import (
	"context"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	"github.com/repagent/repagent/internal/report"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// Settings of the sync section.
const (
	SyncVCPUs     = 2                         // the initial sync section's guest's vCPUs
	syncInterval  = replicate.DefaultInterval // its checkpoint interval
	syncCopyChunk = 4 << 20                   // the plain copy's writes and reads
	// goalSyncRatio: time to protected over the plain copy's time.
	goalSyncRatio = 2.0
)

// SyncResult is the sync section: one entry per --sync-sizes.
type SyncResult struct {
	IntervalMS float64     `json:"interval_ms"`
	VCPUs      int         `json:"vcpus"`
	Sizes      []*SyncSize `json:"sizes"`
}

// SyncSize is one guest size's initial sync (Skipped says why it was
// not measured).
type SyncSize struct {
	Mem     uint64 `json:"mem"`
	Skipped string `json:"skipped,omitempty"`
	Track   string `json:"dirty_track,omitempty"`
	// The floor: the guest's memory size copied over loopback TCP, into
	// memory faulted in beforehand; TouchSecs is that first touch of the
	// destination (not part of the floor; the backup's fresh replica pays
	// it too).
	CopySecs  float64 `json:"plain_copy_s"`
	CopyMBps  float64 `json:"plain_copy_mb_per_s"`
	TouchSecs float64 `json:"first_touch_s"`
	// ProtectedSecs is from Primary.Run to the first acknowledged
	// checkpoint; VsCopy its ratio to CopySecs.
	ProtectedSecs float64 `json:"time_to_protected_s"`
	VsCopy        float64 `json:"vs_plain_copy"`
	// The sync: its time (SyncProgress.Elapsed), rounds, why it ended, the
	// most the vCPUs were throttled in a round and how long they were held
	// in all, pages and bytes sent.
	SyncSecs     float64 `json:"sync_s"`
	Rounds       int     `json:"rounds"`
	End          string  `json:"end"`
	ThrottleMax  float64 `json:"throttle_max"`
	HeldSecs     float64 `json:"throttle_held_s"`
	SyncPages    int     `json:"sync_pages"`
	SyncWireMiB  float64 `json:"sync_wire_mib"`
	FirstPauseMS float64 `json:"first_pause_ms"`
	FirstPages   int     `json:"first_pages"`
	// PauseMaxMS is the longest pause of the checkpoints from the first to
	// the end of the window.
	PauseMaxMS float64 `json:"pause_max_ms"`
	// After the warm-up, for --mode-time: epochs per second and the guest.
	EpochsPerS float64 `json:"epochs_per_s"`
	GuestRate  float64 `json:"guest_writes_per_s"`
}

// measureSync measures the initial sync at each of --sync-sizes.
func (b *runner) measureSync(ctx context.Context) (*SyncResult, error) {
	res := &SyncResult{IntervalMS: toMS(syncInterval), VCPUs: SyncVCPUs}
	for _, mem := range b.SyncSizes {
		why, err := fits(mem)
		if err != nil {
			return nil, err
		}
		if why != "" {
			b.progressf("sync %s: skipped: %s", testvm.FormatSize(mem), why)
			res.Sizes = append(res.Sizes, &SyncSize{Mem: mem, Skipped: why})
			continue
		}
		s, err := b.syncOnce(ctx, mem)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", testvm.FormatSize(mem), err)
		}
		res.Sizes = append(res.Sizes, s)
	}
	return res, nil
}

// syncOnce measures the floor, then replicates a fresh guest of mem bytes.
func (b *runner) syncOnce(ctx context.Context, mem uint64) (*SyncSize, error) {
	s := &SyncSize{Mem: mem}
	b.progressf("sync %s: plain copy over loopback TCP (floor)", testvm.FormatSize(mem))
	took, touch, err := plainMemCopy(ctx, mem)
	// The copy's buffers are garbage: give them back before the guest
	// takes their place.
	debug.FreeOSMemory()
	if err != nil {
		return nil, fmt.Errorf("plain copy: %w", err)
	}
	s.CopySecs, s.TouchSecs = took.Seconds(), touch.Seconds()
	s.CopyMBps = float64(mem) / took.Seconds() / 1e6

	b.progressf("sync %s: %d vCPUs at full speed, replicated at %v", testvm.FormatSize(mem), SyncVCPUs, syncInterval)
	cfg := testvm.Config{MemSize: mem, VCPUs: SyncVCPUs, Workload: testvm.Dirty, Pattern: b.Pattern, Seed: 1}
	m, ready, mech, err := b.bootTracked(ctx, cfg, syncInterval)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	s.Track = mech.String()
	// The guest writes for a warm-up before replication starts, as a guest
	// that was running does.
	if err := sleepFor(ctx, m, b.warmup()); err != nil {
		return nil, err
	}
	var (
		mu         sync.Mutex
		started    time.Time
		protected  time.Time
		last       replicate.SyncProgress
		first      replicate.EpochStats
		pauses     []replicate.EpochStats // Start and Pause of every checkpoint
		windowEnd  time.Time
		throttle   float64
		held       time.Duration
		rounds     int
		sent, wire uint64
	)
	r := &Mode{Mode: syncInterval.String(), IntervalMS: toMS(syncInterval), Track: mech.String()}
	err = b.runReplicated(ctx, m, ready, repl{interval: syncInterval, mech: mech, setup: setupTimeoutFor(mem),
		onRun: func() {
			mu.Lock()
			started = time.Now()
			mu.Unlock()
		},
		onSync: func(p replicate.SyncProgress) {
			mu.Lock()
			defer mu.Unlock()
			last, rounds = p, p.Round+1
			throttle, held = max(throttle, p.Throttle), held+p.Held
			sent, wire = sent+uint64(p.Pages), wire+p.WireBytes
		},
		onEpoch: func(e *replicate.EpochStats) {
			mu.Lock()
			defer mu.Unlock()
			if protected.IsZero() {
				protected, first = time.Now(), *e
			}
			pauses = append(pauses, replicate.EpochStats{Start: e.Start, Pause: e.Pause})
		},
		measure: func(ctx context.Context) (time.Time, time.Time, error) {
			t0, t1, err := b.window(ctx, m, r)
			mu.Lock()
			windowEnd = t1
			mu.Unlock()
			return t0, t1, err
		}}, r)
	if err != nil {
		return nil, err
	}
	mu.Lock()
	defer mu.Unlock()
	var pauseMax time.Duration
	for _, e := range pauses {
		if e.Start.Before(windowEnd) {
			pauseMax = max(pauseMax, e.Pause)
		}
	}
	s.ProtectedSecs = protected.Sub(started).Seconds()
	s.VsCopy = ratio(s.ProtectedSecs, s.CopySecs)
	s.SyncSecs, s.Rounds, s.End = last.Elapsed.Seconds(), rounds, last.End.String()
	s.ThrottleMax, s.HeldSecs = throttle, held.Seconds()
	s.SyncPages, s.SyncWireMiB = int(sent), float64(wire)/(1<<20)
	s.FirstPauseMS, s.FirstPages, s.PauseMaxMS = toMS(first.Pause), first.DirtyPages, toMS(pauseMax)
	s.EpochsPerS = float64(r.Epochs) / r.Seconds
	s.GuestRate = r.GuestRate
	return s, nil
}

// plainMemCopy copies a buffer of size bytes (no page zero) over loopback
// TCP into another, with syncCopyChunk writes and reads, and times it from
// the connect to the last byte read: what moving the memory costs without
// the engine. Both buffers are faulted in first, outside that time (a first
// touch costs microseconds a page on some hosts, nested paging above all,
// which would make the floor the page faults' and not the copy's); touch is
// the destination's first touch.
func plainMemCopy(ctx context.Context, size uint64) (took, touch time.Duration, err error) {
	debug.FreeOSMemory() // so that the buffers are new memory, not the heap's
	src := make([]byte, size)
	for off := 0; off < len(src); off += 512 {
		src[off] = byte(off>>9) | 1
	}
	dst := make([]byte, size)
	t := time.Now()
	for off := 0; off < len(dst); off += replicate.PageSize {
		dst[off] = 0xff
	}
	touch = time.Since(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, 0, fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	recv := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			recv <- err
			return
		}
		defer conn.Close()
		for off := 0; off < len(dst); {
			n, err := io.ReadFull(conn, dst[off:min(off+syncCopyChunk, len(dst))])
			if err != nil {
				recv <- fmt.Errorf("receive at %d: %w", off, err)
				return
			}
			off += n
		}
		recv <- nil
	}()
	t0 := time.Now()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return 0, 0, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	for off := 0; off < len(src); off += syncCopyChunk {
		if _, err := conn.Write(src[off:min(off+syncCopyChunk, len(src))]); err != nil {
			if ctx.Err() != nil {
				return 0, 0, ctx.Err()
			}
			return 0, 0, fmt.Errorf("send: %w", err)
		}
	}
	if err := <-recv; err != nil {
		return 0, 0, err
	}
	took = time.Since(t0)
	if dst[len(dst)-512] != src[len(src)-512] {
		return 0, 0, fmt.Errorf("the copy differs from its source")
	}
	return took, touch, nil
}

func printSync(w io.Writer, sr *SyncResult, pattern testvm.Pattern, modeTime time.Duration) {
	fmt.Fprintf(w, "Initial sync of a large guest: the dirty workload at full speed (%s pattern, stamp pages), %d vCPUs, replicated at %v "+
		"to a backup in this process over loopback TCP, from Run to the first acknowledged checkpoint; floor: a plain copy of as much memory "+
		"over loopback TCP into memory already faulted in (first touch: faulting it in); epochs/s over %v after the warm-up:\n\n",
		pattern, sr.VCPUs, time.Duration(sr.IntervalMS*float64(time.Millisecond)), modeTime)
	var rows [][]string
	var skipped []string
	for _, s := range sr.Sizes {
		if s.Skipped != "" {
			skipped = append(skipped, fmt.Sprintf("sync %s: skipped: %s", testvm.FormatSize(s.Mem), s.Skipped))
			continue
		}
		rows = append(rows, []string{testvm.FormatSize(s.Mem), s.Track, report.Dur(secs(s.CopySecs)), fmt.Sprintf("%.0f", s.CopyMBps), report.Dur(secs(s.TouchSecs)),
			report.Dur(secs(s.ProtectedSecs)), fmt.Sprintf("%.2f", s.VsCopy), report.Dur(secs(s.SyncSecs)), strconv.Itoa(s.Rounds), s.End,
			fmt.Sprintf("%.0f%%", 100*s.ThrottleMax), report.Dur(secs(s.HeldSecs)), fmt.Sprintf("%.0f", s.SyncWireMiB),
			report.Dur(time.Duration(s.FirstPauseMS * float64(time.Millisecond))), strconv.Itoa(s.FirstPages),
			report.Dur(time.Duration(s.PauseMaxMS * float64(time.Millisecond))),
			fmt.Sprintf("%.1f", s.EpochsPerS), report.SI(s.GuestRate)})
	}
	if len(rows) > 0 {
		table(w, []string{"guest", "track", "plain copy", "copy MB/s", "first touch", "time to protected", "vs copy", "sync", "rounds", "ended",
			"throttle max", "held", "sync wire MiB", "first pause", "first pages", "pause max", "epochs/s after", "guest writes/s"}, rows)
	}
	for i, l := range skipped {
		if i == 0 && len(rows) > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w, l)
	}
}

// syncGoals is a goal line per size: time to protected at most
// goalSyncRatio times the plain copy.
func syncGoals(sr *SyncResult) []Goal {
	var out []Goal
	for _, s := range sr.Sizes {
		if s.Skipped != "" {
			out = append(out, Goal{Text: fmt.Sprintf("time to protected, %s guest: not measured (skipped: too large for free memory): NOT MET",
				testvm.FormatSize(s.Mem))})
			continue
		}
		ok := s.VsCopy > 0 && s.VsCopy <= goalSyncRatio
		out = append(out, Goal{Met: ok, Text: fmt.Sprintf("time to protected, %s guest: %s = %.2fx a plain copy of its memory over loopback TCP (%s) (goal <= %.0fx): %s",
			testvm.FormatSize(s.Mem), report.Dur(secs(s.ProtectedSecs)), s.VsCopy, report.Dur(secs(s.CopySecs)), goalSyncRatio, verdict(ok))})
	}
	return out
}
