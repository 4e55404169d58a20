package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/procout"
	"github.com/repagent/repagent/internal/vmtest"
)

var (
	statusLineRE = regexp.MustCompile(`(?m)^ +\d+\.\ds  [\d.]+ epochs/s  pause p50 \S+ p99 \S+  dirty \S+/epoch  wire \S+/s  ratio \S+  lag \d+ ack \S+  xfer \S+  period \S+  cpu/page \S+  guest \S+ writes/s(  disk \S+ writes/s \S+/s)?(  net held \S+/s rel \S+/s( DROPPED \S+/s)? hold p50 \S+ p99 \S+(  client rtt p50 \S+ p99 \S+)?)?$`)
	summaryRE    = regexp.MustCompile(`(?m)^  epochs: (\d+) acknowledged .*, last (\d+),`)
	failoverRE   = regexp.MustCompile(`(?m)^failover: epoch=(\d+) digest=([0-9a-f]{16}) verified=(true|false)$`)
	resumedRE    = regexp.MustCompile(`(?m)^resumed vcpu=(\d+) iterations=(\d+) writes=(\d+) counter=(\d+) hash=([0-9a-f]{16})$`)
	listeningRE  = regexp.MustCompile(`^listening on (\S+)$`)
	failoverTook = regexp.MustCompile(`(?m)^failover took [\d.]+ ms \(verify [\d.]+ ms, restore [\d.]+ ms\)$`)
)

// buildRepagent builds the command for the tests that run it as processes.
func buildRepagent(t *testing.T) string { return vmtest.BuildRepagent(t) }

// statsLine is the part of a --stats line the tests read.
type statsLine struct {
	Epoch  uint64           `json:"epoch"`
	Start  time.Time        `json:"start"`
	Digest string           `json:"digest"`
	Pause  float64          `json:"pause_us"`
	Dirty  int              `json:"dirty_pages"`
	Wire   uint64           `json:"wire_bytes"`
	Note   []agent.VCPUNote `json:"note"`
}

// readStats parses the complete lines of a stats file.
func readStats(t *testing.T, path string) []statsLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []statsLine
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			break // a line being written
		}
		var l statsLine
		if err := json.Unmarshal(b[:i], &l); err != nil {
			t.Fatalf("stats line %d: %v: %s", len(out)+1, err, b[:i])
		}
		out = append(out, l)
		b = b[i+1:]
	}
	return out
}

// TestJobE2E runs the main job for a few seconds and checks its output, its
// stats file and its verdict.
func TestJobE2E(t *testing.T) {
	privileged.Require(t, privileged.KVM, privileged.Root, privileged.NetAdmin) // the job builds its own network
	bin := buildRepagent(t)
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	out, code := runBin(t, bin, "--interval", "100ms", "--duration", "3s", "--mem", "64M", "--heartbeat-timeout", "5s", "--stats", stats)
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	if !statusLineRE.MatchString(out) {
		t.Errorf("no status line:\n%s", out)
	}
	for _, want := range []string{"sync round 0: 16384 pages", "replicated ", "  pause: p50 ", "  pause parts (mean): kick ",
		"\nnetwork: guest 10.77.0.2 on rpa-tap0", "  output commit on rpa-tap0: held ", "  hold time (added latency): p50 ",
		"  shipped: raw ", "  ack latency: p50 ", "  vcpu 0: pages verified: ", "  backup: replica at epoch ", "\nverification passed\n",
		"\ndisk sync precopy: 64 blocks, 64 identical, 0 sent, ", "  disk mirrored: 0 writes, ",
		"  backup: disk image at epoch ", "  disk 0 writes/s 0B/s"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "UNPROTECTED") {
		t.Errorf("the in-process backup was lost:\n%s", out)
	}
	// The job's client got answers through output commit, each once, in order.
	if m := regexp.MustCompile(`(?m)^  client: (\d+) echoes sent, (\d+) answered, (\d+) out of order`).FindStringSubmatch(out); m == nil {
		t.Errorf("no client line:\n%s", out)
	} else if answered, _ := strconv.Atoi(m[2]); answered < 100 || m[3] != "0" {
		t.Errorf("client: %s; want at least 100 answered, none out of order", m[0])
	}
	if m := regexp.MustCompile(`(?m)^  output commit on rpa-tap0: held (\d+) frames \(\S+\), released (\d+), dropped 0 `).FindStringSubmatch(out); m == nil || m[1] == "0" {
		t.Errorf("no output commit line with held frames and no drops:\n%s", out)
	}
	m := summaryRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no epochs line in the summary:\n%s", out)
	}
	n, _ := strconv.Atoi(m[1])
	lines := readStats(t, stats)
	if n < 5 || len(lines) != n {
		t.Fatalf("summary says %d epochs, the stats file has %d lines; want them equal and at least 5", n, len(lines))
	}
	for i, l := range lines {
		if l.Epoch != uint64(i+1) || len(l.Digest) != 16 || l.Pause <= 0 || len(l.Note) != 1 || l.Note[0].Iterations == 0 {
			t.Errorf("stats line %d: %+v", i+1, l)
		}
		if i > 0 && l.Note[0].Writes < lines[i-1].Note[0].Writes {
			t.Errorf("stats line %d: the guest's writes went back from %d to %d", i+1, lines[i-1].Note[0].Writes, l.Note[0].Writes)
		}
	}
}

