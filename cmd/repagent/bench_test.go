package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/netlab"
	"github.com/repagent/repagent/internal/privileged"
)

func TestParseBenchArgsDefaults(t *testing.T) {
	o, err := parseBenchArgs(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.mem != 256<<20 || o.vcpus != 1 || len(o.rates) != 3 || o.rates[0] != 10000 || o.rates[1] != 50000 || o.rates[2] != 0 ||
		o.pattern.String() != "random" || len(o.intervals) != 3 || o.intervals[0] != 100*time.Millisecond ||
		o.intervals[1] != 20*time.Millisecond || o.intervals[2] != 10*time.Millisecond || o.modeTime != 3*time.Second ||
		o.failovers != 5 || o.mech.String() != "auto" || o.heartbeatTimeout != 0 || o.quiet || o.json != "" ||
		!o.net || o.echoRate != 200 || o.streamRate != 100000 || !o.disk || o.diskSize != 64<<20 || o.diskSyncSize != 1<<30 ||
		!slices.Equal(o.failoverSizes, []uint64{256 << 20, 4 << 30}) || !o.sync || !slices.Equal(o.syncSizes, []uint64{1 << 30, 4 << 30}) {
		t.Errorf("defaults: %+v", o)
	}
	o, err = parseBenchArgs([]string{"--rates", " 5, 0 ", "--intervals", "5ms,10s", "--mem", "64M", "--vcpus", "2",
		"--pattern", "seq", "--mode-time", "1s", "--failovers", "0", "--dirty-track", "ring", "--heartbeat-timeout", "2s", "--quiet",
		"--no-net", "--echo-rate", "50", "--stream-rate", "1000", "--no-disk", "--disk-size", "8M", "--disk-sync-size", "16M",
		"--failover-sizes", "32M, 1G", "--no-sync", "--sync-sizes", "64M"})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.rates) != 2 || o.rates[0] != 5 || o.rates[1] != 0 || len(o.intervals) != 2 || o.intervals[0] != 5*time.Millisecond ||
		o.intervals[1] != 10*time.Second || o.mem != 64<<20 || o.vcpus != 2 || o.pattern.String() != "seq" || o.modeTime != time.Second ||
		o.failovers != 0 || o.mech.String() != "ring" || o.heartbeatTimeout != 2*time.Second || !o.quiet ||
		o.net || o.echoRate != 50 || o.streamRate != 1000 || o.disk || o.diskSize != 8<<20 || o.diskSyncSize != 16<<20 ||
		!slices.Equal(o.failoverSizes, []uint64{32 << 20, 1 << 30}) || o.sync || !slices.Equal(o.syncSizes, []uint64{64 << 20}) {
		t.Errorf("parsed: %+v", o)
	}
}

