package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

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
		o.failovers != 5 || o.mech.String() != "auto" || o.heartbeatTimeout != 0 || o.quiet || o.json != "" {
		t.Errorf("defaults: %+v", o)
	}
	o, err = parseBenchArgs([]string{"--rates", " 5, 0 ", "--intervals", "5ms,10s", "--mem", "64M", "--vcpus", "2",
		"--pattern", "seq", "--mode-time", "1s", "--failovers", "0", "--dirty-track", "ring", "--heartbeat-timeout", "2s", "--quiet"})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.rates) != 2 || o.rates[0] != 5 || o.rates[1] != 0 || len(o.intervals) != 2 || o.intervals[0] != 5*time.Millisecond ||
		o.intervals[1] != 10*time.Second || o.mem != 64<<20 || o.vcpus != 2 || o.pattern.String() != "seq" || o.modeTime != time.Second ||
		o.failovers != 0 || o.mech.String() != "ring" || o.heartbeatTimeout != 2*time.Second || !o.quiet {
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
		"--dirty-track", "--heartbeat-timeout", "--quiet", "--json"} {
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

// TestBenchSmoke runs the whole bench with tiny settings and checks that
// every table, mode, failover and goal line is there. It asserts no timing.
func TestBenchSmoke(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	benchExecutable = buildRepagent(t)
	defer func() { benchExecutable = "" }()
	js := filepath.Join(t.TempDir(), "bench.json")
	var stdout, stderr bytes.Buffer
	code := runBench([]string{"--mem", "32M", "--rates", "20000", "--intervals", "20ms", "--mode-time", "300ms", "--failovers", "1",
		"--json", js}, &stdout, &stderr)
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
		`(?m)^10k check: seq over 10000 pages, full speed, 300ms, 64MiB, 1 vCPU, \d+ epochs:$`,
		`(?m)^\| dirty pages/epoch \| +pause p50 \| +pause p99 \| harvest\+save\+copy p50 \|`,
		`(?m)^Failover: primary process at rate 20000/s, interval 100ms, backup heartbeat timeout \S+:$`,
		`(?m)^\| 1 +\| +SIGKILL \| +\d+ \|`,
		`(?m)^\| 2 +\| +SIGSTOP \| +\d+ \|`,
		`(?m)^failover \(SIGKILL\): p50 \d+ ms, max \d+ ms over 1 runs; frozen \(SIGSTOP\): timeout \S+ \+ -?\d+ ms$`,
		`(?m)^  pause p99 at 10k dirty pages \(\d+/epoch\): [\d.]+ ms = [\d.]+x harvest\+save\+copy \(goal <= 2x\): (MET|NOT MET)$`,
		`(?m)^  guest at 100 ms, rate 20000/s: not measured \(100ms is not in --intervals\): NOT MET$`,
		`(?m)^  failover: \d+ ms p50 \(goal <= 500 ms \+ heartbeat timeout \S+ = \d+ ms\): (MET|NOT MET)$`,
		`(?m)^  failover of a frozen primary: timeout \S+ \+ -?\d+ ms \(goal <= 500 ms \+ the timeout\): (MET|NOT MET)$`,
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
	if len(res.Rates) != 1 || len(res.Rates[0].Modes) != 3 || res.Failover == nil || len(res.Failover.Runs) != 2 || len(res.Goals) != 4 {
		t.Errorf("--json file: %s", b)
	}
	for _, m := range res.Rates[0].Modes {
		if m.Writes == 0 {
			t.Errorf("mode %s: the guest wrote nothing", m.Mode)
		}
	}
}