// lineReader collects a process's output and lets a test wait for a line.
type lineReader struct {
	mu    sync.Mutex
	buf   strings.Builder
	lines chan string
	done  chan struct{}
}

// startBackup starts `repagent backup --listen 127.0.0.1:0 args...`, killed
// when the test ends, and returns it, its stdout lines, its stderr and the
// address it says it listens on.
func startBackup(ctx context.Context, t *testing.T, bin string, args ...string) (*exec.Cmd, *lineReader, *procout.Buffer, string) {
	t.Helper()
	return startBackupCmd(t, exec.CommandContext(ctx, bin, append([]string{"backup", "--listen", "127.0.0.1:0"}, args...)...))
}

// startBackupCmd is startBackup for a backup command made by the caller (in a
// network namespace, say).
func startBackupCmd(t *testing.T, backup *exec.Cmd) (*exec.Cmd, *lineReader, *procout.Buffer, string) {
	t.Helper()
	bout, err := backup.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	berr := &procout.Buffer{} // read while the backup runs
	backup.Stderr = berr
	if err := backup.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { backup.Process.Kill(); backup.Wait() })
	bl := newLineReader(bout)
	select {
	case line := <-bl.lines:
		m := listeningRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("backup's first line is %q, want listening on ADDR", line)
		}
		return backup, bl, berr, m[1]
	case <-time.After(10 * time.Second):
		t.Fatalf("backup did not say where it listens; stderr:\n%s", berr.String())
		return nil, nil, nil, ""
	}
}

func newLineReader(r io.Reader) *lineReader {
	lr := &lineReader{lines: make(chan string, 1024), done: make(chan struct{})}
	go func() {
		defer close(lr.done)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			lr.mu.Lock()
			lr.buf.WriteString(sc.Text() + "\n")
			lr.mu.Unlock()
			select {
			case lr.lines <- sc.Text():
			default:
			}
		}
	}()
	return lr
}

func (lr *lineReader) String() string {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return lr.buf.String()
}

