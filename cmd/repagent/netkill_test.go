package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/nettest"
	"github.com/repagent/repagent/internal/privileged"
)

// streamClient receives a guest's udp-stream in the client namespace and
// keeps every sequence number in arrival order.
type streamClient struct {
	conn *net.UDPConn
	mu   sync.Mutex
	seqs []uint64
	bad  []string // malformed datagrams
}

func newStreamClient(t *testing.T, ns *nettest.Namespace, ip string) *streamClient {
	t.Helper()
	c := &streamClient{}
	if err := ns.Do(func() error {
		var err error
		c.conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(ip)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, err := c.conn.Read(buf)
			if err != nil {
				return
			}
			c.mu.Lock()
			if n < 16 {
				c.bad = append(c.bad, fmt.Sprintf("%d-byte datagram", n))
			} else {
				c.seqs = append(c.seqs, binary.BigEndian.Uint64(buf))
			}
			c.mu.Unlock()
		}
	}()
	return c
}

func (c *streamClient) snapshot() []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]uint64(nil), c.seqs...)
}

// P1 across failover: with udp-stream running, the primary process is
// SIGKILLed at a random moment, the backup process resumes the guest on its
// own tap and announces it; the client, behind a bridge that both taps are
// on, must see sequence numbers that never repeat and never go back, before
// and after the failover, and the stream must go on from the backup. Ten
// kills (REPAGENT_NETKILL_SEED replays a run).
func TestKillPrimaryNetwork(t *testing.T) {
	privileged.Require(t, privileged.KVM, privileged.Root, privileged.NetAdmin)
	bin := buildRepagent(t)
	lan, cli := nettest.New(t), nettest.New(t)
	lan.AddTap(t, "tp", "")
	lan.AddTap(t, "tb", "")
	nettest.AddVeth(t, lan, "lan0", "", cli, "cli0", "10.77.0.1/24")
	lan.AddBridge(t, "br0", "", "tp", "tb", "lan0")

	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("REPAGENT_NETKILL_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (REPAGENT_NETKILL_SEED replays it)", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	const kills = 10
	for i := 0; i < kills; i++ {
		// Kill after 20 to 400 datagrams reached the client, plus up to 50 ms.
		after, extra := 20+rng.IntN(380), time.Duration(rng.IntN(50))*time.Millisecond
		interval := []string{"10ms", "20ms", "50ms"}[rng.IntN(3)]
		capture := []string{"eager", "lazy", "auto"}[i%3] // the network device's DMA races lazy capture
		tls := i%2 == 1                                   // every other kill cuts a TLS session
		name := fmt.Sprintf("kill%d-%s", i, capture)
		if tls {
			name += "-tls"
		}
		t.Run(name, func(t *testing.T) { netKillOnce(t, bin, lan, cli, after, extra, interval, capture, tls) })
	}
}

func netKillOnce(t *testing.T, bin string, lan, cli *nettest.Namespace, after int, extra time.Duration, interval, capture string, tls bool) {
	var backupTLS, primaryTLS []string
	if tls {
		backupTLS, primaryTLS = labTLSArgs(t)
	}
	backup, bl, berr, addr := startBackupCmd(t, lan.Command(bin, append([]string{"backup", "--listen", "127.0.0.1:0", "--tap", "tb",
		"--run-after-failover", "2s", "--heartbeat-timeout", "5s", "--once"}, backupTLS...)...))
	var pout bytes.Buffer
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	primary := lan.Command(bin, "primary", "--backup", addr, "--tap", "tp", "--workload", "udp-stream", "--stream-rate", "2000",
		"--mem", "32M", "--interval", interval, "--heartbeat-timeout", "5s", "--quiet", "--stats", stats, "--audit-every", "1", "--capture", capture, "--capture-calibration", "1ms")
	primary.Args = append(primary.Args, primaryTLS...)
	primary.Stdout, primary.Stderr = &pout, &pout
	if err := primary.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { primary.Process.Kill(); primary.Wait() })
	report := func() string {
		return fmt.Sprintf("primary:\n%s\nbackup:\n%s%s", pout.String(), bl.String(), berr.String())
	}

	c := newStreamClient(t, cli, "10.77.0.1")
	defer c.conn.Close()
	guest := &net.UDPAddr{IP: net.ParseIP(defaultGuestIP), Port: 7777}
	// Subscribe until the stream flows. Until replication starts the guest
	// is not protected and its frames pass; the kill comes once the first
	// checkpoint is acknowledged, `after` datagrams later.
	deadline := time.Now().Add(30 * time.Second)
	base := -1
	for base < 0 || len(c.snapshot()) < base+after {
		if time.Now().After(deadline) {
			t.Fatalf("%d datagrams in 30s (%d once protected), want %d once protected\n%s", len(c.snapshot()), base, after, report())
		}
		if len(c.snapshot()) == 0 {
			c.conn.WriteToUDP([]byte("subscribe"), guest)
		}
		if base < 0 && len(readStats(t, stats)) > 0 {
			base = len(c.snapshot())
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(extra)
	if err := primary.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	primary.Wait()
	before := c.snapshot()
	lastBefore := before[len(before)-1]

	// The stream goes on from the backup.
	deadline = time.Now().Add(30 * time.Second)
	for {
		s := c.snapshot()
		if n := len(s) - len(before); n >= 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stream did not go on after the failover: %d datagrams before the kill (last %d), %d after\n%s",
				len(before), lastBefore, len(s)-len(before), report())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := waitProcess(t, backup, 30*time.Second, "backup", report); err != nil {
		t.Fatalf("backup: %v\n%s", err, report())
	}
	out := bl.String()
	if !strings.Contains(out, "announced mac=52:54:00:00:00:02 ip=10.77.0.2 on tb") || !strings.Contains(out, "verification passed") {
		t.Errorf("backup output lacks the announcement or the verdict:\n%s", report())
	}
	seqs := c.snapshot()
	c.mu.Lock()
	bad := c.bad
	c.mu.Unlock()
	if len(bad) > 0 {
		t.Fatalf("malformed datagrams: %v", bad)
	}
	for i := 1; i < len(seqs); i++ {
		if seqs[i] <= seqs[i-1] {
			t.Fatalf("P1 broken: datagram %d has sequence %d after %d (%d before the kill, last %d)\n%s",
				i, seqs[i], seqs[i-1], len(before), lastBefore, report())
		}
	}
	first := seqs[len(before)]
	t.Logf("interval %s: killed after %d datagrams (last %d); the backup's first is %d (%d held by the dead primary, lost), %d after",
		interval, len(before), lastBefore, first, first-lastBefore-1, len(seqs)-len(before))
}
