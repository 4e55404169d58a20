package replicate_test

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

var (
	_ replicate.VM        = (*testvm.Machine)(nil)
	_ replicate.PageNamer = (*testvm.Machine)(nil)
)

func testLog(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.DiscardHandler)
}

// TestKVMReplicateAndFailover replicates a running test VM over loopback
// TCP, cuts the primary off, and resumes the guest on the backup.
func TestKVMReplicateAndFailover(t *testing.T) {
	for _, wl := range []testvm.Workload{testvm.Dirty, testvm.Counter} {
		t.Run(wl.String(), func(t *testing.T) {
			m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: wl, Pattern: testvm.Seq, WorkingSet: 2000, Rate: 20000}, nil)
			resumed := make(chan *testvm.Machine, 1)
			pair := replicatetest.NewPair(t, replicate.Config{VM: m, Interval: 20 * time.Millisecond, AuditEvery: 1}, replicate.BackupConfig{
				NewMemory:     testvm.NewMemFile,
				VerifyReplica: true,
				Resume: func(cp *replicate.Checkpoint) error {
					rm, err := testvm.Restore(cp.State, cp.Memory, testvm.RestoreOptions{})
					if err != nil {
						return err
					}
					resumed <- rm
					return nil
				},
			})
			p := pair.Primary
			pair.WaitAcked(20)
			// Kill the link as a dead host would: the backup sees the stream end.
			pair.KillPrimary()
			if err := pair.PrimaryErr(); !errors.Is(err, replicate.ErrBackupLost) {
				t.Fatalf("primary: %v, want ErrBackupLost", err)
			}
			fo, err := pair.BackupResult()
			if err != nil {
				t.Fatalf("backup: %v", err)
			}
			t.Logf("failover to epoch %d (primary acked %d) in %v", fo.Epoch, p.LastAcked(), fo.Took)
			if fo.Epoch < p.LastAcked() || !fo.Verified {
				t.Fatalf("failover to epoch %d (verified %v), primary had %d acknowledged", fo.Epoch, fo.Verified, p.LastAcked())
			}
			rm := <-resumed
			defer rm.Close()
			if err := m.Pause(); err != nil {
				t.Fatal(err)
			}
			if err := rm.Start(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
			if err := rm.Pause(); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < rm.NumVCPUs(); i++ {
				st := rm.Status(i)
				t.Logf("vCPU %d after failover: %+v", i, st)
				if wl == testvm.Dirty {
					if _, err := rm.VerifyPages(i); err != nil {
						t.Fatal(err)
					}
				} else if testvm.CounterHash(testvm.CounterStart, 0, st.Counter) != st.Hash {
					t.Fatalf("vCPU %d: counter %d hash %x breaks the chain", i, st.Counter, st.Hash)
				}
			}
		})
	}
}

// Killing the backup leaves the primary's guest running, reported unprotected.
func TestKVMBackupLost(t *testing.T) {
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Rate: 20000}, nil)
	gate := &recordingGate{}
	pair := replicatetest.NewPair(t, replicate.Config{VM: m, Interval: 20 * time.Millisecond, Gates: []replicate.OutputGate{gate}},
		replicate.BackupConfig{NewMemory: testvm.NewMemFile})
	p := pair.Primary
	pair.WaitAcked(5)
	if !p.Protected() {
		t.Fatal("primary not protected after 5 acks")
	}
	pair.KillBackup() // the backup's session ends as if its host died
	pair.BackupResult()
	if err := pair.PrimaryErr(); !errors.Is(err, replicate.ErrBackupLost) {
		t.Fatalf("primary: %v, want ErrBackupLost", err)
	}
	if p.Protected() {
		t.Fatal("primary reports itself protected without a backup")
	}
	if m.State() != testvm.Running {
		t.Fatalf("guest is %v after the backup's loss, want running", m.State())
	}
	vmtest.WaitProgress(t, m, vmtest.Iterations(m))
	if !gate.released || gate.committed < 5 || gate.opened < gate.committed+1 {
		t.Fatalf("gates: opened %d, committed %d, released %v; want every acked epoch committed, then released", gate.opened, gate.committed, gate.released)
	}
}

// recordingGate records what the engine told it, checking the order.
type recordingGate struct {
	mu                sync.Mutex // Open may run while a Commit does
	opened, committed uint64
	discarded         []uint64
	released          bool
	err               error
}

func (g *recordingGate) Open(n uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n != g.opened+1 {
		return fmt.Errorf("open %d after %d", n, g.opened)
	}
	g.opened = n
	return nil
}

func (g *recordingGate) Commit(n uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n != g.committed+1 || n >= g.opened {
		return fmt.Errorf("commit %d after %d with %d open", n, g.committed, g.opened)
	}
	g.committed = n
	return nil
}

func (g *recordingGate) Discard(n uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.released || n != g.committed {
		return fmt.Errorf("discard after %d with %d committed, released %v", n, g.committed, g.released)
	}
	g.discarded = append(g.discarded, n)
	return nil
}

func (g *recordingGate) Release() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.released = true
	return nil
}