// TestPrimaryBackupFailoverE2E runs a backup and a primary as two processes,
// kills the primary with SIGKILL once a few epochs are acknowledged, and
// checks that the backup resumed the newest complete checkpoint: no older
// than the last epoch the primary recorded as acknowledged, the same one
// (digest and guest state) when the epochs are equal, and a guest that
// verifies after running on.
func TestPrimaryBackupFailoverE2E(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	backup, bl, berr, addr := startBackup(ctx, t, bin, "--run-after-failover", "1s", "--heartbeat-timeout", "5s", "--verify-replica")

	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	var pout bytes.Buffer
	primary := exec.CommandContext(ctx, bin, "primary", "--backup", addr, "--mem", "64M", "--stats", stats, "--heartbeat-timeout", "5s")
	primary.Stdout, primary.Stderr = &pout, &pout
	if err := primary.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(readStats(t, stats)) < 5 {
		if time.Now().After(deadline) {
			primary.Process.Kill()
			primary.Wait()
			t.Fatalf("fewer than 5 epochs acknowledged in 30s; primary:\n%s\nbackup:\n%s%s", pout.String(), bl.String(), berr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := primary.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	primary.Wait()
	lines := readStats(t, stats)
	last := lines[len(lines)-1]

	var err error
	werr := make(chan error, 1)
	go func() { <-bl.done; werr <- backup.Wait() }()
	select {
	case err = <-werr:
	case <-time.After(30 * time.Second):
		backup.Process.Kill()
		t.Fatalf("backup did not finish 30s after the primary died:\n%s%s", bl.String(), berr.String())
	}
	out := bl.String()
	if err != nil {
		t.Fatalf("backup: %v\n%s%s", err, out, berr.String())
	}
	m := failoverRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no failover line:\n%s%s", out, berr.String())
	}
	epoch, _ := strconv.ParseUint(m[1], 10, 64)
	t.Logf("primary's last acknowledged epoch %d (digest %s); backup resumed epoch %d (digest %s)", last.Epoch, last.Digest, epoch, m[2])
	if epoch < last.Epoch {
		t.Errorf("backup resumed epoch %d, older than the acknowledged %d", epoch, last.Epoch)
	}
	if m[3] != "true" {
		t.Errorf("replica not verified: %s", m[0])
	}
	resumed := resumedRE.FindAllStringSubmatch(out, -1)
	if len(resumed) != 1 || resumed[0][1] != "0" {
		t.Fatalf("want one resumed vcpu=0 line:\n%s", out)
	}
	if epoch == last.Epoch {
		if m[2] != last.Digest {
			t.Errorf("epoch %d: backup's digest %s, the primary's %s", epoch, m[2], last.Digest)
		}
		n := last.Note[0]
		if got := resumed[0]; got[2] != strconv.FormatUint(n.Iterations, 10) || got[3] != strconv.FormatUint(n.Writes, 10) || got[5] != n.Hash {
			t.Errorf("epoch %d: resumed %q, the primary recorded %+v", epoch, got[0], n)
		}
	}
	for _, want := range []*regexp.Regexp{failoverTook, regexp.MustCompile(`(?m)^  vcpu 0: pages verified: `), regexp.MustCompile(`(?m)^verification passed$`)} {
		if !want.MatchString(out) {
			t.Errorf("backup output lacks %v:\n%s", want, out)
		}
	}
}

// TestBackupRejectsOtherShape checks --expect-mem/--expect-vcpus end to end:
// a primary with another VM shape is refused, and says so.
func TestBackupRejectsOtherShape(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, _, _, addr := startBackup(ctx, t, bin, "--expect-mem", "32M", "--expect-vcpus", "1")
	out, code := runBin(t, bin, "primary", "--backup", addr, "--mem", "64M", "--duration", "1s")
	if code != 1 || !strings.Contains(out, "backup refused the session") || !strings.Contains(out, "VM shape mismatch") {
		t.Errorf("primary with 64MiB against a backup expecting 32MiB: exit %d, want 1 and a shape mismatch:\n%s", code, out)
	}
}

// TestPrimaryBackupLostE2E kills the backup under a running primary: the
// primary says so loudly, keeps its guest running, unprotected, to the end of
// --duration, and exits 0 with a verified guest.
func TestPrimaryBackupLostE2E(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	backup, _, _, addr := startBackup(ctx, t, bin, "--heartbeat-timeout", "5s")
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	var pout, perr bytes.Buffer
	primary := exec.CommandContext(ctx, bin, "primary", "--backup", addr, "--mem", "64M", "--stats", stats,
		"--heartbeat-timeout", "5s", "--duration", "4s")
	primary.Stdout, primary.Stderr = &pout, &perr
	if err := primary.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(readStats(t, stats)) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("fewer than 2 epochs acknowledged in 30s; primary:\n%s%s", pout.String(), perr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	backup.Process.Signal(syscall.SIGKILL)
	err := primary.Wait()
	out := pout.String()
	if err != nil {
		t.Fatalf("primary: %v, want exit 0\n%s%s", err, out, perr.String())
	}
	if !regexp.MustCompile(`(?m)^repagent primary: backup lost: VM running UNPROTECTED: `).MatchString(perr.String()) {
		t.Errorf("stderr does not say the backup was lost:\n%s", perr.String())
	}
	for _, want := range []string{"UNPROTECTED\n", "  UNPROTECTED: the backup was lost after epoch ", "  vcpu 0: pages verified: ", "\nverification passed\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
