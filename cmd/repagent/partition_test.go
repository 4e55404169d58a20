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

	"github.com/repagent/repagent/internal/etcdtest"
	"github.com/repagent/repagent/internal/nettest"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/procout"
)

// Partitions, with fencing through a real etcd: the primary and the backup
// are real processes in a network namespace, the guest's taps on a bridge
// with the client's veth (as in the kill tests), and each agent reaches etcd
// through a proxy of its own and the other agent through a third: cutting a
// proxy drops what crosses it, both ways, as a partition does. A client
// numbers the guest's udp-stream; it must never see a repeat or a step back,
// and the agents' own records (owner and fenced lines, with timestamps)
// must show that no two copies ran with output released at once.

const partitionTTL = 2 * time.Second

// partitionLab is the network and the proxies of one test.
type partitionLab struct {
	bin          string
	lan, cli     *nettest.Namespace
	pEtcd, bEtcd *etcdtest.Proxy // the primary's and the backup's way to etcd
	etcd         string
}

func newPartitionLab(t *testing.T) *partitionLab {
	privileged.Require(t, privileged.KVM, privileged.Root, privileged.NetAdmin, privileged.Etcd)
	l := newStreamLab(t)
	l.etcd = etcdtest.Start(t)[0]
	target := strings.TrimPrefix(l.etcd, "http://")
	l.pEtcd = l.proxy(t, func() (net.Conn, error) { return net.Dial("tcp", target) })
	l.bEtcd = l.proxy(t, func() (net.Conn, error) { return net.Dial("tcp", target) })
	return l
}

// newStreamLab is the network alone: the lan namespace with the taps tp
// and tb on a bridge with the client's veth (10.77.0.1 in cli).
func newStreamLab(t *testing.T) *partitionLab {
	privileged.Require(t, privileged.KVM, privileged.Root, privileged.NetAdmin)
	l := &partitionLab{bin: buildRepagent(t)}
	l.lan, l.cli = nettest.New(t), nettest.New(t)
	l.lan.AddTap(t, "tp", "")
	l.lan.AddTap(t, "tb", "")
	nettest.AddVeth(t, l.lan, "lan0", "", l.cli, "cli0", "10.77.0.1/24")
	l.lan.AddBridge(t, "br0", "", "tp", "tb", "lan0")
	return l
}