// Usage errors exit with 2 and name the flag at fault.
func TestBenchUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--rates", "10k"}, `--rates "10k": "10k" is not a rate`},
		{[]string{"--rates", ""}, `--rates "": "" is not a rate`},
		{[]string{"--rates", "100,,0"}, `--rates "100,,0": "" is not a rate`},
		{[]string{"--rates", "-5"}, `--rates "-5"`},
		{[]string{"--intervals", "1ms"}, `--intervals "1ms": 1ms is out of range (5ms to 10s)`},
		{[]string{"--intervals", "100ms,11s"}, `--intervals "100ms,11s": 11s is out of range (5ms to 10s)`},
		{[]string{"--intervals", "100"}, `--intervals "100": "100" is not a duration`},
		{[]string{"--intervals", "4.9ms"}, "out of range"},
		{[]string{"--mode-time", "50ms"}, "--mode-time 50ms: want at least 100ms"},
		{[]string{"--failovers", "-1"}, "--failovers -1"},
		{[]string{"--mem", "3M"}, "--mem 3M"},
		{[]string{"--mem", "12X"}, "--mem: size"},
		{[]string{"--vcpus", "5"}, "--vcpus 5"},
		{[]string{"--pattern", "zigzag"}, "--pattern"},
		{[]string{"--dirty-track", "magic"}, "--dirty-track"},
		{[]string{"--heartbeat-timeout", "100ms"}, "--heartbeat-timeout 100ms"},
		{[]string{"--echo-rate", "0"}, "--echo-rate 0: want 1 to 10000 requests per second"},
		{[]string{"--echo-rate", "10001"}, "--echo-rate 10001: want 1 to 10000"},
		{[]string{"--stream-rate", "0"}, "--stream-rate 0: want at least 1 datagram per second"},
		{[]string{"--disk-size", "512K"}, "--disk-size 512KiB: want a multiple of 4KiB, at least 1MiB"},
		{[]string{"--disk-size", "1049600"}, "--disk-size 1025KiB: want a multiple of 4KiB"},
		{[]string{"--disk-size", "lots"}, "--disk-size: size"},
		{[]string{"--disk-size", "4G", "--mem", "8M"}, "--disk-size 4GiB with --mem 8MiB: invalid VM config"},
		{[]string{"--disk-sync-size", "1M"}, "--disk-sync-size 1MiB: want a multiple of 1MiB, at least 2MiB"},
		{[]string{"--disk-sync-size", "3000K"}, "--disk-sync-size 3000KiB: want a multiple of 1MiB"},
		{[]string{"--failover-sizes", "3M"}, `--failover-sizes "3M": `},
		{[]string{"--failover-sizes", "256M,"}, `--failover-sizes "256M,": size "": no number`},
		{[]string{"--failover-sizes", "255M"}, "not a multiple of 2 MiB"},
		{[]string{"--sync-sizes", "1G,lots"}, `--sync-sizes "1G,lots": size "lots"`},
		{[]string{"--sync-sizes", "128G"}, `--sync-sizes "128G": `},
		{[]string{"--json", "/no/such/dir/out.json"}, "--json /no/such/dir/out.json: directory /no/such/dir does not exist"},
		{[]string{"--bogus"}, "unknown flag: --bogus"},
		{[]string{"extra"}, `unexpected argument "extra"`},
	} {
		checkUsageError(t, runBench, "repagent bench: ", tc.args, tc.want)
	}
}

func TestBenchHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := runBench([]string{"--help"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	for _, flag := range []string{"--mem", "--vcpus", "--rates", "--pattern", "--intervals", "--mode-time", "--failovers",
		"--dirty-track", "--heartbeat-timeout", "--no-net", "--echo-rate", "--stream-rate", "--no-disk", "--disk-size", "--disk-sync-size",
		"--failover-sizes", "--no-sync", "--sync-sizes", "--quiet", "--json"} {
		if !strings.Contains(stdout.String(), flag) {
			t.Errorf("--help does not document %s:\n%s", flag, stdout.String())
		}
	}
}

func TestBenchTable(t *testing.T) {
	var b bytes.Buffer
	benchTable(&b, []string{"mode", "x"}, [][]string{{"none", "1.23M"}, {"replicated 10ms", "5µs"}})
	want := "| mode            |     x |\n" +
		"| --------------- | ----: |\n" +
		"| none            | 1.23M |\n" +
		"| replicated 10ms |   5µs |\n"
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

func TestBenchMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []time.Duration
		want time.Duration
	}{{nil, 0}, {[]time.Duration{3}, 3}, {[]time.Duration{5, 1, 3}, 3}, {[]time.Duration{4, 1, 3, 2}, 2}} {
		if got := benchMedian(tc.in); got != tc.want {
			t.Errorf("median %v = %v, want %v", tc.in, got, tc.want)
		}
	}
}

