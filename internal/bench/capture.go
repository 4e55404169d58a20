package bench

// The capture section: eager, lazy (copy-before-write) and auto capture side
// by side, for a sequential, a hot/cold and a random guest at about 10k
// dirty pages per 100 ms epoch, at two intervals. Eager is the baseline of
// the same run.

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/repagent/repagent/internal/report"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// Fixed settings of the capture section.
const (
	capturePages  = 10240    // the working set: about 10k dirty pages per 100 ms at full speed (seq)
	captureMinMem = 64 << 20 // room for it
	// Auto's warm-up: its guest-cost budget calibrates eager's cost for 2 s
	// and prices lazy pages over 2 s windows (replicate/lazyguest.go), so
	// the window opens once it has settled.
)

// The capture section's intervals and captures, in the order they are
// measured and printed.
var (
	// Auto's warm-up: its guest-cost budget calibrates eager's cost for 2 s
	// and prices lazy pages over 2 s windows (replicate/lazyguest.go), so
	// the window opens once it has settled.
	captureAutoSettle = 8 * time.Second

	captureIntervals = []time.Duration{100 * time.Millisecond, 20 * time.Millisecond}
	capturePatterns  = []testvm.Pattern{testvm.Seq, testvm.HotCold, testvm.Random}
	captureModes     = []replicate.Capture{replicate.CaptureEager, replicate.CaptureLazy, replicate.CaptureAuto}
)

// Goals of the capture section (not assertions).
const (
	goalLazySeqP99   = 1500 * time.Microsecond // seq, lazy: pause p99 at most this
	goalAutoRandom   = 0.05                    // random: auto within this of eager, pause p50 and guest rate
	goalAutoVsBetter = 0.10                    // every pattern: auto within this of the better of eager and lazy
)

// CaptureResult is the capture section: a case per pattern and interval.
type CaptureResult struct {
	WorkingSet uint64         `json:"working_set_pages"`
	Cases      []*CaptureCase `json:"cases"`
}

// CaptureCase is one pattern at one interval, with a mode per capture.
type CaptureCase struct {
	Pattern    string         `json:"pattern"`
	IntervalMS float64        `json:"interval_ms"`
	Modes      []*CaptureMode `json:"modes"`
}

// CaptureMode is one capture's figures: the replicated mode, and the lazy
// parts over its epochs (means per epoch; durations in microseconds).
type CaptureMode struct {
	Capture   string  `json:"capture"`
	Mode      *Mode   `json:"mode"`
	LazyShare float64 `json:"lazy_share"` // of the dirty pages, protected and copied behind
	ProtectUS float64 `json:"protect_mean_us"`
	BehindP50 float64 `json:"behind_p50_us"`
	Faults    float64 `json:"faults_per_epoch"`
	Guarded   float64 `json:"guarded_pages_per_epoch"`
	// VCPUHostUS is the vCPU thread's time outside guest mode per epoch
	// (KVM's faults and exits, the device model): what capture costs the
	// guest beyond the pause.
	VCPUHostUS float64 `json:"vcpu_host_us_per_epoch"`
}

func (b *runner) measureCapture(ctx context.Context) (*CaptureResult, error) {
	res := &CaptureResult{WorkingSet: capturePages}
	for _, pat := range capturePatterns {
		for _, iv := range captureIntervals {
			cc := &CaptureCase{Pattern: pat.String(), IntervalMS: toMS(iv)}
			cfg := testvm.Config{MemSize: max(b.Mem, captureMinMem), VCPUs: 1, Workload: testvm.Dirty, Pattern: pat,
				WorkingSet: capturePages, Seed: 1}
			for _, c := range captureModes {
				b.progressf("capture: %v, %v over %d pages, full speed, %v", c, pat, capturePages, iv)
				rp := repl{capture: c}
				if c == replicate.CaptureAuto {
					rp.warmup = captureAutoSettle
				}
				m, err := b.measureReplicatedWith(ctx, cfg, iv, rp)
				if err != nil {
					return nil, fmt.Errorf("capture %v, %v at %v: %w", c, pat, iv, err)
				}
				cc.Modes = append(cc.Modes, newCaptureMode(c, m))
			}
			res.Cases = append(res.Cases, cc)
		}
	}
	return res, nil
}