// proxy listens in the lan namespace and dials with dial.
func (l *partitionLab) proxy(t *testing.T, dial func() (net.Conn, error)) *etcdtest.Proxy {
	t.Helper()
	var ln net.Listener
	if err := l.lan.Do(func() (err error) {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return etcdtest.NewProxyOn(t, ln, dial)
}

// linkTo is a proxy to addr in the lan namespace: the replication link.
func (l *partitionLab) linkTo(t *testing.T, addr string) *etcdtest.Proxy {
	return l.proxy(t, func() (c net.Conn, err error) {
		err = l.lan.Do(func() error {
			c, err = net.Dial("tcp", addr)
			return err
		})
		return c, err
	})
}

// agents is one run: a backup, a link to it, a primary, a client.
type agents struct {
	t        *testing.T
	l        *partitionLab
	link     *etcdtest.Proxy
	backup   *exec.Cmd
	bout     *lineReader
	berr     fmt.Stringer
	primary  *exec.Cmd
	pout     *procout.Buffer
	perr     *procout.Buffer
	client   *streamClient
	stats    string
	pExit    chan error
	bExit    chan error
	bExitErr error
}

// start runs a backup and a primary fenced through etcd, with extra
// primary flags, and waits until the guest's stream is protected.
func (l *partitionLab) start(t *testing.T, name string, primaryArgs ...string) *agents {
	return l.startWith(t, name, false, primaryArgs...)
}

// startWith is start; with disk the guest runs the disk workload instead,
// over an image mirrored to the backup's, and start waits for acknowledged
// epochs instead of the stream (there is no client).
func (l *partitionLab) startWith(t *testing.T, name string, disk bool, primaryArgs ...string) *agents {
	var bdisk, pdisk []string
	if disk {
		dir := t.TempDir()
		pimg, bimg := filepath.Join(dir, "p.img"), filepath.Join(dir, "b.img")
		makeImage(t, pimg, 16<<20)
		makeImage(t, bimg, 16<<20)
		bdisk, pdisk = []string{"--disk", bimg}, []string{"--workload", "disk", "--rate", "2000", "--disk", pimg}
	}
	a := &agents{t: t, l: l, pout: &procout.Buffer{}, perr: &procout.Buffer{}, stats: filepath.Join(t.TempDir(), "stats.jsonl"),
		pExit: make(chan error, 1), bExit: make(chan error, 1)}
	ttl := partitionTTL.String()
	var bl *lineReader
	var addr string
	a.backup, bl, a.berr, addr = startBackupCmd(t, l.lan.Command(l.bin, append([]string{"backup", "--listen", "127.0.0.1:0", "--tap", "tb",
		"--run-after-failover", "3s", "--heartbeat-timeout", "2s", "--quiet",
		"--etcd", l.bEtcd.Endpoint(), "--name", name, "--lease-ttl", ttl}, bdisk...)...))
	a.bout = bl
	go func() { a.bExit <- a.backup.Wait() }()
	a.link = l.linkTo(t, addr)
	args := []string{"primary", "--backup", a.link.Addr(), "--tap", "tp", "--workload", "udp-stream", "--stream-rate", "1000",
		"--mem", "32M", "--interval", "20ms", "--heartbeat-timeout", "2s", "--quiet", "--stats", a.stats,
		"--etcd", l.pEtcd.Endpoint(), "--name", name, "--lease-ttl", ttl}
	a.primary = l.lan.Command(l.bin, append(append(args, pdisk...), primaryArgs...)...)
	a.primary.Stdout, a.primary.Stderr = a.pout, a.perr
	if err := a.primary.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.pExit <- a.primary.Wait() }()
	t.Cleanup(func() {
		a.primary.Process.Kill()
		a.backup.Process.Kill()
	})
	if disk {
		a.waitFor(30*time.Second, "20 acknowledged epochs", func() bool { return len(readStats(t, a.stats)) >= 20 })
		return a
	}
	a.client = newStreamClient(t, l.cli, "10.77.0.1")
	t.Cleanup(func() { a.client.conn.Close() })
	guest := &net.UDPAddr{IP: net.ParseIP(defaultGuestIP), Port: 7777}
	deadline := time.Now().Add(30 * time.Second)
	base := -1
	for base < 0 || len(a.client.snapshot()) < base+200 {
		if time.Now().After(deadline) {
			t.Fatalf("the stream was not protected within 30s (%d datagrams)\n%s", len(a.client.snapshot()), a.report())
		}
		if len(a.client.snapshot()) == 0 {
			a.client.conn.WriteToUDP([]byte("subscribe"), guest)
		}
		if base < 0 && len(readStats(t, a.stats)) > 0 {
			base = len(a.client.snapshot())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !ownerRE.MatchString(a.pout.String()) {
		t.Fatalf("the primary did not say it owns the VM\n%s", a.report())
	}
	return a
}

func (a *agents) report() string {
	return fmt.Sprintf("primary stdout:\n%s\nprimary stderr:\n%s\nbackup stdout:\n%s\nbackup stderr:\n%s",
		a.pout.String(), a.perr.String(), a.bout.String(), a.berr.String())
}

var (
	ownerRE  = regexp.MustCompile(`(?m)^owner: vm=(\S+) id=(\S+) revision=(\d+) at=(\d+)$`)
	fencedRE = regexp.MustCompile(`(?m)^fenced: vm=(\S+) last-released-epoch=(\d+) last-release=(\d+) at=(\d+) cause=(.*)$`)
)

// fenced waits for the primary to fence and exit with its own code, and
// returns the fenced line's last release and fence times.
func (a *agents) fenced(within time.Duration) (lastRelease, at time.Time) {
	a.t.Helper()
	select {
	case err := <-a.pExit:
		if code := exitCode(err); code != 4 {
			a.t.Fatalf("the primary exited with %v (code %d), want the fenced code 4\n%s", err, code, a.report())
		}
	case <-time.After(within):
		a.t.Fatalf("the primary did not fence within %v\n%s", within, a.report())
	}
	m := fencedRE.FindStringSubmatch(a.pout.String())
	if m == nil || !strings.Contains(a.perr.String(), "FENCED") {
		a.t.Fatalf("the primary exited fenced without its fenced line and message\n%s", a.report())
	}
	return unixNano(a.t, m[3]), unixNano(a.t, m[4])
}

// claimed waits for the backup's owner line and returns its time.
func (a *agents) claimed(within time.Duration) time.Time {
	a.t.Helper()
	deadline := time.Now().Add(within)
	for {
		if m := ownerRE.FindStringSubmatch(a.bout.String()); m != nil {
			return unixNano(a.t, m[4])
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("the backup did not own the VM within %v\n%s", within, a.report())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// streamGoesOn waits for n more datagrams than before.
func (a *agents) streamGoesOn(before, n int, within time.Duration, what string) {
	a.t.Helper()
	if a.client == nil {
		return
	}
	deadline := time.Now().Add(within)
	for len(a.client.snapshot()) < before+n {
		if time.Now().After(deadline) {
			a.t.Fatalf("%s: %d datagrams in %v, want %d\n%s", what, len(a.client.snapshot())-before, within, n, a.report())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkStream fails the test if the client ever saw a repeat or a step
// back: output from two copies of the guest, or output a resumed copy did
// not produce again.
func (a *agents) checkStream() []uint64 {
	a.t.Helper()
	if a.client == nil {
		return nil
	}
	seqs := a.client.snapshot()
	a.client.mu.Lock()
	bad := a.client.bad
	a.client.mu.Unlock()
	if len(bad) > 0 {
		a.t.Fatalf("malformed datagrams: %v", bad)
	}
	for i := 1; i < len(seqs); i++ {
		if seqs[i] <= seqs[i-1] {
			a.t.Fatalf("datagram %d has sequence %d after %d: a repeat or a step back\n%s", i, seqs[i], seqs[i-1], a.report())
		}
	}
	return seqs
}

// waitFor is the kill tests' waitFor, with both agents' output on failure.
func (a *agents) waitFor(d time.Duration, what string, cond func() bool) {
	a.t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			a.t.Fatalf("no %s within %v\n%s", what, d, a.report())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (a *agents) backupDone(within time.Duration) error {
	a.t.Helper()
	select {
	case err := <-a.bExit:
		return err
	case <-time.After(within):
		a.t.Fatalf("the backup still runs after %v\n%s", within, a.report())
		return nil
	}
}

func unixNano(t *testing.T, s string) time.Time {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// (a) The primary is cut off from both the backup and etcd, while its
// guest still reaches the client. It must fence before the backup resumes
// (which it does after the heartbeat timeout and the lease's expiry), and
// the client must see the stream go on from the backup without a repeat.
func TestPartitionPrimaryIsolated(t *testing.T) {
	l := newPartitionLab(t)
	t.Run("stream", func(t *testing.T) { l.isolate(t, "vm-a", false) })
	// The same with the disk workload: the backup's image must be the disk
	// of the epoch it resumes, by the guest's own records.
	t.Run("disk", func(t *testing.T) { l.isolate(t, "vm-a-disk", true) })
}

func (l *partitionLab) isolate(t *testing.T, name string, disk bool) {
	a := l.startWith(t, name, disk)
	cut := time.Now()
	a.link.Cut()
	l.pEtcd.Cut()
	defer l.pEtcd.Restore() // the lab's next test
	lastRelease, fencedAt := a.fenced(3 * partitionTTL)
	before := 0
	if a.client != nil {
		before = len(a.client.snapshot())
	}
	claimedAt := a.claimed(10 * partitionTTL)
	a.streamGoesOn(before, 200, 30*time.Second, "the stream after the failover")
	if err := a.backupDone(30 * time.Second); err != nil {
		t.Fatalf("backup: %v\n%s", err, a.report())
	}
	out := a.bout.String()
	if !strings.Contains(out, "verification passed") {
		t.Fatalf("the backup did not verify the resumed guest\n%s", a.report())
	}
	fm := failoverRE.FindStringSubmatch(out)
	if fm == nil {
		t.Fatalf("no failover line\n%s", a.report())
	}
	// The epoch resumed is one the primary acknowledged (or the one after,
	// whose ack was lost with the link), as the primary recorded it.
	checkAgainstStats(t, readStats(t, a.stats), fm, resumedVCPUs(t, out), a.report)
	if disk {
		if dv := diskVerifiedRE.FindStringSubmatch(out); dv == nil || dv[1] != fm[1] || !diskFinalRE.MatchString(out) {
			t.Fatalf("the backup's disk was not verified at the epoch it resumed (%s)\n%s", fm[1], a.report())
		}
	}
	seqs := a.checkStream()
	if !lastRelease.Before(fencedAt) || !fencedAt.Before(claimedAt) {
		t.Fatalf("the primary released output until %v and fenced at %v, the backup owned the VM at %v: not in that order",
			lastRelease, fencedAt, claimedAt)
	}
	t.Logf("cut at 0; primary's last release %v, fenced %v, backup owned the VM %v and resumed epoch %s; %d datagrams, none repeated",
		lastRelease.Sub(cut), fencedAt.Sub(cut), claimedAt.Sub(cut), fm[1], len(seqs))
}

// (b) Primary and backup are cut off from each other, both reach etcd:
// nobody fails over, the primary runs on unprotected (and says so), and
// once the link heals it protects the VM again, so that a later crash of
// the primary fails over to the backup.
func TestPartitionLinkOnly(t *testing.T) {
	l := newPartitionLab(t)
	a := l.start(t, "vm-b")
	a.link.Cut()
	// Well past the heartbeat timeout and the lease: no failover.
	deadline := time.Now().Add(2*time.Second + 3*partitionTTL)
	for time.Now().Before(deadline) {
		if ownerRE.MatchString(a.bout.String()) || strings.Contains(a.bout.String(), "failover:") {
			t.Fatalf("the backup failed over while the primary held the VM\n%s", a.report())
		}
		select {
		case err := <-a.pExit:
			t.Fatalf("the primary exited (%v) while it held the VM\n%s", err, a.report())
		default:
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(a.perr.String(), "backup lost: VM running UNPROTECTED") {
		t.Fatalf("the primary did not say it runs unprotected\n%s", a.report())
	}
	before := len(a.client.snapshot())
	a.streamGoesOn(before, 100, 10*time.Second, "the stream from the unprotected primary")

	a.link.Restore()
	a.waitFor(30*time.Second, "protection again", func() bool {
		return strings.Contains(a.pout.String(), "protecting the VM again")
	})
	// Protected again: a new session's epochs are acknowledged.
	n := len(readStats(t, a.stats))
	a.waitFor(30*time.Second, "acknowledged epochs of the new session", func() bool { return len(readStats(t, a.stats)) > n+20 })

	// Now the primary dies: the backup takes over once the lease expires.
	if err := a.primary.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.pExit
	before = len(a.client.snapshot())
	a.claimed(10 * partitionTTL)
	a.streamGoesOn(before, 200, 30*time.Second, "the stream after the failover")
	if err := a.backupDone(30 * time.Second); err != nil {
		t.Fatalf("backup: %v\n%s", err, a.report())
	}
	if !strings.Contains(a.bout.String(), "verification passed") {
		t.Fatalf("the backup did not verify the resumed guest\n%s", a.report())
	}
	a.checkStream()
}

// (c) etcd is unreachable from both. With --on-etcd-loss fence (the
// default) the primary fences within its lease and nobody resumes the VM
// until etcd answers; then the backup does, from the last acknowledged
// epoch. With run, the primary runs on protected, nobody fails over, and it
// owns the VM again once etcd answers.
func TestPartitionEtcdLost(t *testing.T) {
	l := newPartitionLab(t)
	t.Run("fence", func(t *testing.T) {
		a := l.start(t, "vm-c-fence")
		l.pEtcd.Cut()
		l.bEtcd.Cut()
		_, fencedAt := a.fenced(3 * partitionTTL)
		// The backup lost its primary and cannot own the VM: no failover.
		time.Sleep(2 * partitionTTL)
		if ownerRE.MatchString(a.bout.String()) || strings.Contains(a.bout.String(), "failover:") {
			t.Fatalf("the backup resumed the VM without owning it\n%s", a.report())
		}
		before := len(a.client.snapshot())
		l.pEtcd.Restore()
		l.bEtcd.Restore()
		claimedAt := a.claimed(10 * partitionTTL)
		if !fencedAt.Before(claimedAt) {
			t.Fatalf("the primary fenced at %v, after the backup owned the VM at %v", fencedAt, claimedAt)
		}
		a.streamGoesOn(before, 200, 30*time.Second, "the stream after the failover")
		if err := a.backupDone(30 * time.Second); err != nil {
			t.Fatalf("backup: %v\n%s", err, a.report())
		}
		a.checkStream()
	})
	t.Run("run", func(t *testing.T) {
		a := l.start(t, "vm-c-run", "--on-etcd-loss", "run")
		n := len(readStats(t, a.stats))
		l.pEtcd.Cut()
		l.bEtcd.Cut()
		time.Sleep(2 * partitionTTL)
		before := len(a.client.snapshot())
		a.streamGoesOn(before, 200, 10*time.Second, "the stream while etcd is unreachable")
		if m := len(readStats(t, a.stats)); m < n+50 {
			t.Fatalf("%d epochs acknowledged while etcd was unreachable, want replication to go on\n%s", m-n, a.report())
		}
		l.pEtcd.Restore()
		l.bEtcd.Restore()
		a.waitFor(10*partitionTTL, "the primary owning the VM again", func() bool {
			return strings.Contains(a.perr.String(), "own the VM again")
		})
		if ownerRE.MatchString(a.bout.String()) {
			t.Fatalf("the backup owned the VM while the primary ran\n%s", a.report())
		}
		// A planned stop: the backup has nothing to fail over.
		a.primary.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-a.pExit:
			if err != nil {
				t.Fatalf("primary: %v\n%s", err, a.report())
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("the primary did not stop\n%s", a.report())
		}
		if err := a.backupDone(30 * time.Second); err != nil {
			t.Fatalf("backup: %v\n%s", err, a.report())
		}
		if !strings.Contains(a.bout.String(), "primary stopped replication") {
			t.Fatalf("the backup did not hear of the planned stop\n%s", a.report())
		}
		a.checkStream()
	})
}
