package main

import (
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/procout"
)

// backupEpochRE is a backup's per-second line: the latest epoch applied.
var (
	backupEpochRE = regexp.MustCompile(`(?m)^\s+[\d.]+s  epoch (\d+) `)
	listeningMRE  = regexp.MustCompile(`(?m)^listening on (\S+)$`)
)

// A chain of two failovers: A protects its VM to B; B, with --reprotect-to,
// protects the VM it resumed to C; A dies, then B. Each failover is checked:
// the resumed epoch against its primary's record (A's stats), the disk
// against the guest's own records, the client's numbered stream for a
// repeat or a step back, and C's guest verified after it ran on. All three
// agents fence through etcd: B resumes only once it owns the VM, records
// C's session as the standby, and C resumes only that.
func TestChainOfFailovers(t *testing.T) {
	l := newPartitionLab(t)
	l.lan.AddTap(t, "tc", "")
	l.lan.MustIP(t, "link", "set", "tc", "master", "br0")
	t.Run("net", func(t *testing.T) { l.chain(t, "chain-net", false) })
	t.Run("disk", func(t *testing.T) { l.chain(t, "chain-disk", true) })
}

// chainAgent is one process of a chain and its output.
type chainAgent struct {
	name string
	cmd  *exec.Cmd
	out  *procout.Buffer
	exit chan error
}

func (l *partitionLab) startAgent(t *testing.T, name string, args ...string) *chainAgent {
	t.Helper()
	a := &chainAgent{name: name, out: &procout.Buffer{}, exit: make(chan error, 1)}
	a.cmd = l.lan.Command(l.bin, args...)
	a.cmd.Stdout, a.cmd.Stderr = a.out, a.out
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.exit <- a.cmd.Wait() }()
	t.Cleanup(func() { a.cmd.Process.Kill(); <-a.exit; a.exit <- nil })
	return a
}

