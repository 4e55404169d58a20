package main

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/labcert"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/procout"
	"github.com/repagent/repagent/testvm"
)

// P2 and P3 with two real agent processes over TCP: the primary is killed
// with SIGKILL at chosen moments, and each time the backup must resume a
// guest whose memory and vCPU state are the primary's at one acknowledged
// epoch boundary, and whose workload goes on from there.
//
// The moments come from the primary's fault hooks (REPAGENT_FAULT: it
// SIGKILLs itself at an exact point) and from the backup's (it SIGKILLs the
// primary while it applies an epoch), plus plain kills at random times. The
// epochs and delays are drawn from a seed the test logs; REPAGENT_KILL_SEED
// replays a run.
//
// The evidence, per kill:
//   - The primary audits every epoch (--audit-every 1): in each pause it
//     digests all of guest memory and stops if that differs from the digest
//     it sends. So an epoch's digest is the primary's real memory.
//   - The backup digests its whole replica before resuming
//     (verified=true): the resumed memory is the epoch's, bit for bit.
//   - The epoch resumed lies within what the kill point allows (no newer
//     than the epoch being captured or sent, no older than the one being
//     applied) and is never older than the last one the primary recorded as
//     acknowledged (its --stats file). Where the primary recorded it, the
//     digest and every vCPU's counters and hash (recorded in that epoch's
//     pause) equal what the backup resumed.
//   - The resumed guest runs on and verifies itself: dirty pages carry stamps
//     consistent with its status page, the counter's hash chain re-hashes
//     from zero to the value it reached.
func TestKillPrimary(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("REPAGENT_KILL_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("REPAGENT_KILL_SEED: %v", err)
		}
	}
	t.Logf("seed %d (REPAGENT_KILL_SEED=%d replays it)", seed, seed)
	r := rand.New(rand.NewPCG(seed, 0))
	epoch := func() uint64 { return 4 + r.Uint64N(10) }

	var cases []killCase
	for _, wl := range []string{"dirty", "counter"} {
		cases = append(cases,
			killCase{workload: wl, fault: "sync:0"},
		)
		if wl == "dirty" {
			// Only the dirty workload leaves enough behind round 0 for a
			// second round; the counter's sync is one round.
			cases = append(cases, killCase{workload: wl, fault: "sync:1"})
		}
		for range 3 {
			n := epoch()
			// Epochs before n may still be in flight: the backup resumes one
			// between the last acknowledged and n-1.
			cases = append(cases, killCase{workload: wl, fault: fmt.Sprintf("pause:%d", n), atMost: n - 1})
		}
		for range 3 {
			n := epoch()
			cases = append(cases, killCase{workload: wl, fault: fmt.Sprintf("send:%d", n), atMost: n - 1})
		}
		for range 2 {
			n := epoch()
			// Written is not delivered: what sat in the dead primary's socket
			// buffers is lost with it (a reset discards it), so the backup
			// may lack even epoch n, as after a real host's death.
			cases = append(cases, killCase{workload: wl, fault: fmt.Sprintf("sent:%d", n), atMost: n})
		}
		for range 2 {
			n := epoch()
			// The epochs the primary sent after n are in the backup's socket
			// when it dies: the backup applies n and any of those.
			cases = append(cases, killCase{workload: wl, fault: fmt.Sprintf("apply:%d", n), backupFault: true, atLeast: n})
		}
		for range 2 {
			cases = append(cases, killCase{workload: wl, after: 300*time.Millisecond + time.Duration(r.Uint64N(uint64(time.Second)))})
		}
	}
	// The dirty workload's cases take the page contents in turn, so every
	// run kills a guest writing each of them (the data path encodes them
	// differently: raw, LZ4, mostly unchanged).
	contents := []string{"stamp", "text", "sparse"}
	k := 0
	for i := range cases {
		if cases[i].workload == "dirty" {
			cases[i].content = contents[k%len(contents)]
			k++
		}
	}
	// Every case after the sync takes the capture modes in turn, so every
	// run kills primaries capturing eagerly, lazily (copy-before-write) and
	// by the cost model.
	captures := []string{"eager", "lazy", "auto"}
	k = 0
	for i := range cases {
		if !strings.HasPrefix(cases[i].fault, "sync:") {
			cases[i].capture = captures[k%len(captures)]
			k++
		}
	}
	// Every other case replicates over TLS, so the kills cut TLS sessions
	// as well as plaintext ones.
	for i := range cases {
		cases[i].tls = i%2 == 1
	}
	resumed, ran := 0, 0
	for _, c := range cases {
		t.Run(c.name(), func(t *testing.T) {
			ran++
			if c.run(t, bin) {
				resumed++
			}
		})
	}
	if t.Failed() || ran < len(cases) {
		return // a failure said why, or -run picked some cases only
	}
	if resumed < 20 {
		t.Fatalf("only %d kills ended in a resumed guest, want at least 20", resumed)
	}
	t.Logf("%d kills, %d resumed", len(cases), resumed)
}

