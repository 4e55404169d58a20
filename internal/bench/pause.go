package bench

// The bench's pause figures beside the per-rate tables: the 10k check's
// copy against the same copy on one goroutine, and the pause's tail at a
// moderate rate, each against a baseline from the same run.

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/repagent/repagent/internal/report"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// Fixed settings of the moderate-rate pause tails.
const (
	tailsRate     = 20000                  // page writes per second, 1 vCPU
	tailsPages    = 16384                  // the working set: 64 MiB
	tailsInterval = 100 * time.Millisecond // the replicated interval
	tailsMinMem   = 128 << 20              // room for the working set in the region
)

// Goals of the pause figures (not assertions).
const (
	// The 10k check's pause copy per page on one goroutine over the same
	// with the engine's default copy goroutines: at least this.
	goalCopySpeedup = 1.3
	// The moderate rate's pause p99 over its p50: at most this.
	goalTailRatio = 2.0
)

// CopyCheck is the 10k check's pause copy per page (EpochStats.Copy /
// DirtyPages, the mean over the epochs), with the engine's default copy
// goroutines and with one (Config.CopyThreads 1), and how many goroutines
// copied (EpochStats.CopyThreads, mean). Durations in microseconds.
type CopyCheck struct {
	DefaultPageUS  float64 `json:"default_copy_us_per_page"`
	DefaultThreads float64 `json:"default_copy_goroutines_mean"`
	DefaultEpochs  int     `json:"default_epochs"`
	OnePageUS      float64 `json:"one_goroutine_copy_us_per_page"`
	OneThreads     float64 `json:"one_goroutine_copy_goroutines_mean"`
	OneEpochs      int     `json:"one_goroutine_epochs"`
	// Speedup is OnePageUS over DefaultPageUS (0 unless both were measured).
	Speedup float64 `json:"one_over_default"`
}

// copyPerPage is the mean over r's epochs of the pause's copy per page,
// in microseconds, the mean of the goroutines that copied, and the epochs
// counted: those with pages, staged (an oversized epoch's Copy is its send).
func copyPerPage(r *Mode) (perPageUS, threads float64, n int) {
	var sum, th float64
	for _, s := range r.epochs {
		if s.DirtyPages == 0 || s.Oversize {
			continue
		}
		sum += toUS(s.Copy) / float64(s.DirtyPages)
		th += float64(s.CopyThreads)
		n++
	}
	if n == 0 {
		return 0, 0, 0
	}
	return sum / float64(n), th / float64(n), n
}

// summarizeCopy sets the 10k check's copy per page with the default
// copy goroutines (def) beside the one with one goroutine (one).
func summarizeCopy(def, one *Mode) CopyCheck {
	var c CopyCheck
	c.DefaultPageUS, c.DefaultThreads, c.DefaultEpochs = copyPerPage(def)
	c.OnePageUS, c.OneThreads, c.OneEpochs = copyPerPage(one)
	c.compare()
	return c
}

// compare sets Speedup: one goroutine's copy per page over the default's.
func (c *CopyCheck) compare() {
	if c.DefaultPageUS > 0 {
		c.Speedup = c.OnePageUS / c.DefaultPageUS
	}
}

// printCopy prints the 10k check's copy with the default copy
// goroutines and with one.
func printCopy(w io.Writer, def, one *Mode, c CopyCheck) {
	fmt.Fprintf(w, "10k check, the pause's copy: the engine's default copy goroutines against one (copy threads 1), the same guest and interval:\n\n")
	row := func(name string, m *Mode, perPage, threads float64, n int) []string {
		if n == 0 {
			return []string{name, strconv.FormatUint(m.Epochs, 10), "-", "-", "-", "-", "-", "-"}
		}
		return []string{name, strconv.Itoa(n), fmt.Sprintf("%.0f", m.DirtyPages), fmt.Sprintf("%.2f", threads), fmtUS(m.CopyUS),
			fmtUSf(perPage), fmtUS(m.PauseP50US), fmtUS(m.PauseP99US)}
	}
	table(w, []string{"copy", "epochs", "dirty pages/epoch", "goroutines (mean)", "copy mean", "copy/page", "pause p50", "pause p99"},
		[][]string{row("default", def, c.DefaultPageUS, c.DefaultThreads, c.DefaultEpochs), row("one goroutine", one, c.OnePageUS, c.OneThreads, c.OneEpochs)})
	if c.Speedup > 0 {
		fmt.Fprintf(w, "\npause copy per page: default %s, one goroutine %s: one / default = %.2fx\n",
			fmtUSf(c.DefaultPageUS), fmtUSf(c.OnePageUS), c.Speedup)
	}
}

