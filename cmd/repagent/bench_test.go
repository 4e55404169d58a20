package main

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseBenchArgsDefaults(t *testing.T) {
	o, err := parseBenchArgs(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.Mem != 256<<20 || o.VCPUs != 1 || len(o.Rates) != 3 || o.Rates[0] != 10000 || o.Rates[1] != 50000 || o.Rates[2] != 0 ||
		o.Pattern.String() != "random" || len(o.Intervals) != 3 || o.Intervals[0] != 100*time.Millisecond ||
		o.Intervals[1] != 20*time.Millisecond || o.Intervals[2] != 10*time.Millisecond || o.ModeTime != 3*time.Second ||
		o.Failovers != 5 || o.DirtyTrack.String() != "auto" || o.HeartbeatTimeout != 0 || o.Quiet || o.json != "" ||
		!o.Net || o.EchoRate != 200 || o.StreamRate != 100000 || !o.Disk || o.DiskSize != 64<<20 || o.DiskSyncSize != 1<<30 ||
		!slices.Equal(o.FailoverSizes, []uint64{256 << 20, 4 << 30}) || !o.Sync || !slices.Equal(o.SyncSizes, []uint64{1 << 30, 4 << 30}) {
		t.Errorf("defaults: %+v", o)
	}
	o, err = parseBenchArgs([]string{"--rates", " 5, 0 ", "--intervals", "5ms,10s", "--mem", "64M", "--vcpus", "2",
		"--pattern", "seq", "--mode-time", "1s", "--failovers", "0", "--dirty-track", "ring", "--heartbeat-timeout", "2s", "--quiet",
		"--no-net", "--echo-rate", "50", "--stream-rate", "1000", "--no-disk", "--disk-size", "8M", "--disk-sync-size", "16M",
		"--failover-sizes", "32M, 1G", "--no-sync", "--sync-sizes", "64M"})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Rates) != 2 || o.Rates[0] != 5 || o.Rates[1] != 0 || len(o.Intervals) != 2 || o.Intervals[0] != 5*time.Millisecond ||
		o.Intervals[1] != 10*time.Second || o.Mem != 64<<20 || o.VCPUs != 2 || o.Pattern.String() != "seq" || o.ModeTime != time.Second ||
		o.Failovers != 0 || o.DirtyTrack.String() != "ring" || o.HeartbeatTimeout != 2*time.Second || !o.Quiet ||
		o.Net || o.EchoRate != 50 || o.StreamRate != 1000 || o.Disk || o.DiskSize != 8<<20 || o.DiskSyncSize != 16<<20 ||
		!slices.Equal(o.FailoverSizes, []uint64{32 << 20, 1 << 30}) || o.Sync || !slices.Equal(o.SyncSizes, []uint64{64 << 20}) {
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