// killCase is one kill of the primary.
type killCase struct {
	workload    string
	content     string        // the dirty workload's --content
	capture     string        // the primary's --capture ("": the default)
	fault       string        // REPAGENT_FAULT, for the primary or (backupFault) the backup
	backupFault bool          // the backup kills the primary, in its apply
	after       time.Duration // no fault: kill the primary after this long
	tls         bool          // replicate over TLS (labTLSArgs)
	atMost      uint64        // the newest epoch the backup may resume (0: no bound but the primary's)
	atLeast     uint64        // the oldest epoch the backup may resume (0: no bound but the primary's)
}

func (c killCase) name() string {
	wl := c.workload
	if c.content != "" {
		wl += "-" + c.content
	}
	if c.capture != "" && c.capture != "eager" {
		wl += "-" + c.capture
	}
	if c.tls {
		wl += "-tls"
	}
	if c.fault == "" {
		return fmt.Sprintf("%s/after=%v", wl, c.after.Round(time.Millisecond))
	}
	return wl + "/" + c.fault
}

// run kills a primary as the case says and checks what the backup resumed.
// It reports whether a guest was resumed (a kill during the initial sync
// leaves nothing to resume, and that is checked too).
func (c killCase) run(t *testing.T, bin string) bool {
	dir := t.TempDir()
	stats := filepath.Join(dir, "stats.jsonl")
	addr := freeAddr(t)

	primaryArgs := []string{"primary", "--backup", addr, "--mem", "32M", "--vcpus", "1", "--workload", c.workload,
		"--interval", "20ms", "--audit-every", "1", "--stats", stats, "--heartbeat-timeout", "5s", "--quiet"}
	if c.workload == "dirty" {
		rate := "100000"
		if c.fault == "sync:1" {
			// At full rate a round 0 slowed by a loaded host dirties most
			// of the working set while it runs, and the sync ends after it
			// (the rounds stopped shrinking), before round 1 and its fault.
			rate = "2000"
		}
		primaryArgs = append(primaryArgs, "--rate", rate)
	}
	if c.content != "" {
		primaryArgs = append(primaryArgs, "--content", c.content)
	}
	if c.capture != "" {
		// Auto's calibration at its shortest, so that auto has captured
		// lazily by the kill.
		primaryArgs = append(primaryArgs, "--capture", c.capture, "--capture-calibration", "1ms")
	}
	if c.fault == "sync:1" {
		// A round 0 quick enough to leave fewer pages than the default
		// threshold would end the sync before round 1 and its fault.
		primaryArgs = append(primaryArgs, "--sync-threshold", "1")
	}
	var backupTLS []string
	if c.tls {
		var primaryTLS []string
		backupTLS, primaryTLS = labTLSArgs(t)
		primaryArgs = append(primaryArgs, primaryTLS...)
	}
	primary := exec.Command(bin, primaryArgs...)
	pout := &procout.Buffer{}
	primary.Stdout, primary.Stderr = pout, pout
	primary.Env = os.Environ()
	if c.fault != "" && !c.backupFault {
		primary.Env = append(primary.Env, "REPAGENT_FAULT="+c.fault)
	}
	if err := primary.Start(); err != nil {
		t.Fatal(err)
	}
	defer primary.Process.Kill()

	backup := exec.Command(bin, append([]string{"backup", "--listen", addr, "--run-after-failover", "500ms", "--heartbeat-timeout", "5s",
		"--verify-replica", "--once"}, backupTLS...)...)
	backup.Env = os.Environ()
	if c.backupFault {
		backup.Env = append(backup.Env, "REPAGENT_FAULT="+c.fault, fmt.Sprintf("REPAGENT_FAULT_KILL_PID=%d", primary.Process.Pid))
	}
	bout := &procout.Buffer{}
	backup.Stdout, backup.Stderr = bout, bout
	if err := backup.Start(); err != nil {
		t.Fatal(err)
	}
	defer backup.Process.Kill()

	if c.after > 0 {
		// Count from the first acknowledged epoch, so the kill lands in the
		// checkpoint stream rather than in process start-up.
		waitFor(t, 30*time.Second, "a first acknowledged epoch", func() bool { return len(readStats(t, stats)) > 0 })
		time.Sleep(c.after)
		primary.Process.Kill()
	}
	perr := waitProcess(t, primary, 60*time.Second, "primary", func() string { return "primary:\n" + pout.String() + "\nbackup:\n" + bout.String() })
	if ws, ok := perr.(*exec.ExitError); !ok || ws.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("primary did not die by SIGKILL (%v):\n%s", perr, pout.String())
	}
	berr := waitProcess(t, backup, 60*time.Second, "backup", bout.String)
	out := bout.String()
	acked := readStats(t, stats)

	if strings.HasPrefix(c.fault, "sync:") {
		// Killed in the initial sync: there is no checkpoint; the backup says
		// so and resumes nothing.
		if code := exitCode(berr); code != 3 || !strings.Contains(out, "primary lost before its first checkpoint") || failoverRE.MatchString(out) {
			t.Fatalf("backup after a kill in the initial sync: exit %d, want 3 and no failover:\n%s", code, out)
		}
		if len(acked) != 0 {
			t.Fatalf("primary recorded %d acknowledged epochs before its first checkpoint", len(acked))
		}
		return false
	}
	if exitCode(berr) == 3 && len(acked) == 0 && c.atLeast == 0 {
		// Killed before any checkpoint was complete on the backup (the first
		// epochs were still in flight): nothing was acknowledged, so nothing
		// may be resumed, and the backup says so.
		if !strings.Contains(out, "primary lost before its first checkpoint") || failoverRE.MatchString(out) {
			t.Fatalf("backup exit 3 without saying there was no checkpoint:\n%s", out)
		}
		t.Logf("killed before the first checkpoint reached the backup")
		return false
	}
	if berr != nil {
		t.Fatalf("backup: %v:\n%s", berr, out)
	}
	fm := failoverRE.FindStringSubmatch(out)
	if fm == nil || fm[3] != "true" || !strings.Contains(out, "verification passed") {
		t.Fatalf("backup did not resume a verified replica and verify the guest:\n%s", out)
	}
	got, _ := strconv.ParseUint(fm[1], 10, 64)
	digest := fm[2]
	var last uint64
	if len(acked) > 0 {
		last = acked[len(acked)-1].Epoch
	}
	// P3: nothing the primary saw acknowledged is lost; at most the epochs it
	// had in flight (--max-in-flight, 4 by default) are ahead of it.
	if got < last || got > last+4 {
		t.Fatalf("backup resumed epoch %d; the primary's last acknowledged epoch is %d", got, last)
	}
	if got < c.atLeast {
		t.Fatalf("backup resumed epoch %d, older than %d, for a kill at %s", got, c.atLeast, c.fault)
	}
	if c.atMost != 0 && got > c.atMost {
		t.Fatalf("backup resumed epoch %d, newer than %d, for a kill at %s", got, c.atMost, c.fault)
	}
	resumed := resumedVCPUs(t, out)
	for _, l := range acked {
		if l.Epoch != got {
			continue
		}
		// P2: the primary's own record of this epoch boundary.
		if l.Digest != digest {
			t.Fatalf("epoch %d: backup resumed digest %s, primary recorded %s", got, digest, l.Digest)
		}
		if len(l.Note) != len(resumed) {
			t.Fatalf("epoch %d: %d vCPUs recorded, %d resumed", got, len(l.Note), len(resumed))
		}
		for i, n := range l.Note {
			if n != resumed[i] {
				t.Fatalf("epoch %d vCPU %d: resumed %+v, primary recorded %+v", got, i, resumed[i], n)
			}
		}
	}
	// P3: the guest goes on from at least what was acknowledged.
	if len(acked) > 0 {
		for i, n := range acked[len(acked)-1].Note {
			if resumed[i].Iterations < n.Iterations {
				t.Fatalf("vCPU %d resumed at %d operations, behind the acknowledged %d", i, resumed[i].Iterations, n.Iterations)
			}
		}
	}
	for _, v := range resumed {
		if c.workload == "counter" {
			h, _ := strconv.ParseUint(v.Hash, 16, 64)
			if testvm.CounterHash(testvm.CounterStart, 0, v.Counter) != h {
				t.Fatalf("vCPU %d resumed at counter %d with hash %s, off its chain", v.VCPU, v.Counter, v.Hash)
			}
		}
	}
	t.Logf("resumed epoch %d (primary's last ack %d) digest %s", got, last, digest)
	return true
}

