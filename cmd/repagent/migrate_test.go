package main

import (
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/testvm"
)

var migratedRE = regexp.MustCompile(`(?m)^migrated: epoch=(\d+) pages=(\d+) total=([\d.]+) ms downtime=([\d.]+) ms \(final pause ([\d.]+) ms, acknowledged ([\d.]+) ms\) paused-at=(\d+)$`)

// repagent migrate under each workload: the destination (a backup) resumes
// exactly the epoch the source says it handed over, as the source recorded
// it (its stats' note of that epoch: iterations, counters, hash chains);
// the disk is the disk of that epoch; the client's numbered stream never
// repeats or steps back and goes on from the destination; both sides
// verify the guest.
func TestMigrate(t *testing.T) {
	l := newStreamLab(t)
	for _, tt := range []struct {
		workload string
		args     []string
	}{
		{"dirty", []string{"--workload", "dirty", "--rate", "20000"}},
		{"counter", []string{"--workload", "counter", "--vcpus", "2"}},
		{"disk", []string{"--workload", "disk", "--rate", "2000"}},
		{"udp-stream", []string{"--workload", "udp-stream", "--stream-rate", "2000", "--tap", "tp", "--switchover-after", "2s"}},
	} {
		t.Run(tt.workload, func(t *testing.T) { l.migrateOnce(t, tt.workload, tt.args) })
	}
}

func (l *partitionLab) migrateOnce(t *testing.T, workload string, args []string) {
	dir := t.TempDir()
	var bdisk, pdisk []string
	if workload == "disk" {
		pimg, bimg := filepath.Join(dir, "p.img"), filepath.Join(dir, "b.img")
		makeImage(t, pimg, 16<<20)
		makeImage(t, bimg, 16<<20)
		pdisk, bdisk = []string{"--disk", pimg}, []string{"--disk", bimg}
	}
	var btap []string
	if workload == "udp-stream" {
		btap = []string{"--tap", "tb"}
	}
	b := l.startAgent(t, "destination", append(append([]string{"backup", "--listen", "127.0.0.1:0", "--run-after-failover", "2s",
		"--heartbeat-timeout", "2s"}, btap...), bdisk...)...)
	report := func() string { return "destination:\n" + b.out.String() }
	addr := b.listening(t, report)

	var client *streamClient
	if workload == "udp-stream" {
		client = newStreamClient(t, l.cli, "10.77.0.1")
		t.Cleanup(func() { client.conn.Close() })
	}
	stats := filepath.Join(dir, "stats.jsonl")
	src := l.startAgent(t, "source", append(append([]string{"migrate", "--to", addr, "--mem", "64M", "--interval", "20ms",
		"--quiet", "--stats", stats, "--duration", "60s"}, args...), pdisk...)...)
	report = func() string { return "source:\n" + src.out.String() + "\ndestination:\n" + b.out.String() }
	if client != nil {
		// Subscribe while the migration runs: the stream flows from the
		// source, then from the destination.
		guest := &net.UDPAddr{IP: net.ParseIP(defaultGuestIP), Port: 7777}
		deadline := time.Now().Add(30 * time.Second)
		for len(client.snapshot()) == 0 && time.Now().Before(deadline) {
			client.conn.WriteToUDP([]byte("subscribe"), guest)
			time.Sleep(5 * time.Millisecond)
		}
	}
	var serr error
	select {
	case serr = <-src.exit:
		src.exit <- serr
	case <-time.After(90 * time.Second):
		t.Fatalf("the source did not finish\n%s", report())
	}
	if serr != nil {
		t.Fatalf("source: %v\n%s", serr, report())
	}
	m := migratedRE.FindStringSubmatch(src.out.String())
	if m == nil || !strings.Contains(src.out.String(), "verification passed") {
		t.Fatalf("the source did not say it migrated and verified\n%s", report())
	}
	if client != nil {
		before := len(client.snapshot())
		if before < 1000 {
			t.Fatalf("%d datagrams from the source before the switchover, want the stream flowing\n%s", before, report())
		}
		deadline := time.Now().Add(10 * time.Second)
		for len(client.snapshot()) < before+100 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		seqs := client.snapshot()
		if len(seqs) < before+100 || !strings.Contains(b.out.String(), "announced mac=52:54:00:00:00:02 ip=10.77.0.2 on tb") {
			t.Fatalf("the stream did not go on from the destination (%d datagrams)\n%s", len(seqs), report())
		}
		for i := 1; i < len(seqs); i++ {
			if seqs[i] <= seqs[i-1] {
				t.Fatalf("datagram %d has sequence %d after %d: a repeat or a step back\n%s", i, seqs[i], seqs[i-1], report())
			}
		}
	}
	var berr error
	select {
	case berr = <-b.exit:
		b.exit <- berr
	case <-time.After(60 * time.Second):
		t.Fatalf("the destination did not finish\n%s", report())
	}
	out := b.out.String()
	if berr != nil || !strings.Contains(out, "verification passed") {
		t.Fatalf("destination: %v\n%s", berr, report())
	}
	fm := failoverRE.FindStringSubmatch(out)
	if fm == nil || fm[1] != m[1] {
		t.Fatalf("the source handed over epoch %s, the destination resumed %v\n%s", m[1], fm, report())
	}
	// The epoch handed over was acknowledged: the source recorded it.
	epoch, _ := strconv.ParseUint(m[1], 10, 64)
	acked := readStats(t, stats)
	if len(acked) == 0 || acked[len(acked)-1].Epoch != epoch {
		t.Fatalf("the source's last acknowledged epoch is not the one handed over (%s)\n%s", m[1], report())
	}
	checkAgainstStats(t, acked, fm, resumedVCPUs(t, out), report)
	for _, v := range resumedVCPUs(t, out) {
		if workload == "counter" {
			h, _ := strconv.ParseUint(v.Hash, 16, 64)
			if testvm.CounterHash(testvm.CounterStart, 0, v.Counter) != h {
				t.Fatalf("vCPU %d resumed at counter %d with hash %s, off its chain", v.VCPU, v.Counter, v.Hash)
			}
		}
	}
	if workload == "disk" {
		dv := diskVerifiedRE.FindStringSubmatch(out)
		if dv == nil || dv[1] != m[1] || !diskFinalRE.MatchString(out) {
			t.Fatalf("the destination's disk was not verified at epoch %s\n%s", m[1], report())
		}
	}
	t.Logf("%s: %s", workload, m[0])
}

