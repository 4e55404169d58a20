package main

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/testvm"
)

func TestParseSize(t *testing.T) {
	good := []struct {
		in   string
		want uint64
	}{
		{"256MiB", 256 << 20},
		{"256M", 256 << 20},
		{"256mib", 256 << 20},
		{"256m", 256 << 20},
		{"1GiB", 1 << 30},
		{"1G", 1 << 30},
		{"4096KiB", 4096 << 10},
		{"4096K", 4096 << 10},
		{"2TiB", 2 << 40},
		{"268435456", 256 << 20},
		{"268435456B", 256 << 20},
		{"64 MiB", 64 << 20},
		{"0", 0},
		{"16777215TiB", 16777215 << 40},
	}
	for _, tc := range good {
		got, err := parseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	bad := []struct{ in, why string }{
		{"", "no number"},
		{"MiB", "no number"},
		{"100X", `unknown unit "X"`},
		{"1MB", `unknown unit "MB"`},
		{"1.5G", "not a whole number"},
		{"-1M", "not a whole number"},
		{"0x100", "not a whole number"},
		{"1 2M", "not a whole number"},
		{"16777216TiB", "too large"},
		{"18446744073709551616", "too large"},
	}
	for _, tc := range bad {
		got, err := parseSize(tc.in)
		if err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", tc.in, got)
			continue
		}
		if !strings.Contains(err.Error(), `"`+tc.in+`"`) || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("parseSize(%q) error %q: want it to name the input and say %q", tc.in, err, tc.why)
		}
	}
}

func TestParseVMArgsDefaults(t *testing.T) {
	o, err := parseVMArgs(nil)
	if err != nil {
		t.Fatal(err)
	}
	want := testvm.Config{MemSize: testvm.DefaultMemSize, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random, Seed: 1}
	if !sameConfig(o.Guest, want) || o.Duration != 10*time.Second || o.Save != "" || o.Restore != "" || o.Quiet {
		t.Errorf("defaults: %+v", o)
	}
	for name, ch := range o.Changed {
		if ch {
			t.Errorf("flag --%s counted as changed", name)
		}
	}

	o, err = parseVMArgs([]string{"--mem", "1G", "--vcpus=4", "--workload", "counter", "--pattern", "hotcold",
		"--working-set", "10", "--rate", "1000", "--seed", "7", "--duration", "0", "--quiet", "--save", "snap"})
	if err != nil {
		t.Fatal(err)
	}
	want = testvm.Config{MemSize: 1 << 30, VCPUs: 4, Workload: testvm.Counter, Pattern: testvm.HotCold,
		WorkingSet: 10, Rate: 1000, Seed: 7}
	if !sameConfig(o.Guest, want) || o.Duration != 0 || !o.Quiet || o.Save != "snap" {
		t.Errorf("parsed: %+v", o)
	}
	if !o.Changed["mem"] || !o.Changed["seed"] || o.Changed["tap"] || len(o.Changed) != len(guestFlagNames) {
		t.Errorf("changed: %v", o.Changed)
	}

	if _, err := parseVMArgs([]string{"--help"}); !errors.Is(err, pflag.ErrHelp) {
		t.Errorf("--help: %v, want pflag.ErrHelp", err)
	}
}

// TestVMUsageErrors checks that bad flags are one line on stderr and exit
// code 2. None of these gets as far as building a VM, so the test needs no
// /dev/kvm.
func TestVMUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--vcpus", "0"}, "--vcpus 0: want 1 to 4"},
		{[]string{"--vcpus", "5"}, "--vcpus 5: want 1 to 4"},
		{[]string{"--mem", "101MiB"}, "not a multiple of 2 MiB"},
		{[]string{"--mem", "100000000"}, "not a multiple of 2 MiB"},
		{[]string{"--mem", "4MiB"}, "outside 8MiB..64GiB"},
		{[]string{"--mem", "0"}, "--mem: size must not be 0"},
		{[]string{"--mem", "12X"}, `size "12X": unknown unit`},
		{[]string{"--workload", "bogus"}, `unknown workload "bogus" (want idle, dirty, counter, udp-echo or udp-stream), or disk with a block device`},
		{[]string{"--pattern", "zigzag"}, `unknown pattern "zigzag" (want seq, random or hotcold)`},
		{[]string{"--mem", "8MiB", "--vcpus", "4", "--working-set", "100000"}, "working set of 100000 pages exceeds"},
		{[]string{"--duration", "-1s"}, "--duration -1s: must not be negative"},
		{[]string{"--duration", "soon"}, `invalid argument "soon"`},
		{[]string{"--bogus"}, "unknown flag: --bogus"},
		{[]string{"extra"}, `unexpected argument "extra"`},
		{[]string{"--save", "/nonexistent/dir/snap"}, "directory /nonexistent/dir does not exist"},
	} {
		checkUsageError(t, runVM, "repagent vm: ", tc.args, tc.want)
	}
}

