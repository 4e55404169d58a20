package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/netlab"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/testvm"
)

func TestTable(t *testing.T) {
	var b bytes.Buffer
	table(&b, []string{"mode", "x"}, [][]string{{"none", "1.23M"}, {"replicated 10ms", "5µs"}})
	want := "| mode            |     x |\n" +
		"| --------------- | ----: |\n" +
		"| none            | 1.23M |\n" +
		"| replicated 10ms |   5µs |\n"
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []time.Duration
		want time.Duration
	}{{nil, 0}, {[]time.Duration{3}, 3}, {[]time.Duration{5, 1, 3}, 3}, {[]time.Duration{4, 1, 3, 2}, 2}} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median %v = %v, want %v", tc.in, got, tc.want)
		}
	}
}

// The network goal: added p50 against interval/2 + pause p50 + transfer p50 +
// 1 ms, with the numbers in the line.
func TestNetGoals(t *testing.T) {
	for _, tc := range []struct {
		name     string
		echo     EchoMode
		wantMet  bool
		wantText string
	}{
		{name: "under", echo: EchoMode{Mode: "20ms", RTTP50US: 11000,
			NetEpochs: NetEpochs{Epochs: 50, PauseP50US: 200, TransferP50US: 100}}, wantMet: true,
			wantText: "echo added latency at 20ms: p50 10.90 ms (rtt p50 11.00 ms, 0.10 ms without replication) " +
				"(goal <= 20ms/2 + pause p50 0.20 ms + transfer p50 0.10 ms + 1 ms = 11.30 ms): MET"},
		{name: "over", echo: EchoMode{Mode: "10ms", RTTP50US: 7600,
			NetEpochs: NetEpochs{Epochs: 50, PauseP50US: 150, TransferP50US: 50}},
			wantText: "echo added latency at 10ms: p50 7.50 ms (rtt p50 7.60 ms, 0.10 ms without replication) " +
				"(goal <= 10ms/2 + pause p50 0.15 ms + transfer p50 0.05 ms + 1 ms = 6.20 ms): NOT MET"},
		{name: "no epochs", echo: EchoMode{Mode: "10ms", RTTP50US: 200},
			wantText: "echo added latency at 10ms: p50 0.10 ms (rtt p50 0.20 ms, 0.10 ms without replication) " +
				"(goal <= 10ms/2 + pause p50 0.00 ms + transfer p50 0.00 ms + 1 ms = 6.00 ms): NOT MET"},
	} {
		none := &EchoMode{Mode: "none", RTTP50US: 100}
		iv, err := time.ParseDuration(tc.echo.Mode)
		if err != nil {
			t.Fatal(err)
		}
		tc.echo.predict(iv)
		tc.echo.addedOver(none)
		nr := &NetResult{Echo: []*EchoMode{none, &tc.echo}}
		g := netGoals(nr)
		if len(g) != 1 || g[0].Met != tc.wantMet || g[0].Text != tc.wantText {
			t.Errorf("%s: got %+v\nwant met %v, %q", tc.name, g, tc.wantMet, tc.wantText)
		}
	}
}