// The network goal: added p50 against interval/2 + pause p50 + transfer p50 +
// 1 ms, with the numbers in the line.
func TestBenchNetGoals(t *testing.T) {
	for _, tc := range []struct {
		name     string
		echo     benchEchoMode
		wantMet  bool
		wantText string
	}{
		{name: "under", echo: benchEchoMode{Mode: "20ms", AddedP50US: 10900, RTTP50US: 11000, BoundUS: 11300,
			benchNetEpochs: benchNetEpochs{Epochs: 50, PauseP50US: 200, TransferP50US: 100}}, wantMet: true,
			wantText: "echo added latency at 20ms: p50 10.90 ms (rtt p50 11.00 ms, 0.10 ms without replication) " +
				"(goal <= 20ms/2 + pause p50 0.20 ms + transfer p50 0.10 ms + 1 ms = 11.30 ms): MET"},
		{name: "over", echo: benchEchoMode{Mode: "10ms", AddedP50US: 7500, RTTP50US: 7600, BoundUS: 6200,
			benchNetEpochs: benchNetEpochs{Epochs: 50, PauseP50US: 150, TransferP50US: 50}},
			wantText: "echo added latency at 10ms: p50 7.50 ms (rtt p50 7.60 ms, 0.10 ms without replication) " +
				"(goal <= 10ms/2 + pause p50 0.15 ms + transfer p50 0.05 ms + 1 ms = 6.20 ms): NOT MET"},
		{name: "no epochs", echo: benchEchoMode{Mode: "10ms", AddedP50US: 100, RTTP50US: 200, BoundUS: 6000},
			wantText: "echo added latency at 10ms: p50 0.10 ms (rtt p50 0.20 ms, 0.10 ms without replication) " +
				"(goal <= 10ms/2 + pause p50 0.00 ms + transfer p50 0.00 ms + 1 ms = 6.00 ms): NOT MET"},
	} {
		nr := &benchNetResult{Echo: []*benchEchoMode{{Mode: "none", RTTP50US: 100}, &tc.echo}}
		verdict := func(ok bool) string {
			if ok {
				return "MET"
			}
			return "NOT MET"
		}
		g := netGoals(nr, verdict)
		if len(g) != 1 || g[0].Met != tc.wantMet || g[0].Text != tc.wantText {
			t.Errorf("%s: got %+v\nwant met %v, %q", tc.name, g, tc.wantMet, tc.wantText)
		}
	}
}

// The pause goals: the 10k check's copy per page, one goroutine over the
// default, and the moderate rate's p99 over p50, with the numbers in the line.
func TestBenchPauseGoals(t *testing.T) {
	verdict := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "NOT MET"
	}
	for _, tc := range []struct {
		name     string
		copy     benchCopyCheck
		wantMet  bool
		wantText string
	}{
		{name: "faster", copy: benchCopyCheck{DefaultPageUS: 0.2, DefaultThreads: 2, OnePageUS: 0.3, Speedup: 1.5}, wantMet: true,
			wantText: "pause copy per page at 10k dirty pages: default 0.200 µs (2.00 goroutines on average), one goroutine 0.300 µs = 1.50x (goal default >= 1.3x faster): MET"},
		{name: "same", copy: benchCopyCheck{DefaultPageUS: 0.3, DefaultThreads: 1, OnePageUS: 0.3, Speedup: 1},
			wantText: "pause copy per page at 10k dirty pages: default 0.300 µs (1.00 goroutines on average), one goroutine 0.300 µs = 1.00x (goal default >= 1.3x faster): NOT MET"},
		{name: "no epochs", wantText: "pause copy per page at 10k dirty pages: not measured (no epochs) (goal default >= 1.3x faster): NOT MET"},
	} {
		if g := copyGoal(tc.copy, verdict); g.Met != tc.wantMet || g.Text != tc.wantText {
			t.Errorf("copy, %s: got %+v\nwant met %v, %q", tc.name, g, tc.wantMet, tc.wantText)
		}
	}
	for _, tc := range []struct {
		name     string
		tails    *benchTailsResult
		wantMet  bool
		wantText string
	}{
		{name: "under", tails: &benchTailsResult{Mode: &benchMode{Epochs: 30, PauseP50US: 1000, PauseP99US: 1800}, Ratio: 1.8}, wantMet: true,
			wantText: "pause p99 at 20000/s over 64MiB, 100ms: 1.80 ms = 1.80x p50 1.00 ms (goal <= 2x p50): MET"},
		{name: "over", tails: &benchTailsResult{Mode: &benchMode{Epochs: 30, PauseP50US: 1000, PauseP99US: 2500}, Ratio: 2.5},
			wantText: "pause p99 at 20000/s over 64MiB, 100ms: 2.50 ms = 2.50x p50 1.00 ms (goal <= 2x p50): NOT MET"},
		{name: "no epochs", tails: &benchTailsResult{Mode: &benchMode{}},
			wantText: "pause p99 at 20000/s over 64MiB, 100ms: not measured (no epochs) (goal <= 2x p50): NOT MET"},
	} {
		if g := tailsGoal(tc.tails, verdict); g.Met != tc.wantMet || g.Text != tc.wantText {
			t.Errorf("tails, %s: got %+v\nwant met %v, %q", tc.name, g, tc.wantMet, tc.wantText)
		}
	}
}