// checkUsageError runs a command with args and checks that it fails as a
// usage error: exit 2, nothing on stdout, and one line on stderr, after
// prefix, saying want.
func checkUsageError(t *testing.T, cmd func([]string, io.Writer, io.Writer) int, prefix string, args []string, want string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := cmd(args, &stdout, &stderr)
	msg := stderr.String()
	if code != 2 || !strings.HasPrefix(msg, prefix) || !strings.Contains(msg, want) ||
		strings.Count(msg, "\n") != 1 || stdout.Len() != 0 {
		t.Errorf("%s%v: exit %d, stdout %q, stderr %q; want exit 2 and one line saying %q",
			prefix, args, code, stdout.String(), msg, want)
	}
}

func TestVMHelp(t *testing.T) {
	for _, args := range [][]string{{"vm", "--help"}, {"vm", "-h"}, {"help", "vm"}} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != 0 {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr.String())
		}
		out := stdout.String()
		for _, want := range []string{"Usage: repagent vm", "--mem size", `(default "256MiB")`, "--duration duration", "(default 10s)", "--restore file"} {
			if !strings.Contains(out, want) {
				t.Errorf("%v: usage lacks %q:\n%s", args, want, out)
			}
		}
	}
}

func TestDispatch(t *testing.T) {
	for _, tc := range []struct {
		args         []string
		code         int
		stdout, errs string
	}{
		{[]string{"--interval", "1ms"}, 2, "", "repagent: --interval 1ms: want 5ms to 10s"},
		{[]string{"--mem", "64M", "extra"}, 2, "", `repagent: unexpected argument "extra"`},
		{[]string{"help"}, 0, "Usage: repagent [flags]", ""},
		{[]string{"--help"}, 0, "Usage: repagent [flags]", ""},
		{[]string{"-h"}, 0, "repagent <command> [flags]", ""},
		{[]string{"--interval", "100ms", "--help"}, 0, "Usage: repagent [flags]", ""},
		{[]string{"help", "primary"}, 0, "Usage: repagent primary --backup HOST:PORT", ""},
		{[]string{"backup", "--help"}, 0, "Usage: repagent backup --listen ADDR", ""},
		{[]string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"help", "frobnicate"}, 2, "", `unknown command "frobnicate"`},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tc.args, &stdout, &stderr)
		if code != tc.code || !strings.Contains(stdout.String(), tc.stdout) || !strings.Contains(stderr.String(), tc.errs) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit %d, %q, %q",
				tc.args, code, stdout.String(), stderr.String(), tc.code, tc.stdout, tc.errs)
		}
	}
}

func TestCheckSnapshot(t *testing.T) {
	snap := testvm.Config{MemSize: 256 << 20, VCPUs: 2, Workload: testvm.Counter, Pattern: testvm.Random, Seed: 1}
	o, err := parseVMArgs([]string{"--mem", "256MiB", "--vcpus", "2", "--workload", "counter"})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.CheckSnapshot(snap); err != nil {
		t.Errorf("matching flags: %v", err)
	}
	// Flags left at their defaults do not count, even when they differ.
	if o, _ := parseVMArgs(nil); o.CheckSnapshot(snap) != nil {
		t.Errorf("default flags: %v", o.CheckSnapshot(snap))
	}
	o, err = parseVMArgs([]string{"--mem", "128MiB", "--workload", "dirty", "--seed", "1"})
	if err != nil {
		t.Fatal(err)
	}
	err = o.CheckSnapshot(snap)
	if !errors.As(err, new(usageError)) {
		t.Fatalf("mismatch: %v, want a usage error", err)
	}
	want := "--mem 128MiB does not match the snapshot's 256MiB guest; --workload dirty does not match the snapshot's counter workload"
	if err.Error() != want {
		t.Errorf("mismatch: %q\nwant %q", err, want)
	}
}

// sameConfig compares the fields the vm flags set (Config holds a func, so it
// is not comparable with ==).
func sameConfig(a, b testvm.Config) bool {
	return a.MemSize == b.MemSize && a.VCPUs == b.VCPUs && a.Workload == b.Workload && a.Pattern == b.Pattern &&
		a.WorkingSet == b.WorkingSet && a.Rate == b.Rate && a.Seed == b.Seed
}