// copyGoal is the goal line of the 10k check's copy: the default copies a
// page at least goalCopySpeedup times faster than one goroutine.
func copyGoal(c CopyCheck) Goal {
	goal := fmt.Sprintf("(goal default >= %.1fx faster)", goalCopySpeedup)
	if c.Speedup == 0 {
		return Goal{Text: fmt.Sprintf("pause copy per page at 10k dirty pages: not measured (no epochs) %s: NOT MET", goal)}
	}
	ok := c.Speedup >= goalCopySpeedup
	return Goal{Met: ok, Text: fmt.Sprintf("pause copy per page at 10k dirty pages: default %.3f µs (%.2f goroutines on average), one goroutine %.3f µs = %.2fx %s: %s",
		c.DefaultPageUS, c.DefaultThreads, c.OnePageUS, c.Speedup, goal, verdict(ok))}
}

// TailsResult is the pause's tail at a moderate rate: p99 over p50 of
// the same epochs.
type TailsResult struct {
	Rate       uint64  `json:"rate"`
	WorkingSet uint64  `json:"working_set_pages"`
	Mem        uint64  `json:"mem"`
	IntervalMS float64 `json:"interval_ms"`
	Mode       *Mode   `json:"mode"`
	Ratio      float64 `json:"p99_over_p50"`
}

// tailsConfig is the moderate rate's guest: the dirty workload at tailsRate
// on 1 vCPU, random over tailsPages pages.
func (b *runner) tailsConfig() testvm.Config {
	return testvm.Config{MemSize: max(b.Mem, tailsMinMem), VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random,
		WorkingSet: tailsPages, Rate: tailsRate, Seed: 1}
}

// measureTails measures the pauses of the moderate rate's guest replicated at
// tailsInterval.
func (b *runner) measureTails(ctx context.Context) (*TailsResult, error) {
	cfg := b.tailsConfig()
	b.progressf("pause tails: %d/s, random over %d pages, %v", tailsRate, tailsPages, tailsInterval)
	m, err := b.measureReplicated(ctx, cfg, tailsInterval)
	if err != nil {
		return nil, err
	}
	return newTailsResult(cfg.MemSize, m), nil
}

// newTailsResult is the pause tails of m, a mode of a guest of mem bytes.
func newTailsResult(mem uint64, m *Mode) *TailsResult {
	return &TailsResult{Rate: tailsRate, WorkingSet: tailsPages, Mem: mem, IntervalMS: toMS(tailsInterval),
		Mode: m, Ratio: ratio(m.PauseP99US, m.PauseP50US)}
}

// printTails prints the moderate rate's pauses.
func printTails(w io.Writer, tr *TailsResult) {
	m := tr.Mode
	fmt.Fprintf(w, "Pause tails at a moderate rate: the dirty workload at %d/s, random over %d pages (%s), 1 vCPU, %s, replicated at %v, %d epochs:\n\n",
		tr.Rate, tr.WorkingSet, testvm.FormatSize(tr.WorkingSet*replicate.PageSize), testvm.FormatSize(tr.Mem),
		time.Duration(tr.IntervalMS*float64(time.Millisecond)), m.Epochs)
	header := []string{"dirty pages/epoch", "pause p50", "pause p99", "p99 / p50", "pause max", "kick", "harvest", "save", "copy",
		"stall", "resume", "wait", "guest writes/s"}
	if m.Epochs == 0 {
		table(w, header, [][]string{{"-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", report.SI(m.GuestRate)}})
	} else {
		table(w, header, [][]string{{fmt.Sprintf("%.0f", m.DirtyPages), fmtUS(m.PauseP50US), fmtUS(m.PauseP99US),
			fmt.Sprintf("%.2f", tr.Ratio), fmtUS(m.PauseMaxUS), fmtUS(m.KickUS), fmtUS(m.HarvestUS), fmtUS(m.SaveUS),
			fmtUS(m.CopyUS), fmtUS(m.StallUS), fmtUS(m.ResumeUS), fmtUS(m.WaitUS), report.SI(m.GuestRate)}})
	}
}

// tailsGoal is the goal line of the moderate rate: pause p99 at most
// goalTailRatio times p50.
func tailsGoal(tr *TailsResult) Goal {
	name := fmt.Sprintf("pause p99 at %d/s over %s, %v", tailsRate, testvm.FormatSize(tailsPages*replicate.PageSize), tailsInterval)
	goal := fmt.Sprintf("(goal <= %.0fx p50)", goalTailRatio)
	if tr == nil || tr.Mode.Epochs == 0 {
		return Goal{Text: fmt.Sprintf("%s: not measured (no epochs) %s: NOT MET", name, goal)}
	}
	ok := tr.Ratio <= goalTailRatio
	return Goal{Met: ok, Text: fmt.Sprintf("%s: %.2f ms = %.2fx p50 %.2f ms %s: %s",
		name, tr.Mode.PauseP99US/1e3, tr.Ratio, tr.Mode.PauseP50US/1e3, goal, verdict(ok))}
}
