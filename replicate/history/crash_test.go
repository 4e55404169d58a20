package history

import (
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestCrashChild is the process TestCrash kills: it takes points without
// end, deleting old ones and collecting garbage as it goes.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv("REPAGENT_HISTORY_CRASH_DIR")
	if dir == "" {
		t.Skip("run by TestCrash")
	}
	s, err := Open(dir, Options{PackSize: 48 << 10})
	if err != nil {
		t.Fatal(err)
	}
	g := newGuest()
	for n := 0; ; n++ {
		g.step()
		if _, err := s.Add(g.capture(t, false)); err != nil {
			t.Fatal(err)
		}
		if n%5 == 4 {
			pts, err := s.Points()
			if err != nil {
				t.Fatal(err)
			}
			var del []uint64
			for i, p := range pts {
				if i%3 != 0 && i < len(pts)-3 {
					del = append(del, p.ID)
				}
			}
			if err := s.Delete(del...); err != nil {
				t.Fatal(err)
			}
			if _, err := s.GC(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestCrash kills a process that stores points and collects garbage at
// random moments, 24 times: every point listed afterwards restores
// exactly, and intake resumes.
func TestCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("kills a process 24 times")
	}
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	listed := 0
	for kill := range 24 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), "REPAGENT_HISTORY_CRASH_DIR="+dir)
		out, _ := os.CreateTemp(t.TempDir(), "child")
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(50+rng.IntN(400)) * time.Millisecond)
		cmd.Process.Kill()
		cmd.Wait()
		if b, _ := os.ReadFile(out.Name()); len(b) > 0 && !containsOnlyWarnings(b) {
			t.Fatalf("kill %d: the child failed before it was killed:\n%s", kill, b)
		}
		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatalf("kill %d: %v", kill, err)
		}
		ok, refused := restoreAll(t, s)
		if len(refused) > 0 {
			t.Errorf("kill %d: %d listed points do not restore (problems %q)", kill, len(refused), s.Problems())
		}
		listed += len(ok)
		s.Close()
	}
	if listed == 0 {
		t.Fatal("no point was ever listed: the child never got to store one")
	}
	t.Logf("%d points restored across 24 kills", listed)
}

// containsOnlyWarnings says the child's output is the store's own warnings
// (the repairs of an Open after a kill).
func containsOnlyWarnings(b []byte) bool {
	for _, line := range strings.Split(string(b), "\n") {
		if line != "" && !strings.Contains(line, "WARN history:") {
			return false
		}
	}
	return true
}