// The pause goals: the 10k check's copy per page, one goroutine over the
// default, and the moderate rate's p99 over p50, with the numbers in the line.
func TestPauseGoals(t *testing.T) {
	for _, tc := range []struct {
		name     string
		copy     CopyCheck
		wantMet  bool
		wantText string
	}{
		{name: "faster", copy: CopyCheck{DefaultPageUS: 0.2, DefaultThreads: 2, OnePageUS: 0.3}, wantMet: true,
			wantText: "pause copy per page at 10k dirty pages: default 0.200 µs (2.00 goroutines on average), one goroutine 0.300 µs = 1.50x (goal default >= 1.3x faster): MET"},
		{name: "same", copy: CopyCheck{DefaultPageUS: 0.3, DefaultThreads: 1, OnePageUS: 0.3},
			wantText: "pause copy per page at 10k dirty pages: default 0.300 µs (1.00 goroutines on average), one goroutine 0.300 µs = 1.00x (goal default >= 1.3x faster): NOT MET"},
		{name: "no epochs", wantText: "pause copy per page at 10k dirty pages: not measured (no epochs) (goal default >= 1.3x faster): NOT MET"},
	} {
		tc.copy.compare()
		if g := copyGoal(tc.copy); g.Met != tc.wantMet || g.Text != tc.wantText {
			t.Errorf("copy, %s: got %+v\nwant met %v, %q", tc.name, g, tc.wantMet, tc.wantText)
		}
	}
	for _, tc := range []struct {
		name     string
		tails    *TailsResult
		wantMet  bool
		wantText string
	}{
		{name: "under", tails: newTailsResult(128<<20, &Mode{Epochs: 30, PauseP50US: 1000, PauseP99US: 1800}), wantMet: true,
			wantText: "pause p99 at 20000/s over 64MiB, 100ms: 1.80 ms = 1.80x p50 1.00 ms (goal <= 2x p50): MET"},
		{name: "over", tails: newTailsResult(128<<20, &Mode{Epochs: 30, PauseP50US: 1000, PauseP99US: 2500}),
			wantText: "pause p99 at 20000/s over 64MiB, 100ms: 2.50 ms = 2.50x p50 1.00 ms (goal <= 2x p50): NOT MET"},
		{name: "no epochs", tails: newTailsResult(128<<20, &Mode{}),
			wantText: "pause p99 at 20000/s over 64MiB, 100ms: not measured (no epochs) (goal <= 2x p50): NOT MET"},
	} {
		if g := tailsGoal(tc.tails); g.Met != tc.wantMet || g.Text != tc.wantText {
			t.Errorf("tails, %s: got %+v\nwant met %v, %q", tc.name, g, tc.wantMet, tc.wantText)
		}
	}
}

// The main job's shape's goals: hold p50 against interval/2 + pause p50 +
// transfer p50 + 1 ms, and transfer p50 against 10% of the interval.
func TestJobShapeGoals(t *testing.T) {
	nr := &NetResult{JobShape: []*EchoMode{{Mode: "none", RTTP50US: 200},
		{Mode: "100ms", IntervalMS: 100, RTTP50US: 52000, GateWindow: GateWindow{HoldP50US: 51000},
			NetEpochs: NetEpochs{Epochs: 30, DirtyPages: 2000, PauseP50US: 1000, TransferP50US: 2000}},
		{Mode: "10ms", IntervalMS: 10, RTTP50US: 12000, GateWindow: GateWindow{HoldP50US: 11000},
			NetEpochs: NetEpochs{Epochs: 300, DirtyPages: 900, PauseP50US: 500, TransferP50US: 2000}},
	}}
	for _, e := range nr.JobShape[1:] {
		e.predict(time.Duration(e.IntervalMS) * time.Millisecond)
	}
	want := []Goal{
		{Met: true, Text: "main job's shape at 100ms: hold p50 51.00 ms (client rtt p50 52.00 ms) = 0.94x the prediction " +
			"(goal <= 100ms/2 + pause p50 1.00 ms + transfer p50 2.00 ms + 1 ms = 54.00 ms): MET"},
		{Met: true, Text: "main job's shape at 100ms: transfer p50 2.00 ms = 2.0% of the interval, 2000 dirty pages/epoch (goal <= 10%): MET"},
		{Text: "main job's shape at 10ms: hold p50 11.00 ms (client rtt p50 12.00 ms) = 1.29x the prediction " +
			"(goal <= 10ms/2 + pause p50 0.50 ms + transfer p50 2.00 ms + 1 ms = 8.50 ms): NOT MET"},
		{Text: "main job's shape at 10ms: transfer p50 2.00 ms = 20.0% of the interval, 900 dirty pages/epoch (goal <= 10%): NOT MET"},
	}
	if got := jobShapeGoals(nr); !slices.Equal(got, want) {
		t.Errorf("got\n%+v\nwant\n%+v", got, want)
	}
}

