package main

import (
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/privileged"
)

var syncEndRE = regexp.MustCompile(`(?m)^sync round (\d+): .*; synced in (\S+) \((converged|rounds stopped shrinking|round limit|throttle limit)\), first checkpoint follows$`)

// A large guest that dirties memory as fast as it can (1 GiB, 2 vCPUs, the
// dirty workload at full speed, as many pages as the host gives it) gets
// protected: its pre-copy rounds stop shrinking, the sync ends by itself
// and says why, the first checkpoint copies what is left in one pause, and
// replication then holds (epochs acknowledged for the rest of the run, the
// backup never lost, the replica verified against the primary's memory at
// the end).
func TestLargeBusyGuestProtected(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	const run = 40 * time.Second
	out, code := runBin(t, bin, "--interval", "100ms", "--duration", run.String(), "--mem", "1G", "--vcpus", "2",
		"--no-net", "--no-disk", "--stats", stats)
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	m := syncEndRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no sync line that says how the sync ended:\n%s", out)
	}
	took, err := time.ParseDuration(m[2])
	if err != nil {
		t.Fatal(err)
	}
	// Bounded: the sync may not take the run (at worst it runs its round
	// limit, each round no longer than the one before).
	if took > run/2 {
		t.Fatalf("sync took %v of a %v run:\n%s", took, run, out)
	}
	if strings.Contains(out, "UNPROTECTED") || strings.Contains(out, "i/o timeout") || strings.Contains(out, "BACKUP LOST") {
		t.Fatalf("the backup was lost:\n%s", out)
	}
	if !strings.Contains(out, "\nverification passed\n") || !strings.Contains(out, "(verified: its memory digests to the primary's)") {
		t.Fatalf("the guest or the replica did not verify:\n%s", out)
	}
	lines := readStats(t, stats)
	if len(lines) < 5 {
		t.Fatalf("%d epochs acknowledged after a %v sync in a %v run, want at least 5:\n%s", len(lines), took, run, out)
	}
	for i, l := range lines {
		if l.Epoch != uint64(i+1) {
			t.Fatalf("stats line %d is epoch %d: an epoch went unacknowledged", i+1, l.Epoch)
		}
	}
	last, err := strconv.Atoi(m[1])
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("sync: %d rounds in %v (%s); then %d epochs acknowledged", last+1, took, m[3], len(lines))
}

// A run shorter than the initial sync ends cleanly: exit 0, a summary that
// says the sync did not finish and the VM was never protected, a backup that
// holds no checkpoint, and the guest verified.
func TestRunEndsDuringSync(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	// Round 0 alone reads or skips 262,144 pages: far longer than 20 ms.
	out, code := runBin(t, bin, "--interval", "100ms", "--duration", "20ms", "--mem", "1G", "--vcpus", "2", "--no-net", "--no-disk")
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	for _, want := range []string{"  sync: not finished when the run ended (", "the VM was never protected",
		"  backup: no checkpoint (the run ended during the initial sync: the VM was never protected)", "\nverification passed\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "not acknowledged") || strings.Contains(out, "UNPROTECTED") {
		t.Errorf("a run that ended in the sync reported a lost backup:\n%s", out)
	}
}