// resumedVCPUs parses the backup's "resumed vcpu=..." lines.
func resumedVCPUs(t *testing.T, out string) []agent.VCPUNote {
	t.Helper()
	var vs []agent.VCPUNote
	for _, m := range resumedRE.FindAllStringSubmatch(out, -1) {
		var n [4]uint64
		for i := range n {
			n[i], _ = strconv.ParseUint(m[1+i], 10, 64)
		}
		vs = append(vs, agent.VCPUNote{VCPU: int(n[0]), Iterations: n[1], Writes: n[2], Counter: n[3], Hash: m[5]})
	}
	if len(vs) == 0 {
		t.Fatalf("no resumed vcpu lines:\n%s", out)
	}
	return vs
}

// freeAddr returns a loopback address nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func waitProcess(t *testing.T, cmd *exec.Cmd, d time.Duration, what string, output func() string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%s still running after %v:\n%s", what, d, output())
		return nil
	}
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// labTLSArgs makes a lab PKI (repagent certs) in a temporary directory and
// returns the backup's and the primary's TLS flags over it, each end
// allowing only the other's name.
func labTLSArgs(t *testing.T) (backup, primary []string) {
	t.Helper()
	dir := t.TempDir()
	f, err := labcert.Write(dir, labcert.Options{})
	if err != nil {
		t.Fatal(err)
	}
	backup = []string{"--tls-cert", f.BackupCert, "--tls-key", f.BackupKey, "--tls-ca", f.CACert, "--tls-allow", labcert.DefaultPrimaryName}
	primary = []string{"--tls-cert", f.PrimaryCert, "--tls-key", f.PrimaryKey, "--tls-ca", f.CACert, "--tls-allow", labcert.DefaultBackupName}
	return backup, primary
}