// The failover's size goal judges what follows detection: the same at both
// sizes (within 25% or 10 ms) and at most 60 ms; detection is only shown.
func TestFailoverSizeGoal(t *testing.T) {
	const goal = "(goal after detection: the same at both, within 25% or 10 ms, and <= 60 ms)"
	for _, tc := range []struct {
		name         string
		first, last  FailoverSize
		wantMet      bool
		wantContains string
	}{
		{name: "same, slow detection", first: FailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 20, DetectP50MS: 12, AfterP50MS: 8},
			last: FailoverSize{Mem: 4 << 30, Kills: 5, KillP50MS: 180, DetectP50MS: 165, AfterP50MS: 15}, wantMet: true,
			wantContains: "failover at 4GiB vs 256MiB: p50 180 ms / 20 ms = 9.00x (detection 165 ms / 12 ms), after detection 15.0 ms / 8.0 ms = 1.88x " + goal + ": MET"},
		{name: "grows", first: FailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 40, AfterP50MS: 30},
			last:         FailoverSize{Mem: 4 << 30, Kills: 5, KillP50MS: 60, AfterP50MS: 45},
			wantContains: "after detection 45.0 ms / 30.0 ms = 1.50x " + goal + ": NOT MET"},
		{name: "over 60 ms", first: FailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 80, AfterP50MS: 70},
			last: FailoverSize{Mem: 4 << 30, Kills: 5, KillP50MS: 80, AfterP50MS: 70}, wantContains: ": NOT MET"},
		{name: "skipped", first: FailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 20, AfterP50MS: 8},
			last:         FailoverSize{Mem: 4 << 30, Skipped: "needs about 12GiB"},
			wantContains: "failover at 4GiB vs 256MiB: not measured (a size was skipped or failed) " + goal + ": NOT MET"},
	} {
		fo := &FailoverResult{Sizes: []FailoverSize{tc.first, tc.last}}
		fo.compareSizes()
		g := failoverSizeGoal(fo)
		if g.Met != tc.wantMet || !strings.Contains(g.Text, tc.wantContains) {
			t.Errorf("%s: got %+v\nwant met %v, containing %q", tc.name, g, tc.wantMet, tc.wantContains)
		}
	}
}

// The plain copies that serve as floors copy what they say and take time.
func TestCopyFloors(t *testing.T) {
	b := &runner{Options: &Options{}}
	for _, n := range []int{1, 100, 5000} {
		if d := b.plainCopyPerPage(16<<20, n); d <= 0 || d > time.Millisecond {
			t.Errorf("plain copy of %d pages: %v per page", n, d)
		}
	}
	if d := b.plainCopyPerPage(8<<20, 1<<20); d <= 0 { // more pages than the buffer: capped
		t.Errorf("plain copy of more pages than the buffer: %v per page", d)
	}
	took, touch, err := plainMemCopy(t.Context(), 16<<20)
	if err != nil || took <= 0 || touch <= 0 {
		t.Errorf("plainMemCopy: %v, %v, %v", took, touch, err)
	}
}