// listening waits for a backup's address.
func (a *chainAgent) listening(t *testing.T, report func() string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if m := listeningMRE.FindStringSubmatch(a.out.String()); m != nil {
			return m[1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not say where it listens\n%s", a.name, report())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (l *partitionLab) chain(t *testing.T, vm string, disk bool) {
	etcd := []string{"--etcd", l.pEtcd.Endpoint(), "--name", vm, "--lease-ttl", partitionTTL.String()}
	common := append([]string{"--heartbeat-timeout", "2s"}, etcd...)
	var imgs [3][]string
	if disk {
		dir := t.TempDir()
		for i, n := range []string{"a", "b", "c"} {
			p := filepath.Join(dir, n+".img")
			makeImage(t, p, 16<<20)
			imgs[i] = []string{"--disk", p}
		}
	}
	tap := func(name string) []string {
		if disk {
			return nil
		}
		return []string{"--tap", name}
	}
	var agents []*chainAgent
	report := func() string {
		var b strings.Builder
		for _, a := range agents {
			fmt.Fprintf(&b, "%s:\n%s\n", a.name, a.out.String())
		}
		return b.String()
	}
	c := l.startAgent(t, "C", append(append(append([]string{"backup", "--listen", "127.0.0.1:0", "--run-after-failover", "3s"}, tap("tc")...), imgs[2]...), common...)...)
	agents = append(agents, c)
	caddr := c.listening(t, report)
	b := l.startAgent(t, "B", append(append(append([]string{"backup", "--listen", "127.0.0.1:0", "--run-after-failover", "2m",
		"--reprotect-to", caddr, "--reprotect-interval", "20ms"}, tap("tb")...), imgs[1]...), common...)...)
	agents = append(agents, b)
	baddr := b.listening(t, report)
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	workload := []string{"--workload", "udp-stream", "--stream-rate", "1000"}
	if disk {
		workload = []string{"--workload", "disk", "--rate", "2000"}
	}
	a := l.startAgent(t, "A", append(append(append(append([]string{"primary", "--backup", baddr, "--mem", "32M", "--interval", "20ms",
		"--quiet", "--stats", stats}, workload...), tap("tp")...), imgs[0]...), common...)...)
	agents = append(agents, a)

	var client *streamClient
	if !disk {
		client = newStreamClient(t, l.cli, "10.77.0.1")
		t.Cleanup(func() { client.conn.Close() })
	}
	guest := &net.UDPAddr{IP: net.ParseIP(defaultGuestIP), Port: 7777}
	received := func() int {
		if client == nil {
			return 0
		}
		return len(client.snapshot())
	}
	// moreOf waits for the stream to go on by n datagrams (nothing without
	// a network).
	moreOf := func(n int, what string) {
		t.Helper()
		if client == nil {
			return
		}
		base, deadline := received(), time.Now().Add(30*time.Second)
		for received() < base+n {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d datagrams in 30s, want %d\n%s", what, received()-base, n, report())
			}
			if received() == 0 {
				client.conn.WriteToUDP([]byte("subscribe"), guest)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitLine := func(ag *chainAgent, re *regexp.Regexp, what string) []string {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			if m := re.FindStringSubmatch(ag.out.String()); m != nil {
				return m
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no %s in 30s\n%s", ag.name, what, report())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	appliedAtLeast := func(ag *chainAgent, n uint64, what string) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			ms := backupEpochRE.FindAllStringSubmatch(ag.out.String(), -1)
			if len(ms) > 0 {
				if e, _ := strconv.ParseUint(ms[len(ms)-1][1], 10, 64); e >= n {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not %d epochs applied in 60s (%s)\n%s", ag.name, n, what, report())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	kill := func(ag *chainAgent) {
		t.Helper()
		ag.cmd.Process.Signal(syscall.SIGKILL)
		<-ag.exit
		ag.exit <- nil
	}

	// A protects its VM to B.
	moreOf(200, "A's stream")
	appliedAtLeast(b, 20, "A's epochs")
	kill(a)

	// B resumes it, A's epoch, and protects it to C.
	fb := waitLine(b, failoverRE, "failover")
	checkAgainstStats(t, readStats(t, stats), fb, resumedVCPUs(t, b.out.String()), report)
	if disk {
		dv := waitLine(b, diskVerifiedRE, "disk verified line")
		if dv[1] != fb[1] {
			t.Fatalf("B verified the disk at epoch %s, resumed %s", dv[1], fb[1])
		}
	}
	waitLine(b, regexp.MustCompile(`(?m)^protecting the resumed VM: backup `), "protection of the resumed VM")
	moreOf(200, "B's stream")
	appliedAtLeast(c, 20, "B's epochs")
	kill(b)

	// C resumes it from B's epochs, runs it on and verifies it.
	fc := waitLine(c, failoverRE, "failover")
	if disk {
		dv := waitLine(c, diskVerifiedRE, "disk verified line")
		if dv[1] != fc[1] {
			t.Fatalf("C verified the disk at epoch %s, resumed %s", dv[1], fc[1])
		}
	}
	moreOf(200, "C's stream")
	select {
	case err := <-c.exit:
		c.exit <- err
		if err != nil {
			t.Fatalf("C: %v\n%s", err, report())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("C did not finish\n%s", report())
	}
	if !strings.Contains(c.out.String(), "verification passed") {
		t.Fatalf("C did not verify the guest\n%s", report())
	}
	for _, ag := range []*chainAgent{b, c} {
		if !ownerRE.MatchString(ag.out.String()) {
			t.Fatalf("%s resumed the VM without saying it owns it\n%s", ag.name, report())
		}
	}
	if client != nil {
		seqs := client.snapshot()
		for i := 1; i < len(seqs); i++ {
			if seqs[i] <= seqs[i-1] {
				t.Fatalf("datagram %d has sequence %d after %d: a repeat or a step back\n%s", i, seqs[i], seqs[i-1], report())
			}
		}
		t.Logf("B resumed epoch %s, C epoch %s; %d datagrams, none repeated", fb[1], fc[1], len(seqs))
	} else {
		t.Logf("B resumed epoch %s, C epoch %s, each disk verified", fb[1], fc[1])
	}
}

// checkAgainstStats checks a failover to the epoch of line fm against the
// primary's own records: no older than its last ack, digest and vCPU notes
// equal to the record of that epoch.
func checkAgainstStats(t *testing.T, acked []statsLine, fm []string, resumed []agent.VCPUNote, report func() string) {
	t.Helper()
	if len(acked) == 0 {
		t.Fatalf("the primary recorded no acknowledged epoch\n%s", report())
	}
	epoch, _ := strconv.ParseUint(fm[1], 10, 64)
	last := acked[len(acked)-1].Epoch
	if epoch < last || epoch > last+4 {
		t.Fatalf("resumed epoch %d; the primary's last acknowledged epoch is %d\n%s", epoch, last, report())
	}
	for _, l := range acked {
		if l.Epoch != epoch {
			continue
		}
		if l.Digest != fm[2] || len(l.Note) != len(resumed) {
			t.Fatalf("epoch %d: resumed digest %s with %d vCPUs, the primary recorded %s with %d", epoch, fm[2], len(resumed), l.Digest, len(l.Note))
		}
		for i, n := range l.Note {
			if n != resumed[i] {
				t.Fatalf("epoch %d vCPU %d: resumed %+v, the primary recorded %+v", epoch, i, resumed[i], n)
			}
		}
	}
}
