package main

import (
	"bytes"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/repagent/repagent/internal/privileged"
)

// counterLine matches a vCPU's counter in the restore header and the summary.
var counterLine = regexp.MustCompile(`vcpu (\d+): .*counter (\d+) hash (0x[0-9a-f]+)(.*)`)

// TestVMSaveRestore builds the binary, runs a counter guest and saves it, then
// restores it and checks that it continued from exactly where it stopped.
func TestVMSaveRestore(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	dir := t.TempDir()
	bin := filepath.Join(dir, "repagent")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	snap := filepath.Join(dir, "snap")

	out, code := runBin(t, bin, "vm", "--workload", "counter", "--vcpus", "2", "--mem", "64MiB", "--duration", "1s", "--save", snap)
	if code != 0 {
		t.Fatalf("save run: exit %d\n%s", code, out)
	}
	saved := counters(t, out)
	if len(saved) != 2 || !strings.Contains(out, "saved snapshot "+snap) {
		t.Fatalf("save run: want 2 counters and a saved snapshot:\n%s", out)
	}
	for i, c := range saved {
		if c.rest != " (verified)" {
			t.Errorf("save run: vcpu %d counter %d not verified: %q", i, c.n, c.rest)
		}
	}

	out, code = runBin(t, bin, "vm", "--restore", snap, "--duration", "1s")
	if code != 0 {
		t.Fatalf("restore run: exit %d\n%s", code, out)
	}
	all := counters(t, out)
	if len(all) != 4 {
		t.Fatalf("restore run: want 2 restored and 2 final counters:\n%s", out)
	}
	restored, final := all[:2], all[2:]
	for i := range 2 {
		if restored[i].n != saved[i].n || restored[i].hash != saved[i].hash {
			t.Errorf("vcpu %d restored at counter %d hash %s, saved at %d hash %s", i, restored[i].n, restored[i].hash, saved[i].n, saved[i].hash)
		}
		if final[i].n <= saved[i].n {
			t.Errorf("vcpu %d ended at counter %d, not past the saved %d", i, final[i].n, saved[i].n)
		}
		if final[i].rest != " (verified)" {
			t.Errorf("restore run: vcpu %d counter %d not verified: %q", i, final[i].n, final[i].rest)
		}
	}

	out, code = runBin(t, bin, "vm", "--restore", snap, "--mem", "128MiB")
	if code != 2 || !strings.Contains(out, "--mem 128MiB does not match the snapshot's 64MiB guest") {
		t.Errorf("restore with --mem 128MiB: exit %d, want 2 and a mismatch message:\n%s", code, out)
	}
}

func runBin(t *testing.T, bin string, args ...string) (string, int) {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return out.String(), exit.ExitCode()
	}
	if err != nil {
		t.Fatalf("run %s: %v", bin, err)
	}
	return out.String(), 0
}

type counterState struct {
	n    uint64
	hash string
	rest string
}

// counters returns every counter line of out, in order.
func counters(t *testing.T, out string) []counterState {
	t.Helper()
	var cs []counterState
	for _, m := range counterLine.FindAllStringSubmatch(out, -1) {
		n, err := strconv.ParseUint(m[2], 10, 64)
		if err != nil {
			t.Fatalf("counter %q: %v", m[2], err)
		}
		cs = append(cs, counterState{n: n, hash: m[3], rest: m[4]})
	}
	return cs
}
