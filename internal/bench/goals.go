package bench

import (
	"fmt"

	"github.com/repagent/repagent/testvm"
)

// verdict is a goal line's end.
func verdict(met bool) string {
	if met {
		return "MET"
	}
	return "NOT MET"
}

// goals compares the figures with the goals: honest lines, MET or NOT MET.
func (b *runner) goals(res *Result) []Goal {
	var out []Goal
	c := res.Check
	ok := c.Ratio > 0 && c.Ratio <= goalPauseRatio
	out = append(out, Goal{Met: ok, Text: fmt.Sprintf("pause p99 at 10k dirty pages (%.0f/epoch): %.2f ms = %.2fx kick+harvest+save+copy (goal <= %.1fx): %s",
		c.DirtyPages, c.PauseP99US/1e3, c.Ratio, goalPauseRatio, verdict(ok))})
	out = append(out, copyGoal(res.Copy))
	out = append(out, tailsGoal(res.Tails))
	out = append(out, captureGoals(res.Capture)...)
	for _, rr := range res.Rates {
		var at100 *Mode
		for _, m := range rr.Modes {
			if m.IntervalMS == 100 && m.Mode != "floor" {
				at100 = m
			}
		}
		if at100 == nil {
			out = append(out, Goal{Text: fmt.Sprintf("guest at 100 ms, rate %s: not measured (100ms is not in --intervals): NOT MET", rateName(rr.Rate))})
			continue
		}
		ok := at100.VsFloor >= goalGuestVsFloor
		out = append(out, Goal{Met: ok, Text: fmt.Sprintf("guest at 100 ms, rate %s: %.2f of the floor (goal >= %.2f): %s",
			rateName(rr.Rate), at100.VsFloor, goalGuestVsFloor, verdict(ok))})
	}
	for i := range res.Rates {
		out = append(out, cpuGoal(&res.Rates[i]))
	}
	if mr := res.Migrate; mr != nil {
		out = append(out, migrateGoals(mr)...)
	}
	if fo := res.Failover; fo != nil {
		hb := b.failoverTimeout()
		bound := goalFailoverExtra + hb
		ok := fo.KillP50MS > 0 && fo.KillP50MS <= toMS(bound)
		first := fo.Sizes[0]
		for _, sz := range fo.Sizes {
			if sz.Skipped == "" {
				first = sz
				break
			}
		}
		if first.Skipped != "" {
			out = append(out, Goal{Text: fmt.Sprintf("failover at %s: not measured (skipped): NOT MET", testvm.FormatSize(first.Mem))})
		} else {
			out = append(out, Goal{Met: ok, Text: fmt.Sprintf("failover at %s: %.0f ms p50 (goal <= %.0f ms + heartbeat timeout %v = %.0f ms): %s",
				testvm.FormatSize(first.Mem), fo.KillP50MS, toMS(goalFailoverExtra), hb, toMS(bound), verdict(ok))})
		}
		if len(fo.Sizes) > 1 {
			out = append(out, failoverSizeGoal(fo))
		}
		if fo.FrozenMS > 0 {
			extra := fo.FrozenMS - toMS(hb)
			ok := extra <= toMS(goalFailoverExtra)
			out = append(out, Goal{Met: ok, Text: fmt.Sprintf("failover of a frozen primary: timeout %v + %.0f ms (goal <= %.0f ms + the timeout): %s",
				hb, extra, toMS(goalFailoverExtra), verdict(ok))})
		} else if first.Skipped != "" {
			out = append(out, Goal{Text: "failover of a frozen primary: not measured (every size skipped): NOT MET"})
		} else {
			out = append(out, Goal{Text: "failover of a frozen primary: failed (see above): NOT MET"})
		}
	} else {
		out = append(out, Goal{Text: "failover: not measured (--failovers 0): NOT MET"})
	}
	if res.Sync != nil {
		out = append(out, syncGoals(res.Sync)...)
	} else {
		out = append(out, Goal{Text: "time to protected: not measured (--no-sync): NOT MET"})
	}
	if res.Net != nil {
		out = append(out, netGoals(res.Net)...)
	} else {
		out = append(out, Goal{Text: "echo added latency: not measured (--no-net): NOT MET"},
			Goal{Text: "main job's shape, hold time and transfer: not measured (--no-net): NOT MET"})
	}
	return out
}
