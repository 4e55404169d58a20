package replicate_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
)

// P6: staging is bounded. A link slower than the guest's dirty rate makes
// the next pause wait (reported), an epoch larger than all of staging is sent
// in its pause (reported), and replication stays exact through both.
func TestStagingBounded(t *testing.T) {
	for _, tt := range []struct {
		name         string
		stagingPages uint64
		wantOversize bool
	}{
		{"slow link", 1024, false},
		{"epochs larger than staging", 128, true}, // the toy dirties all its 256 pages each epoch
	} {
		t.Run(tt.name, func(t *testing.T) { testStagingBounded(t, tt.stagingPages, tt.wantOversize) })
	}
}

func testStagingBounded(t *testing.T, stagingPages uint64, wantOversize bool) {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()
	var mu sync.Mutex
	var stats []*replicate.EpochStats
	pair := replicatetest.NewUnstartedPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond, StagingBytes: stagingPages * replicate.PageSize,
		HeartbeatTimeout: 5 * time.Second, AuditEvery: 1,
		OnEpoch: func(s *replicate.EpochStats) { mu.Lock(); stats = append(stats, s); mu.Unlock() }},
		replicate.BackupConfig{VerifyReplica: true,
			Resume: func(cp *replicate.Checkpoint) error { defer cp.Memory.Close(); return checkToyReplica(cp) }})
	// A slow link: each page batch takes 20 ms, longer than the interval.
	pair.Proxy = proxy(func(f frame) ([]frame, bool) {
		if f.typ() == tPages {
			time.Sleep(20 * time.Millisecond)
		}
		return []frame{f}, false
	})
	pair.Timeout = 30 * time.Second
	pair.Start()
	pair.WaitAcked(20)
	pair.KillPrimary()
	pair.PrimaryErr()
	fo, ferr := pair.BackupResult()
	if ferr != nil {
		t.Fatalf("failover: %v", ferr)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(stats) < 20 {
		t.Fatalf("%d epochs acknowledged in 30 s", len(stats))
	}
	var waited, oversize int
	for _, s := range stats {
		if uint64(s.DirtyPages) > stagingPages && !s.Oversize {
			t.Fatalf("epoch %d staged %d pages in a %d-page staging", s.Epoch, s.DirtyPages, stagingPages)
		}
		if s.Oversize {
			oversize++
		}
		if s.Wait+s.Stall > 5*time.Millisecond {
			waited++
		}
		if !s.Audited {
			t.Fatalf("epoch %d not audited", s.Epoch)
		}
	}
	t.Logf("%d epochs: %d oversize, %d waited; failover to epoch %d", len(stats), oversize, waited, fo.Epoch)
	if (oversize > 0) != wantOversize || waited == 0 {
		t.Fatalf("%d oversize epochs and %d that waited for the link", oversize, waited)
	}
	if fo.Epoch < stats[len(stats)-1].Epoch {
		t.Fatalf("failover to epoch %d, but %d was acknowledged", fo.Epoch, stats[len(stats)-1].Epoch)
	}
}

// failingGate fails to open epoch failAt.
type failingGate struct{ failAt uint64 }

func (g *failingGate) Open(n uint64) error {
	if n == g.failAt {
		return fmt.Errorf("gate cannot open epoch %d", n)
	}
	return nil
}
func (g *failingGate) Commit(uint64) error  { return nil }
func (g *failingGate) Discard(uint64) error { return nil }
func (g *failingGate) Release() error       { return nil }

// When the primary stops replication itself while the link works (here a
// gate fails), it tells the backup, which must not fail over: the VM goes on
// running on the primary, and resuming it on the backup would make two.
func TestPrimaryAbortIsNotFailover(t *testing.T) {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()
	pair := replicatetest.NewPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond,
		Gates: []replicate.OutputGate{&failingGate{failAt: 8}}}, replicate.BackupConfig{})
	p := pair.Primary
	perr := pair.PrimaryErr()
	if perr == nil || errors.Is(perr, replicate.ErrBackupLost) || !strings.Contains(perr.Error(), "gate cannot open epoch 8") {
		t.Fatalf("primary: %v, want the gate's error, not a lost backup", perr)
	}
	fo, err := pair.BackupResult()
	if fo != nil {
		err = fmt.Errorf("failed over to epoch %d", fo.Epoch)
	}
	if !errors.Is(err, replicate.ErrPrimaryStopped) || !strings.Contains(err.Error(), "gate cannot open epoch 8") {
		t.Fatalf("backup: %v, want ErrPrimaryStopped with the primary's reason", err)
	}
	if p.Protected() {
		t.Fatal("primary reports itself protected after stopping replication")
	}
}

// failingVM is the toy VM whose Save fails from the failAt-th call on.
type failingVM struct {
	*toyVM
	saves, failAt int
}

func (v *failingVM) Save() ([]byte, error) {
	if v.saves++; v.saves >= v.failAt {
		return nil, errors.New("the VMM lost its vCPU")
	}
	return v.toyVM.Save()
}

// A VM that fails is not failed over to (the backup hears why), and its
// output since the last acknowledged epoch is discarded, never released.
func TestVMFailureDiscardsOutput(t *testing.T) {
	vm := &failingVM{toyVM: newToyVM(1 << 20), failAt: 8}
	vm.start()
	defer vm.close()
	gate := &recordingGate{}
	pair := replicatetest.NewPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond, Gates: []replicate.OutputGate{gate}},
		replicate.BackupConfig{})
	p := pair.Primary
	err := pair.PrimaryErr()
	if err == nil || errors.Is(err, replicate.ErrBackupLost) || !strings.Contains(err.Error(), "lost its vCPU") {
		t.Fatalf("primary: %v, want the VM's failure", err)
	}
	fo, berr := pair.BackupResult()
	if fo != nil {
		berr = fmt.Errorf("failed over to epoch %d", fo.Epoch)
	}
	if berr == nil || !strings.Contains(berr.Error(), "lost its vCPU") {
		t.Fatalf("backup: %v, want the primary's reason and no failover", berr)
	}
	if gate.err != nil {
		t.Fatal(gate.err)
	}
	if len(gate.discarded) != 1 || gate.discarded[0] != p.LastAcked() || !gate.released {
		t.Fatalf("gate: discarded %v, released %v, last ack %d; want one discard after the last ack, then release",
			gate.discarded, gate.released, p.LastAcked())
	}
}