// A destination that refuses, or dies in the middle of the migration:
// the VM runs on at the source, which verifies it and exits with 5.
func TestMigrateFails(t *testing.T) {
	l := newStreamLab(t)
	t.Run("refused", func(t *testing.T) {
		b := l.startAgent(t, "destination", "backup", "--listen", "127.0.0.1:0", "--expect-mem", "64M", "--expect-vcpus", "1")
		addr := b.listening(t, func() string { return b.out.String() })
		src := l.startAgent(t, "source", "migrate", "--to", addr, "--mem", "32M", "--quiet", "--duration", "2s")
		l.migrateFailed(t, src, b, "VM shape mismatch")
	})
	t.Run("killed", func(t *testing.T) {
		b := l.startAgent(t, "destination", "backup", "--listen", "127.0.0.1:0", "--heartbeat-timeout", "2s")
		addr := b.listening(t, func() string { return b.out.String() })
		// A big guest at full speed: the sync takes a while, and the
		// destination dies in it.
		src := l.startAgent(t, "source", "migrate", "--to", addr, "--mem", "512M", "--interval", "20ms", "--duration", "3s",
			"--heartbeat-timeout", "2s", "--no-throttle")
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(src.out.String(), "sync round 0") {
			if time.Now().After(deadline) {
				t.Fatalf("no sync round\nsource:\n%s", src.out.String())
			}
			time.Sleep(time.Millisecond)
		}
		b.cmd.Process.Signal(syscall.SIGKILL)
		l.migrateFailed(t, src, b, "migration failed")
	})
}

func (l *partitionLab) migrateFailed(t *testing.T, src, b *chainAgent, want string) {
	t.Helper()
	var err error
	select {
	case err = <-src.exit:
		src.exit <- err
	case <-time.After(60 * time.Second):
		t.Fatalf("the source did not finish\nsource:\n%s\ndestination:\n%s", src.out.String(), b.out.String())
	}
	out := src.out.String()
	if code := exitCode(err); code != 5 || !strings.Contains(out, want) || !strings.Contains(out, "verification passed") ||
		migratedRE.MatchString(out) {
		t.Fatalf("source: exit %d (%v), want 5, %q, the guest verified, nothing migrated\nsource:\n%s\ndestination:\n%s",
			code, err, want, out, b.out.String())
	}
	if failoverRE.MatchString(b.out.String()) {
		t.Fatalf("the destination resumed the VM\n%s", b.out.String())
	}
}