// TestSmoke runs the whole bench with tiny settings and checks that
// every table, mode, failover, network row and goal line is there, and that
// the network's figures are not empty. It asserts no timing.
func TestSmoke(t *testing.T) {
	privileged.Require(t, privileged.KVM, privileged.Root, privileged.NetAdmin)
	o := Options{Mem: 32 << 20, VCPUs: 1, Rates: []uint64{20000}, Pattern: testvm.Random, Intervals: []time.Duration{20 * time.Millisecond},
		ModeTime: 300 * time.Millisecond, Failovers: 1, FailoverSizes: []uint64{32 << 20, 64 << 20}, DirtyTrack: dirtylog.Auto,
		Net: true, Disk: true, DiskSize: 4 << 20, DiskSyncSize: 8 << 20, EchoRate: 200, StreamRate: 100000,
		Sync: true, SyncSizes: []uint64{64 << 20}, MigrateSizes: []uint64{32 << 20}, Fence: true, Executable: vmtest.BuildRepagent(t), VMM: "repagent testvm"}
	var stdout, stderr bytes.Buffer
	got, err := Run(t.Context(), o, &stdout, &stderr)
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	if err != nil {
		t.Fatal(err)
	}
	// Every section printed its table.
	for _, title := range []string{"Rate 20000/s per vCPU:", "Engine CPU per dirty page", "10k check: seq over 10000 pages",
		"10k check, the pause's copy:", "Pause tails at a moderate rate:", "Failover: primary process at rate 20000/s", "Migration: repagent migrate", "Fenced failover: a 32MiB primary process",
		"Initial sync of a large guest:", "Disk write throughput:", "Initial disk sync: 8MiB image", "Output commit (network):",
		"Output commit with the main job's shape:", "Held-frame throughput:", "Goals:"} {
		if !strings.Contains(stdout.String(), title) {
			t.Errorf("stdout lacks %q", title)
		}
	}
	// What --json writes reads back.
	b, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	var res Result
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("json: %v\n%s", err, b)
	}
	var goals []string
	for _, g := range res.Goals {
		goals = append(goals, g.Text)
	}
	for _, re := range []string{
		`(?m)^engine CPU per page, rate 20000/s, stamp pages: primary [\d.]+ µs at 20ms \([\d.]+x a plain copy\), backup [\d.]+ µs at 20ms \([\d.]+x\), ` +
			`worst of the replicated modes \(goal primary <= 3 µs, backup <= 2 µs\): (MET|NOT MET)$`,
		`(?m)^failover at 64MiB vs 32MiB: p50 \d+ ms / \d+ ms = [\d.]+x \(detection \d+ ms / \d+ ms\), after detection [\d.]+ ms / [\d.]+ ms = [\d.]+x ` +
			`\(goal after detection: the same at both, within 25% or 10 ms, and <= 60 ms\): (MET|NOT MET)$`,
		`(?m)^time to protected, 64MiB guest: \S+ = [\d.]+x a plain copy of its memory over loopback TCP \(\S+\) \(goal <= 2x\): (MET|NOT MET)$`,
		`(?m)^pause p99 at 10k dirty pages \(\d+/epoch\): [\d.]+ ms = [\d.]+x kick\+harvest\+save\+copy \(goal <= 1\.5x\): (MET|NOT MET)$`,
		`(?m)^pause copy per page at 10k dirty pages: default [\d.]+ µs \([\d.]+ goroutines on average\), one goroutine [\d.]+ µs = [\d.]+x ` +
			`\(goal default >= 1\.3x faster\): (MET|NOT MET)$`,
		`(?m)^pause p99 at 20000/s over 64MiB, 100ms: [\d.]+ ms = [\d.]+x p50 [\d.]+ ms \(goal <= 2x p50\): (MET|NOT MET)$`,
		`(?m)^guest at 100 ms, rate 20000/s: not measured \(100ms is not in --intervals\): NOT MET$`,
		`(?m)^failover at 32MiB: \d+ ms p50 \(goal <= 500 ms \+ heartbeat timeout \S+ = \d+ ms\): (MET|NOT MET)$`,
		`(?m)^failover of a frozen primary: timeout \S+ \+ -?\d+ ms \(goal <= 500 ms \+ the timeout\): (MET|NOT MET)$`,
		`(?m)^echo added latency at 20ms: p50 -?[\d.]+ ms \(rtt p50 [\d.]+ ms, [\d.]+ ms without replication\) ` +
			`\(goal <= 20ms/2 \+ pause p50 [\d.]+ ms \+ transfer p50 [\d.]+ ms \+ 1 ms = [\d.]+ ms\): (MET|NOT MET)$`,
		`(?m)^main job's shape at 100ms: hold p50 [\d.]+ ms \(client rtt p50 [\d.]+ ms\) = [\d.]+x the prediction ` +
			`\(goal <= 100ms/2 \+ pause p50 [\d.]+ ms \+ transfer p50 [\d.]+ ms \+ 1 ms = [\d.]+ ms\): (MET|NOT MET)$`,
		`(?m)^main job's shape at 10ms: transfer p50 [\d.]+ ms = [\d.]+% of the interval, \d+ dirty pages/epoch \(goal <= 10%\): (MET|NOT MET)$`,
		`(?m)^migration downtime at 32MiB, 20000/s: [\d.]+ ms \(final pause [\d.]+ ms, ack [\d.]+ ms, restore [\d.]+ ms; total \d+ ms\) \(goal <= 3ms, QEMU 7\.2 here: 3 ms\): (MET|NOT MET)$`,
		`(?m)^migration downtime at 32MiB, full speed: [\d.]+ ms .*\(goal <= 17ms, QEMU 7\.2 here: 11-17 ms\): (MET|NOT MET)$`,
	} {
		if !regexp.MustCompile(re).MatchString(strings.Join(goals, "\n")) {
			t.Errorf("goals lack %s", re)
		}
	}
	if fr := res.Fence; fr == nil || len(fr.Runs) != 2 {
		t.Errorf("fenced failover: %+v, want a run by SIGKILL and one by SIGSTOP", fr)
	} else {
		for _, r := range fr.Runs {
			if r.Error != "" || r.Epoch == 0 || r.DetectMS < 0 || r.ExpiryMS < 0 || r.AcquireMS <= 0 || r.RestoreMS <= 0 ||
				r.TotalMS < r.DetectMS+r.ExpiryMS+r.AcquireMS {
				t.Errorf("fenced failover run: %+v", r)
			}
		}
		if k := fr.Runs[0]; k.Error == "" && k.ExpiryMS < 500 {
			// A killed primary renewed at most TTL/3 before: most of
			// the lease is left after its connection closed.
			t.Errorf("SIGKILL: lease expiry %.0f ms after detection, want most of the %v TTL", k.ExpiryMS, FenceTTL)
		}
	}
	if mr := res.Migrate; mr == nil || len(mr.Runs) != 2 {
		t.Errorf("migration: %+v, want a run at each rate", mr)
	} else {
		for _, r := range mr.Runs {
			if r.Error != "" || r.Epoch == 0 || r.DowntimeMS <= r.PauseMS || r.TotalMS <= r.SourceMS || r.SourceMS <= 0 || r.RestoreMS <= 0 ||
				r.FirstWriteMS < r.DowntimeMS {
				t.Errorf("migration run: %+v", r)
			}
		}
	}
	if rr := res.Rates; len(rr) == 1 && len(rr[0].Modes) == 3 {
		none, floor, repl := rr[0].Modes[0], rr[0].Modes[1], rr[0].Modes[2]
		if rr[0].Rate != 20000 || none.Mode != "none" || none.Track != "off" || none.VsNone != 1 || floor.Mode != "floor" || floor.Track == "" ||
			floor.VsFloor != 1 || floor.Harvests == 0 || repl.Mode != "20ms" || repl.Track == "" || repl.Epochs == 0 || repl.PauseP50US <= 0 {
			t.Errorf("rate 20000/s: %+v, %+v, %+v", none, floor, repl)
		}
	}
	if c := res.Check; res.Check10k == nil || res.Check10k.Epochs == 0 || c.DirtyPages <= 0 || c.PauseP99US <= 0 || c.BaseP50US <= 0 ||
		c.Ratio != c.PauseP99US/c.BaseP50US {
		t.Errorf("10k check: %+v", c)
	}
	if fo := res.Failover; fo != nil && len(fo.Runs) == 5 {
		for i, r := range fo.Runs {
			if want := []string{"SIGKILL", "SIGSTOP", "SIGKILL", "SIGKILL", "SIGKILL"}[i]; r.Signal != want || r.Epoch == 0 {
				t.Errorf("failover run %d: %+v, want %s", i+1, r, want)
			}
		}
		if fo.Rate != 20000 || fo.FrozenMS <= 0 || fo.Runs[0].VerifyMS >= 0.05 {
			t.Errorf("failover: %+v", fo)
		}
	}
	if sr := res.Sync; sr != nil && len(sr.Sizes) == 1 &&
		!slices.Contains([]string{"converged", "rounds stopped shrinking", "round limit", "throttle limit"}, sr.Sizes[0].End) {
		t.Errorf("sync 64MiB ended %q", sr.Sizes[0].End)
	}
	if dr := res.Disk; dr != nil && len(dr.Throughput) == 4 && dr.Throughput[0].VsPlain != 1 {
		t.Errorf("disk plain: %+v", dr.Throughput[0])
	}
	if nr := res.Net; nr != nil && len(nr.Stream) == 2 && (nr.Stream[0].VsNone != 1 || nr.Stream[0].Held != 0) {
		t.Errorf("stream none: %+v", nr.Stream[0])
	}
	if len(res.Rates) != 1 || len(res.Rates[0].Modes) != 3 || res.Failover == nil || len(res.Failover.Runs) != 5 || len(res.Goals) != 18 {
		t.Errorf("--json file: %s", b)
	}
	for _, m := range res.Rates[0].Modes {
		if m.Writes == 0 {
			t.Errorf("mode %s: the guest wrote nothing", m.Mode)
		}
	}
	for _, m := range append(res.Rates[0].Modes[2:], res.Check10k) {
		if m.CPUPageUS <= 0 || m.BackupCPUPageUS <= 0 || m.CopyPageUS <= 0 || m.CopyPages != int(m.DirtyPages+0.5) ||
			m.CPUVsCopy != m.CPUPageUS/m.CopyPageUS || m.BackupVsCopy != m.BackupCPUPageUS/m.CopyPageUS {
			t.Errorf("mode %s: CPU per page: %+v", m.Mode, m)
		}
	}
	// The 10k check's copy, with the default copy goroutines and with one.
	if c := res.Copy; res.Check10kOne == nil || c.DefaultEpochs == 0 || c.OneEpochs == 0 || c.DefaultPageUS <= 0 || c.OnePageUS <= 0 ||
		c.OneThreads != 1 || c.DefaultThreads < 1 || c.Speedup != c.OnePageUS/c.DefaultPageUS {
		t.Errorf("10k check, copy: %+v", c)
	}
	if tr := res.Tails; tr == nil || tr.Rate != 20000 || tr.WorkingSet != 16384 || tr.Mem != 128<<20 || tr.Mode == nil || tr.Mode.Epochs == 0 ||
		tr.Mode.PauseP50US <= 0 || tr.Ratio != tr.Mode.PauseP99US/tr.Mode.PauseP50US || tr.Mode.Writes == 0 {
		t.Errorf("pause tails: %+v", tr)
	}
	fo := res.Failover
	for i, r := range fo.Runs {
		wantMem := []uint64{32 << 20, 32 << 20, 32 << 20, 64 << 20, 64 << 20}[i]
		if r.Error != "" || r.Mem != wantMem || r.VerifyReplica != (i == 2 || i == 4) || r.TotalMS <= r.DetectMS {
			t.Errorf("failover run %d: %+v", i+1, r)
		}
	}
	// Digesting the whole replica takes longer than not digesting it.
	if len(fo.Runs) == 5 && (fo.Runs[2].VerifyMS <= fo.Runs[0].VerifyMS || fo.Runs[4].VerifyMS <= fo.Runs[3].VerifyMS) {
		t.Errorf("failover: verify times without and with --verify-replica: %.3f, %.3f ms at 32MiB; %.3f, %.3f ms at 64MiB",
			fo.Runs[0].VerifyMS, fo.Runs[2].VerifyMS, fo.Runs[3].VerifyMS, fo.Runs[4].VerifyMS)
	}
	if len(fo.Sizes) != 2 || fo.Sizes[0].Mem != 32<<20 || fo.Sizes[1].Mem != 64<<20 || fo.Sizes[0].Kills != 1 || fo.Sizes[1].Kills != 1 ||
		fo.Sizes[0].AfterP50MS <= 0 || fo.Sizes[1].VerifiedMS <= 0 || fo.SizeRatio <= 0 || fo.AfterRatio <= 0 || fo.KillP50MS != fo.Sizes[0].KillP50MS {
		t.Errorf("failover sizes: %+v", fo)
	}
	sr := res.Sync
	if sr == nil || !res.Config.Sync || len(sr.Sizes) != 1 {
		t.Fatalf("--json file: sync: %+v", sr)
	}
	if s := sr.Sizes[0]; s.Mem != 64<<20 || s.Skipped != "" || s.CopySecs <= 0 || s.ProtectedSecs <= 0 || s.ProtectedSecs < s.SyncSecs ||
		s.Rounds < 1 || s.End == "in progress" || s.SyncPages < 64<<20/4096 || s.FirstPauseMS <= 0 || s.EpochsPerS <= 0 ||
		s.VsCopy != s.ProtectedSecs/s.CopySecs {
		t.Errorf("sync 64MiB: %+v", s)
	}
	dr := res.Disk
	if dr == nil || !res.Config.Disk || dr.ImageSize != 4<<20 || len(dr.Throughput) != 4 || len(dr.Sync.Cases) != 3 {
		t.Fatalf("--json file: disk: %+v", dr)
	}
	for i, m := range dr.Throughput {
		if m.Mode != []string{"plain", "mirror", "20ms", "20ms"}[i] || m.BackupInMemory != (i == 3) || m.Writes == 0 || m.WritesPerS <= 0 || m.Verified != 1024 || m.Flushes == 0 ||
			m.FsyncUS <= 0 {
			t.Errorf("disk %s: %+v", m.Mode, m)
		}
		if i > 0 && (m.Epochs == 0 || m.DiskWritesEpoch <= 0 || m.DiskKiBEpoch < 4) {
			t.Errorf("disk %s: no mirrored writes: %+v", m.Mode, m)
		}
	}
	for _, m := range dr.Throughput[2:] {
		if m.Track == "" || m.PauseP50US <= 0 || m.WireMBps < m.DiskWireMBps || m.BackupFsyncs == 0 || m.BackupFsyncUS <= 0 {
			t.Errorf("disk 20ms (backup in memory %v): %+v", m.BackupInMemory, m)
		}
	}
	for i, c := range dr.Sync.Cases {
		pct := []int{0, 50, 100}[i]
		if c.IdenticalPct != pct || c.Blocks != 8 || c.Identical != 8*pct/100 || c.Sent != 8-c.Identical ||
			c.Bytes != int64(c.Sent)<<20 || c.WireBytes < uint64(c.Bytes) || c.Precopy <= 0 || c.DiskSync < c.Precopy ||
			c.First < c.DiskSync || c.Durable < c.First || c.BackupFsync <= 0 {
			t.Errorf("disk sync %d%%: %+v", pct, c)
		}
	}
	if dr.Sync.HashSecs <= 0 || dr.Sync.CopySecs <= 0 {
		t.Errorf("disk sync baselines: %+v", dr.Sync)
	}
	// The bench's images are gone.
	if left, _ := filepath.Glob(filepath.Join(os.TempDir(), "repagent-bench-disk-*")); len(left) > 0 {
		t.Errorf("disk images left behind: %v", left)
	}
	nr := res.Net
	if nr == nil || !res.Config.Net || nr.EchoRate != 200 || nr.StreamRate != 100000 || len(nr.Echo) != 2 || len(nr.Stream) != 2 {
		t.Fatalf("--json file: network: %+v", nr)
	}
	for i, e := range nr.Echo {
		if e.Mode != []string{"none", "20ms"}[i] || e.Sent == 0 || e.Answered == 0 || e.RTTP50US <= 0 || e.RTTP99US < e.RTTP50US {
			t.Errorf("echo %s: %+v", e.Mode, e)
		}
	}
	if e := nr.Echo[1]; e.Epochs == 0 || e.PauseP50US <= 0 || e.TransferP50US <= 0 || e.Held < e.Answered || e.HoldP50US <= 0 ||
		e.BoundUS <= 10e3 || e.AddedP50US != e.RTTP50US-nr.Echo[0].RTTP50US {
		t.Errorf("echo 20ms: %+v", e)
	}
	if e := nr.Echo[0]; e.Held != 0 || e.Epochs != 0 {
		t.Errorf("echo none: the gate held %d frames, %d epochs", e.Held, e.Epochs)
	}
	if nr.JobMem != 256<<20 || len(nr.JobShape) != 4 {
		t.Fatalf("--json file: the main job's shape: %+v", nr.JobShape)
	}
	for i, e := range nr.JobShape {
		if e.Mode != []string{"none", "100ms", "20ms", "10ms"}[i] || e.Sent == 0 || e.Answered == 0 || e.RTTP50US <= 0 {
			t.Errorf("main job's shape %s: %+v", e.Mode, e)
		}
		if i == 0 {
			if e.Held != 0 || e.Epochs != 0 {
				t.Errorf("main job's shape, none: the gate held %d frames, %d epochs", e.Held, e.Epochs)
			}
			continue
		}
		// Not Held >= Answered: epochs at full speed grow past the interval,
		// and answers still held when the window's drain gives up pass the
		// gate once replication stops, unheld but answered.
		if e.Epochs == 0 || e.DirtyPages <= 0 || e.PauseP50US <= 0 || e.TransferP50US <= 0 || e.Held == 0 || e.HoldP50US <= 0 ||
			e.BoundUS <= e.IntervalMS*1e3/2 || e.HoldVsBound != e.HoldP50US/e.BoundUS || e.TransferShare != e.TransferP50US/(e.IntervalMS*1e3) ||
			e.AddedP50US != e.RTTP50US-nr.JobShape[0].RTTP50US {
			t.Errorf("main job's shape %s: %+v", e.Mode, e)
		}
	}
	for i, s := range nr.Stream {
		if s.Mode != []string{"none", "20ms"}[i] || s.GuestSent == 0 || s.Received == 0 || s.ClientRate <= 0 {
			t.Errorf("stream %s: %+v", s.Mode, s)
		}
	}
	if s := nr.Stream[1]; s.Epochs == 0 || s.Held == 0 || s.Released == 0 || nr.StreamRatio <= 0 {
		t.Errorf("stream 20ms: %+v, ratio %v", s, nr.StreamRatio)
	}
	// The bench's network is gone.
	if ents, _ := os.ReadDir("/run/netns"); len(ents) > 0 {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), fmt.Sprintf("%s%d-", netlab.Prefix, os.Getpid())) {
				t.Errorf("namespace %s left behind", e.Name())
			}
		}
	}
}