// The block device's writes into guest memory (read data, statuses, ring
// positions) are replicated: with the disk workload running, every pause
// audits all of guest memory against the replicated pages.
func TestKVMDiskDeviceAudited(t *testing.T) {
	img, err := os.CreateTemp(t.TempDir(), "disk")
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Disk, Pattern: testvm.Random,
		Disk: &testvm.DiskConfig{Blocks: 2048}, DiskIO: img}, nil)
	pair := replicatetest.NewPair(t, replicate.Config{VM: m, Interval: 10 * time.Millisecond, AuditEvery: 1},
		replicate.BackupConfig{NewMemory: testvm.NewMemFile})
	reads0 := m.DiskStats().Reads
	pair.WaitAcked(40)
	if err := pair.Stop(); err != nil {
		t.Fatalf("replication: %v", err)
	}
	if ds := m.DiskStats(); ds.Reads == reads0 || ds.Writes == 0 {
		t.Fatalf("the device did no reads or writes while replicated: %+v", ds)
	}
}

// slowConn is a link of a given rate in bytes per second (writes sleep
// for their bytes' time).
type slowConn struct {
	net.Conn
	rate float64
}

func (c slowConn) Write(b []byte) (int, error) {
	time.Sleep(time.Duration(float64(len(b)) / c.rate * float64(time.Second)))
	return c.Conn.Write(b)
}

// A guest that dirties memory faster than the sync sends it (a real KVM
// guest at full speed, a 100 MB/s link), with a first pause bounded far
// below what its rounds leave: the engine throttles the vCPUs
// (auto-converge) for the rounds after the first that stops shrinking,
// holds them for real, and the sync still ends and hands over to
// checkpoints that the audit proves exact. (The namespace test through a
// tbf-shaped link, cmd/repagent's TestSlowLinkProtected, does it with real
// parts end to end.)
func TestKVMSyncThrottles(t *testing.T) {
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq}, nil)
	// Let the guest write its whole working set a few times first: a sync
	// that starts while most of memory is still holes sends little, leaves
	// little, and rightly never throttles (seen once in CI under load).
	vmtest.WaitProgress(t, m, []uint64{4 * (32<<20 - testvm.DataAddr) / replicate.PageSize})
	var mu sync.Mutex
	var rounds []replicate.SyncProgress
	cfg := replicate.Config{VM: m, Interval: 20 * time.Millisecond, AuditEvery: 1,
		SyncPause: 500 * time.Microsecond, PrecopyThreshold: 64, HeartbeatTimeout: 5 * time.Second,
		OnSync: func(s replicate.SyncProgress) { mu.Lock(); rounds = append(rounds, s); mu.Unlock() }}
	pair := replicatetest.NewUnstartedPair(t, cfg, replicate.BackupConfig{NewMemory: testvm.NewMemFile})
	pair.Link = func(c net.Conn) net.Conn { return slowConn{c, 100e6} }
	pair.Start()
	pair.WaitAcked(10)
	mu.Lock()
	defer mu.Unlock()
	last := rounds[len(rounds)-1]
	if !last.Done {
		t.Fatalf("epochs acknowledged before the sync said it was done: %+v", rounds)
	}
	throttled := 0
	var share float64
	for i, r := range rounds {
		t.Logf("round %d: %d pages, %d left, throttle %.2f held %v, pause estimate %v, end %v", r.Round, r.Pages, r.Remaining, r.Throttle, r.Held, r.PauseEstimate, r.End)
		if r.Throttle < share {
			t.Fatalf("round %d: throttle fell from %.2f to %.2f during the sync", i, share, r.Throttle)
		}
		share = r.Throttle
		if r.Throttle > 0 {
			throttled++
			// The throttle holds the vCPUs for a share of each 20 ms period:
			// a round shorter than two periods may end before it holds.
			if r.Held <= 0 && r.Took > 40*time.Millisecond {
				t.Fatalf("round %d: throttled %.2f for %v but the vCPUs were never held", i, r.Throttle, r.Took)
			}
		}
	}
	if throttled == 0 {
		t.Fatalf("a full-speed guest and a 500µs first pause, and no round throttled: %+v", rounds)
	}
	if last.End == replicate.SyncNotShrinking && last.PauseEstimate > cfg.SyncPause {
		t.Fatalf("sync ended as %v with a pause estimate %v over the bound %v", last.End, last.PauseEstimate, cfg.SyncPause)
	}
}

// The initial sync sends what the guest never wrote (holes of its memfd)
// as zero pages without reading it, and the replica is still exact: the
// audit digests all of guest memory in every pause against the pages
// replicated.
func TestKVMSyncSkipsHoles(t *testing.T) {
	m := vmtest.Boot(t, testvm.Config{MemSize: 64 << 20, VCPUs: 1, Workload: testvm.Dirty, WorkingSet: 1000, Rate: 20000}, nil)
	rounds := make(chan replicate.SyncProgress, 64)
	cfg := replicate.Config{VM: m, Interval: 20 * time.Millisecond, AuditEvery: 1,
		OnSync: func(s replicate.SyncProgress) { rounds <- s }}
	pair := replicatetest.NewPair(t, cfg, replicate.BackupConfig{NewMemory: testvm.NewMemFile})
	pair.WaitAcked(5)
	r0 := <-rounds
	// The guest touched its code, page tables, status pages and a working
	// set of 1000 pages: most of its 16384 pages are holes.
	if r0.Round != 0 || r0.Holes < r0.Pages/2 || r0.Holes >= r0.Pages {
		t.Fatalf("round 0: %d pages, %d of them holes; want most but not all", r0.Pages, r0.Holes)
	}
	t.Logf("round 0: %d pages, %d holes sent unread", r0.Pages, r0.Holes)
}