// The main job's shape's goals: hold p50 against interval/2 + pause p50 +
// transfer p50 + 1 ms, and transfer p50 against 10% of the interval.
func TestBenchJobShapeGoals(t *testing.T) {
	verdict := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "NOT MET"
	}
	nr := &benchNetResult{JobShape: []*benchEchoMode{{Mode: "none", RTTP50US: 200},
		{Mode: "100ms", IntervalMS: 100, RTTP50US: 52000, BoundUS: 54000, benchGateWindow: benchGateWindow{HoldP50US: 51000}, HoldVsBound: 51000.0 / 54000, TransferShare: 0.02,
			benchNetEpochs: benchNetEpochs{Epochs: 30, DirtyPages: 2000, PauseP50US: 1000, TransferP50US: 2000}},
		{Mode: "10ms", IntervalMS: 10, RTTP50US: 12000, BoundUS: 8500, benchGateWindow: benchGateWindow{HoldP50US: 11000}, HoldVsBound: 11000.0 / 8500, TransferShare: 0.2,
			benchNetEpochs: benchNetEpochs{Epochs: 300, DirtyPages: 900, PauseP50US: 500, TransferP50US: 2000}},
	}}
	want := []benchGoal{
		{Met: true, Text: "main job's shape at 100ms: hold p50 51.00 ms (client rtt p50 52.00 ms) = 0.94x the prediction " +
			"(goal <= 100ms/2 + pause p50 1.00 ms + transfer p50 2.00 ms + 1 ms = 54.00 ms): MET"},
		{Met: true, Text: "main job's shape at 100ms: transfer p50 2.00 ms = 2.0% of the interval, 2000 dirty pages/epoch (goal <= 10%): MET"},
		{Text: "main job's shape at 10ms: hold p50 11.00 ms (client rtt p50 12.00 ms) = 1.29x the prediction " +
			"(goal <= 10ms/2 + pause p50 0.50 ms + transfer p50 2.00 ms + 1 ms = 8.50 ms): NOT MET"},
		{Text: "main job's shape at 10ms: transfer p50 2.00 ms = 20.0% of the interval, 900 dirty pages/epoch (goal <= 10%): NOT MET"},
	}
	if got := jobShapeGoals(nr, verdict); !slices.Equal(got, want) {
		t.Errorf("got\n%+v\nwant\n%+v", got, want)
	}
}

// The failover's size goal judges what follows detection: the same at both
// sizes (within 25% or 10 ms) and at most 60 ms; detection is only shown.
func TestBenchFailoverSizeGoal(t *testing.T) {
	verdict := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "NOT MET"
	}
	const goal = "(goal after detection: the same at both, within 25% or 10 ms, and <= 60 ms)"
	for _, tc := range []struct {
		name         string
		first, last  benchFailoverSize
		wantMet      bool
		wantContains string
	}{
		{name: "same, slow detection", first: benchFailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 20, DetectP50MS: 12, AfterP50MS: 8},
			last: benchFailoverSize{Mem: 4 << 30, Kills: 5, KillP50MS: 180, DetectP50MS: 165, AfterP50MS: 15}, wantMet: true,
			wantContains: "failover at 4GiB vs 256MiB: p50 180 ms / 20 ms = 9.00x (detection 165 ms / 12 ms), after detection 15.0 ms / 8.0 ms = 1.88x " + goal + ": MET"},
		{name: "grows", first: benchFailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 40, AfterP50MS: 30},
			last:         benchFailoverSize{Mem: 4 << 30, Kills: 5, KillP50MS: 60, AfterP50MS: 45},
			wantContains: "after detection 45.0 ms / 30.0 ms = 1.50x " + goal + ": NOT MET"},
		{name: "over 60 ms", first: benchFailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 80, AfterP50MS: 70},
			last: benchFailoverSize{Mem: 4 << 30, Kills: 5, KillP50MS: 80, AfterP50MS: 70}, wantContains: ": NOT MET"},
		{name: "skipped", first: benchFailoverSize{Mem: 256 << 20, Kills: 5, KillP50MS: 20, AfterP50MS: 8},
			last:         benchFailoverSize{Mem: 4 << 30, Skipped: "needs about 12GiB"},
			wantContains: "failover at 4GiB vs 256MiB: not measured (a size was skipped or failed) " + goal + ": NOT MET"},
	} {
		fo := &benchFailoverResult{Sizes: []benchFailoverSize{tc.first, tc.last}}
		if tc.first.Kills > 0 && tc.last.Kills > 0 {
			fo.SizeRatio = tc.last.KillP50MS / tc.first.KillP50MS
			fo.AfterRatio = tc.last.AfterP50MS / tc.first.AfterP50MS
		}
		g := failoverSizeGoal(fo, verdict)
		if g.Met != tc.wantMet || !strings.Contains(g.Text, tc.wantContains) {
			t.Errorf("%s: got %+v\nwant met %v, containing %q", tc.name, g, tc.wantMet, tc.wantContains)
		}
	}
}

