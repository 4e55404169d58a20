// Package vmtest holds the test helpers that boot a testvm machine and read
// its guest's ground truth, shared by the tests and benchmarks of testvm,
// dirtylog and the packages above them.
package vmtest

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/testvm"
)

// Wait bounds waits that normally take milliseconds (a 100k-page phase takes
// about a second). It only turns a hang into a failure; nothing asserts a
// duration.
const Wait = 60 * time.Second

// Context returns a context that ends after Wait or with the test.
func Context(tb testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), Wait)
	tb.Cleanup(cancel)
	return c
}

// Build makes a machine, closed when the test ends. It needs /dev/kvm (see
// internal/privileged). With -v the guest's console goes to stderr.
func Build(tb testing.TB, cfg testvm.Config) *testvm.Machine {
	tb.Helper()
	privileged.Require(tb, privileged.KVM)
	if testing.Verbose() && cfg.Console == nil {
		cfg.Console = os.Stderr
	}
	m, err := testvm.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { m.Close() })
	return m
}

// Boot builds a machine, lets before (if not nil) set it up before its vCPUs
// run, starts it and waits until the guest is ready.
func Boot(tb testing.TB, cfg testvm.Config, before func(*testvm.Machine)) *testvm.Machine {
	tb.Helper()
	m := Build(tb, cfg)
	if before != nil {
		before(m)
	}
	if err := m.Start(); err != nil {
		tb.Fatal(err)
	}
	if err := m.WaitReady(Context(tb)); err != nil {
		tb.Fatal(err)
	}
	return m
}

// Phase lets a phased guest (Config.PhaseOps) run phase p and waits until every
// vCPU completed it.
func Phase(tb testing.TB, m *testvm.Machine, p uint64) {
	tb.Helper()
	m.Go(p)
	if err := m.WaitPhase(Context(tb), p); err != nil {
		tb.Fatal(err)
	}
}

// Versions reads the stamp version of every working-set page of every vCPU,
// keyed by guest-physical address: the guest's own record of what it wrote.
func Versions(m *testvm.Machine) map[uint64]uint64 {
	out := map[uint64]uint64{}
	for i := 0; i < m.NumVCPUs(); i++ {
		for idx := uint64(0); idx < m.WorkingSet(); idx++ {
			out[m.GPA(m.RegionBase(i)+idx*4096)] = m.ReadStamp(i, idx).Version
		}
	}
	return out
}

// GuestBookkeeping reports whether gpa is a page the guest writes for its own
// purposes, outside any workload: a vCPU's status page or a stack page.
func GuestBookkeeping(m *testvm.Machine, gpa uint64) bool {
	for i := 0; i < m.NumVCPUs(); i++ {
		if gpa == m.GPA(testvm.StatusOffset(i)) {
			return true
		}
		lo, hi := testvm.StackRange(i)
		if gpa >= m.GPA(lo) && gpa < m.GPA(hi) {
			return true
		}
	}
	return false
}

// Iterations returns every vCPU's operation count.
func Iterations(m *testvm.Machine) []uint64 {
	out := make([]uint64, m.NumVCPUs())
	for i := range out {
		out[i] = m.Status(i).Iterations
	}
	return out
}

// WaitProgress waits until every vCPU's operation count passes min[i]. It
// yields but does not sleep, so benchmarks can use it too: a sleep's
// granularity would dwarf what they measure.
func WaitProgress(tb testing.TB, m *testvm.Machine, min []uint64) {
	tb.Helper()
	deadline := time.Now().Add(Wait)
	for i := range min {
		for n := 0; m.Status(i).Iterations <= min[i]; n++ {
			if n%1024 == 1023 {
				if err := m.Err(); err != nil {
					tb.Fatalf("machine stopped: %v", err)
				}
				if time.Now().After(deadline) {
					tb.Fatalf("vCPU %d made no progress past %d operations in %v", i, min[i], Wait)
				}
			}
			runtime.Gosched()
		}
	}
}

// BuildRepagent builds the repagent command into the test's temporary
// directory, for tests that run its subcommands as separate processes.
func BuildRepagent(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(tb.TempDir(), "repagent")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/repagent/repagent/cmd/repagent").CombinedOutput(); err != nil {
		tb.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}