func newCaptureMode(c replicate.Capture, m *Mode) *CaptureMode {
	cm := &CaptureMode{Capture: c.String(), Mode: m}
	a := &m.agg
	if a.Epochs == 0 {
		return cm
	}
	n := float64(a.Epochs)
	if a.Dirty > 0 {
		cm.LazyShare = float64(a.LazyPages) / float64(a.Dirty)
	}
	cm.ProtectUS = toUS(a.Protect) / n
	cm.BehindP50 = toUS(a.Behind.Quantile(0.5))
	cm.Faults = float64(a.Faults) / n
	cm.Guarded = float64(a.Guarded) / n
	if a.HostEpochs > 0 {
		cm.VCPUHostUS = toUS(a.VCPUHost) / float64(a.HostEpochs)
	}
	return cm
}

// mode returns the case's mode of capture c.
func (cc *CaptureCase) mode(c replicate.Capture) *CaptureMode {
	for _, m := range cc.Modes {
		if m.Capture == c.String() {
			return m
		}
	}
	return nil
}

func printCapture(w io.Writer, cr *CaptureResult) {
	fmt.Fprintf(w, "Capture: eager (copy in the pause), lazy (write-protect in the pause, copy behind the guest) and auto, the dirty workload at full speed over %d pages, 1 vCPU; guest writes/s also over eager's:\n\n",
		cr.WorkingSet)
	header := []string{"pattern", "interval", "capture", "dirty pages/epoch", "pause p50", "pause p99", "protect", "lazy share",
		"behind p50", "faults/epoch", "vCPU host/epoch", "guest writes/s", "vs eager"}
	var rows [][]string
	for _, cc := range cr.Cases {
		eager := cc.mode(replicate.CaptureEager)
		for _, m := range cc.Modes {
			r := m.Mode
			rows = append(rows, []string{cc.Pattern, fmt.Sprintf("%v", time.Duration(cc.IntervalMS*float64(time.Millisecond))), m.Capture,
				fmt.Sprintf("%.0f", r.DirtyPages), fmtUS(r.PauseP50US), fmtUS(r.PauseP99US), fmtUS(m.ProtectUS),
				fmt.Sprintf("%.0f%%", 100*m.LazyShare), fmtUS(m.BehindP50), fmt.Sprintf("%.1f", m.Faults),
				fmtUS(m.VCPUHostUS), report.SI(r.GuestRate), fmt.Sprintf("%.2f", ratio(r.GuestRate, eager.Mode.GuestRate))})
		}
	}
	table(w, header, rows)
}

// captureGoals are the capture section's goal lines.
func captureGoals(cr *CaptureResult) []Goal {
	if cr == nil {
		return nil
	}
	var out []Goal
	for _, cc := range cr.Cases {
		eager, lazy, auto := cc.mode(replicate.CaptureEager), cc.mode(replicate.CaptureLazy), cc.mode(replicate.CaptureAuto)
		at := fmt.Sprintf("%s at %v", cc.Pattern, time.Duration(cc.IntervalMS*float64(time.Millisecond)))
		if cc.Pattern == testvm.Seq.String() {
			ok := lazy.Mode.PauseP99US > 0 && lazy.Mode.PauseP99US <= toUS(goalLazySeqP99)
			out = append(out, Goal{Met: ok, Text: fmt.Sprintf("capture, %s: lazy pause p99 %.2f ms (eager %.2f ms) (goal <= %.1f ms): %s",
				at, lazy.Mode.PauseP99US/1e3, eager.Mode.PauseP99US/1e3, toMS(goalLazySeqP99), verdict(ok))})
		}
		if cc.Pattern == testvm.Random.String() {
			p, g := ratio(auto.Mode.PauseP50US, eager.Mode.PauseP50US), ratio(auto.Mode.GuestRate, eager.Mode.GuestRate)
			ok := p > 0 && p <= 1+goalAutoRandom && g >= 1-goalAutoRandom
			out = append(out, Goal{Met: ok, Text: fmt.Sprintf("capture, %s: auto over eager: pause p50 %.2fx, guest rate %.2fx (goal within %.0f%%): %s",
				at, p, g, 100*goalAutoRandom, verdict(ok))})
		}
		bestP99 := min(eager.Mode.PauseP99US, lazy.Mode.PauseP99US)
		bestRate := max(eager.Mode.GuestRate, lazy.Mode.GuestRate)
		p, g := ratio(auto.Mode.PauseP99US, bestP99), ratio(auto.Mode.GuestRate, bestRate)
		ok := p > 0 && p <= 1+goalAutoVsBetter && g >= 1-goalAutoVsBetter
		out = append(out, Goal{Met: ok, Text: fmt.Sprintf("capture, %s: auto over the better of eager and lazy: pause p99 %.2fx, guest rate %.2fx (goal within %.0f%%): %s",
			at, p, g, 100*goalAutoVsBetter, verdict(ok))})
	}
	return out
}