// The plain copies that serve as floors copy what they say and take time.
func TestBenchCopyFloors(t *testing.T) {
	b := &benchRun{benchOptions: &benchOptions{}}
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

// TestBenchSmoke runs the whole bench with tiny settings and checks that
// every table, mode, failover, network row and goal line is there, and that
// the network's figures are not empty. It asserts no timing.
func TestBenchSmoke(t *testing.T) {
	privileged.Require(t, privileged.KVM, privileged.Root, privileged.NetAdmin)
	benchExecutable = buildRepagent(t)
	defer func() { benchExecutable = "" }()
	js := filepath.Join(t.TempDir(), "bench.json")
	var stdout, stderr bytes.Buffer
	code := runBench([]string{"--mem", "32M", "--rates", "20000", "--intervals", "20ms", "--mode-time", "300ms", "--failovers", "1",
		"--failover-sizes", "32M,64M", "--sync-sizes", "64M", "--disk-size", "4M", "--disk-sync-size", "8M", "--json", js}, &stdout, &stderr)
	out := stdout.String()
	t.Logf("stdout:\n%s\nstderr:\n%s", out, stderr.String())
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, re := range []string{
		`(?m)^Rate 20000/s per vCPU:$`,
		`(?m)^\| mode +\| +track \| guest writes/s \| vs floor \| vs none \| epochs \| pause p50 \|`,
		`(?m)^\| none +\| +off \| +\S+ \| +[\d.]+ \| +1\.00 \|`,
		`(?m)^\| floor +\| +\w+ \| +\S+ \| +1\.00 \| +[\d.]+ \|`,
		`(?m)^\| replicated 20ms +\| +\w+ \| +\S+ \| +[\d.]+ \| +[\d.]+ \| +\d+ \|`,
		`(?m)^Engine CPU per dirty page \(primary: pause, copy, workers, sender; backup: receive, check, apply\), against a plain copy`,
		`(?m)^\| mode +\| dirty pages/epoch \| primary/page \| backup/page \| plain copy/page \| primary/copy \| backup/copy \|$`,
		`(?m)^\| replicated 20ms +\| +\d+ \| +[\d.]+ µs \| +[\d.]+ µs \| +[\d.]+ µs \| +[\d.]+ \| +[\d.]+ \|$`,
		`(?m)^engine CPU per page: primary [\d.]+ µs \([\d.]+x a plain copy of \d+ scattered pages, [\d.]+ µs\), backup [\d.]+ µs \([\d.]+x\)$`,
		`(?m)^10k check: seq over 10000 pages, full speed, 300ms, 64MiB, 1 vCPU, \d+ epochs:$`,
		`(?m)^\| dirty pages/epoch \| +pause p50 \| +pause p99 \| kick\+harvest\+save\+copy p50 \| p99 / \(k\+h\+s\+c\) \|`,
		`(?m)^10k check, the pause's copy: the engine's default copy goroutines against one \(copy threads 1\), the same guest and interval:$`,
		`(?m)^\| copy +\| epochs \| dirty pages/epoch \| goroutines \(mean\) \| copy mean \| copy/page \| pause p50 \| pause p99 \|$`,
		`(?m)^\| default +\| +\d+ \| +\d+ \| +[\d.]+ \| +\S+ \| +[\d.]+ µs \| +\S+ \| +\S+ \|$`,
		`(?m)^\| one goroutine +\| +\d+ \| +\d+ \| +1\.00 \| +\S+ \| +[\d.]+ µs \| +\S+ \| +\S+ \|$`,
		`(?m)^pause copy per page: default [\d.]+ µs, one goroutine [\d.]+ µs: one / default = [\d.]+x$`,
		`(?m)^Pause tails at a moderate rate: the dirty workload at 20000/s, random over 16384 pages \(64MiB\), 1 vCPU, 128MiB, replicated at 100ms, \d+ epochs:$`,
		`(?m)^\| dirty pages/epoch \| pause p50 \| pause p99 \| p99 / p50 \| pause max \|`,
		`(?m)^\| \d+ +\| +\S+ \| +\S+ \| +[\d.]+ \| +\S+ \| +\S+ \| +\S+ \| +\S+ \| +\S+ \| +\S+ \| +\S+ \| +\S+ \| +\S+ \|$`,
		`(?m)^Failover: primary process at rate 20000/s, interval 100ms, backup heartbeat timeout \S+:$`,
		`(?m)^\| run \| +mem \| +signal \| epoch \| detect ms \| verify ms \| restore ms \| first write ms \| after detect ms \| total ms \|$`,
		`(?m)^\| 1 +\| 32MiB \| +SIGKILL \| +\d+ \| +[\d.]+ \| +0\.0 \|`,
		`(?m)^\| 2 +\| 32MiB \| +SIGSTOP \| +\d+ \|`,
		`(?m)^\| 3 +\| 32MiB \| SIGKILL, verify \| +\d+ \| +[\d.]+ \| +[\d.]+ \|`,
		`(?m)^\| 4 +\| 64MiB \| +SIGKILL \| +\d+ \|`,
		`(?m)^\| 5 +\| 64MiB \| SIGKILL, verify \| +\d+ \|`,
		`(?m)^failover \(SIGKILL\) at 32MiB: p50 \d+ ms, max \d+ ms over 1 runs; p50 detection [\d.]+ ms, after it [\d.]+ ms; ` +
			`frozen \(SIGSTOP\): timeout \S+ \+ -?\d+ ms; with --verify-replica \d+ ms \(digest [\d.]+ ms\)$`,
		`(?m)^failover \(SIGKILL\) at 64MiB: p50 \d+ ms, max \d+ ms over 1 runs; p50 detection [\d.]+ ms, after it [\d.]+ ms; ` +
			`with --verify-replica \d+ ms \(digest [\d.]+ ms\)$`,
		`(?m)^failover 64MiB / 32MiB: p50 \d+ ms / \d+ ms = [\d.]+x; detection [\d.]+ ms / [\d.]+ ms; after detection [\d.]+ ms / [\d.]+ ms = [\d.]+x$`,
		`(?m)^Initial sync of a large guest: the dirty workload at full speed \(random pattern, stamp pages\), 2 vCPUs, replicated at 100ms `,
		`(?m)^\| guest +\| +track \| plain copy \| copy MB/s \| first touch \| time to protected \| vs copy \| +sync \| rounds \| +ended \|`,
		`(?m)^\| 64MiB +\| +\w+ \| +\S+ \| +\d+ \| +\S+ \| +\S+ \| +[\d.]+ \| +\S+ \| +\d+ \| +(converged|rounds stopped shrinking|round limit|throttle limit) \| +\d+% \| +\S+ \| +\d+ \| +\S+ \| +\d+ \| +\S+ \| +[\d.]+ \| +\S+ \|$`,
		`(?m)^  engine CPU per page, rate 20000/s, stamp pages: primary [\d.]+ µs at 20ms \([\d.]+x a plain copy\), backup [\d.]+ µs at 20ms \([\d.]+x\), ` +
			`worst of the replicated modes \(goal primary <= 3 µs, backup <= 2 µs\): (MET|NOT MET)$`,
		`(?m)^  failover at 64MiB vs 32MiB: p50 \d+ ms / \d+ ms = [\d.]+x \(detection \d+ ms / \d+ ms\), after detection [\d.]+ ms / [\d.]+ ms = [\d.]+x ` +
			`\(goal after detection: the same at both, within 25% or 10 ms, and <= 60 ms\): (MET|NOT MET)$`,
		`(?m)^  time to protected, 64MiB guest: \S+ = [\d.]+x a plain copy of its memory over loopback TCP \(\S+\) \(goal <= 2x\): (MET|NOT MET)$`,
		`(?m)^  pause p99 at 10k dirty pages \(\d+/epoch\): [\d.]+ ms = [\d.]+x kick\+harvest\+save\+copy \(goal <= 1\.5x\): (MET|NOT MET)$`,
		`(?m)^  pause copy per page at 10k dirty pages: default [\d.]+ µs \([\d.]+ goroutines on average\), one goroutine [\d.]+ µs = [\d.]+x ` +
			`\(goal default >= 1\.3x faster\): (MET|NOT MET)$`,
		`(?m)^  pause p99 at 20000/s over 64MiB, 100ms: [\d.]+ ms = [\d.]+x p50 [\d.]+ ms \(goal <= 2x p50\): (MET|NOT MET)$`,
		`(?m)^  guest at 100 ms, rate 20000/s: not measured \(100ms is not in --intervals\): NOT MET$`,
		`(?m)^  failover at 32MiB: \d+ ms p50 \(goal <= 500 ms \+ heartbeat timeout \S+ = \d+ ms\): (MET|NOT MET)$`,
		`(?m)^  failover of a frozen primary: timeout \S+ \+ -?\d+ ms \(goal <= 500 ms \+ the timeout\): (MET|NOT MET)$`,
		`(?m)^Disk write throughput: disk workload \(.*\), 4MiB image, 1 vCPU, 32MiB; each mode 300ms after the first sweep and a 200ms warm-up:$`,
		`(?m)^\| mode +\| +track \| block writes/s \| MiB/s \| vs plain \| fsyncs/s \| fsync mean \| in fsync \| verified \| epochs \| disk writes/epoch \|`,
		`(?m)^\| plain image +\| +- \| +\S+ \| +[\d.]+ \| +1\.00 \| +\S+ \| +\S+ \| +\d+% \| +1024 \| +- \|`,
		`(?m)^\| mirror, no backup +\| +- \| +\S+ \| +[\d.]+ \| +[\d.]+ \| +\S+ \| +\S+ \| +\d+% \| +1024 \| +\d+ \| +\d+ \| +\d+ \| +[\d.]+ \| +- \|`,
		`(?m)^\| replicated 20ms +\| +\w+ \| +\S+ \| +[\d.]+ \| +[\d.]+ \| +\S+ \| +\S+ \| +\d+% \| +1024 \| +\d+ \| +\d+ \| +\d+ \| +[\d.]+ \| +\S+ \| +\S+ \| +[\d.]+ \| +\S+ \| +\S+ \| +\S+ \|$`,
		`(?m)^\| replicated 20ms, backup in RAM +\| +\w+ \| +\S+ \| +[\d.]+ \| +[\d.]+ \| +\S+ \| +\S+ \| +\d+% \| +1024 \| +\d+ \|`,
		`(?m)^Initial disk sync: 8MiB image of random blocks, 1MiB sync blocks, idle 1-vCPU guest \(32MiB\), interval 20ms, over loopback TCP\.$`,
		`(?m)^Baselines: hashing the image \S+ \(\d+ MB/s\); a plain copy over loopback TCP \S+ \(\d+ MB/s\)\.$`,
		`(?m)^\| identical \| blocks \| held \| sent \| wire MiB \| hash wait \| precopy \| precopy MB/s \| disk sync \| vs copy \|`,
		`(?m)^\| 0% +\| +8 \| +0 \| +8 \| +8\.\d \|`,
		`(?m)^\| 50% +\| +8 \| +4 \| +4 \| +4\.\d \|`,
		`(?m)^\| 100% +\| +8 \| +8 \| +0 \| +0\.\d \|`,
		`(?m)^Output commit \(network\): udp-echo, 1 vCPU, 32MiB, 200 requests/s for 300ms per mode:$`,
		`(?m)^\| mode +\| requests \| answered \| rtt p50 \| rtt p99 \| added p50 \| epochs \| pause p50 \| transfer p50 \| ack p50 \| held \| hold p50 \| hold p99 \| goal bound \|$`,
		`(?m)^\| none +\| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +- \| +- \|`,
		`(?m)^\| replicated 20ms +\| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +\S+ \| +\d+ \| +\S+ \| +\S+ \| +\S+ \| +\d+ \|`,
		`(?m)^Output commit with the main job's shape: the dirty workload at full speed \(random, stamp pages\) and udp-echo on vCPU 0, 1 vCPU, 256MiB, ` +
			`200 requests/s for 300ms per mode; prediction = interval/2 \+ pause p50 \+ transfer p50 \+ 1 ms:$`,
		`(?m)^\| mode +\| requests \| answered \| rtt p50 \| rtt p99 \| added p50 \| epochs \| dirty pages/epoch \| pause p50 \| transfer p50 \| ` +
			`transfer/interval \| ack p50 \| held \| hold p50 \| prediction \| hold/prediction \|$`,
		`(?m)^\| none +\| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +- \| +- \| +- \| +- \| +- \| +- \| +- \| +\d+ \| +- \| +- \| +- \|$`,
		`(?m)^\| replicated 100ms +\| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +\S+ \| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +[\d.]+% \| +\S+ \| +\d+ \| +\S+ \| +\S+ \| +[\d.]+ \|$`,
		`(?m)^\| replicated 20ms +\| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +\S+ \| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +[\d.]+% \| +\S+ \| +\d+ \| +\S+ \| +\S+ \| +[\d.]+ \|$`,
		`(?m)^\| replicated 10ms +\| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +\S+ \| +\d+ \| +\d+ \| +\S+ \| +\S+ \| +[\d.]+% \| +\S+ \| +\d+ \| +\S+ \| +\S+ \| +[\d.]+ \|$`,
		`(?m)^Held-frame throughput: udp-stream, 64-byte datagrams at up to 100000/s, 300ms per mode:$`,
		`(?m)^\| mode +\| guest sent/s \| client frames/s \| vs none \| client lost \| +held \| released \| dropped \|`,
		`(?m)^\| none +\| +\S+ \| +\S+ \| +1\.00 \| +\d+ \| +0 \|`,
		`(?m)^\| replicated 20ms +\| +\S+ \| +\S+ \| +[\d.]+ \| +\d+ \| +\d+ \| +\d+ \| +\d+ \| +\d+ \|`,
		`(?m)^held-frame throughput: \S+ frames/s replicated at 20ms, [\d.]+ of \S+ frames/s without replication$`,
		`(?m)^  echo added latency at 20ms: p50 -?[\d.]+ ms \(rtt p50 [\d.]+ ms, [\d.]+ ms without replication\) ` +
			`\(goal <= 20ms/2 \+ pause p50 [\d.]+ ms \+ transfer p50 [\d.]+ ms \+ 1 ms = [\d.]+ ms\): (MET|NOT MET)$`,
		`(?m)^  main job's shape at 100ms: hold p50 [\d.]+ ms \(client rtt p50 [\d.]+ ms\) = [\d.]+x the prediction ` +
			`\(goal <= 100ms/2 \+ pause p50 [\d.]+ ms \+ transfer p50 [\d.]+ ms \+ 1 ms = [\d.]+ ms\): (MET|NOT MET)$`,
		`(?m)^  main job's shape at 10ms: transfer p50 [\d.]+ ms = [\d.]+% of the interval, \d+ dirty pages/epoch \(goal <= 10%\): (MET|NOT MET)$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("output lacks %s", re)
		}
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var res benchResults
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("--json file: %v\n%s", err, b)
	}
	if len(res.Rates) != 1 || len(res.Rates[0].Modes) != 3 || res.Failover == nil || len(res.Failover.Runs) != 5 || len(res.Goals) != 16 {
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