// The capture section measures every pattern, interval and capture, and the
// lazy modes really protect pages; its goal lines are there. It asserts no
// timing.
func TestCaptureSection(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	settle := captureAutoSettle
	captureAutoSettle = 0 // the shape of the section, not auto's settled figures
	t.Cleanup(func() { captureAutoSettle = settle })
	b := &runner{Options: &Options{Mem: 64 << 20, ModeTime: 200 * time.Millisecond, DirtyTrack: dirtylog.Auto, Quiet: true}}
	b.log = slog.New(slog.DiscardHandler)
	cr, err := b.measureCapture(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	printCapture(&out, cr)
	t.Logf("\n%s", out.String())
	if len(cr.Cases) != len(capturePatterns)*len(captureIntervals) {
		t.Fatalf("%d cases", len(cr.Cases))
	}
	for _, cc := range cr.Cases {
		for _, m := range cc.Modes {
			if m.Mode.Epochs == 0 {
				t.Errorf("%s at %vms, %s: no epochs measured", cc.Pattern, cc.IntervalMS, m.Capture)
			}
			if m.Capture == "lazy" && m.LazyShare == 0 {
				t.Errorf("%s at %vms: lazy capture protected nothing", cc.Pattern, cc.IntervalMS)
			}
			if m.Capture == "eager" && m.LazyShare != 0 {
				t.Errorf("%s at %vms: eager capture protected pages", cc.Pattern, cc.IntervalMS)
			}
		}
	}
	goals := captureGoals(cr)
	if len(goals) != len(cr.Cases)+2*len(captureIntervals) {
		t.Errorf("%d goal lines: %v", len(goals), goals)
	}
}

// The link section replicates over plaintext and over TLS, and both modes
// acknowledge epochs and spend engine CPU on the pages. It asserts no
// timing.
func TestLinkSection(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	b := &runner{Options: &Options{Mem: 64 << 20, VCPUs: 1, Pattern: testvm.Random, ModeTime: 300 * time.Millisecond, DirtyTrack: dirtylog.Auto, Quiet: true}}
	b.log = slog.New(slog.DiscardHandler)
	lr, err := b.measureLink(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	printLink(&out, lr)
	t.Logf("\n%s", out.String())
	if len(lr.Links) != 2 || lr.Links[0].Link != "plaintext" || lr.Links[1].Link != "tls" {
		t.Fatalf("links %+v", lr.Links)
	}
	for _, l := range lr.Links {
		if l.Mode.Epochs == 0 || l.Mode.WireMBps == 0 || l.Mode.CPUPageUS == 0 {
			t.Errorf("%s: %d epochs, %.0f MB/s on the wire, %.2f µs CPU a page", l.Link, l.Mode.Epochs, l.Mode.WireMBps, l.Mode.CPUPageUS)
		}
	}
}
