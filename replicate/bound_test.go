package replicate_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
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
	b, err := replicate.NewBackup(replicate.BackupConfig{NewMemory: tempMemory, Log: testLog(t), VerifyReplica: true,
		Resume: func(cp *replicate.Checkpoint) error { defer cp.Memory.Close(); return checkToyReplica(cp) }})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	bln, pln := listen(t), listen(t)
	var fo *replicate.Failover
	var ferr error
	bdone := make(chan struct{})
	go func() {
		defer close(bdone)
		conn, err := bln.Accept()
		if err != nil {
			ferr = err
			return
		}
		fo, ferr = b.Handle(context.Background(), conn)
	}()
	// A slow link: each page batch takes 20 ms, longer than the interval.
	go proxy(t, pln, bln.Addr().String(), func(f frame) ([]frame, bool) {
		if f.typ() == tPages {
			time.Sleep(20 * time.Millisecond)
		}
		return []frame{f}, false
	})
	conn, err := net.Dial("tcp", pln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var stats []*replicate.EpochStats
	p, err := replicate.NewPrimary(replicate.Config{VM: vm, Interval: 10 * time.Millisecond, StagingBytes: stagingPages * replicate.PageSize,
		HeartbeatTimeout: 5 * time.Second, Log: testLog(t), AuditEvery: 1,
		OnEpoch: func(s *replicate.EpochStats) { mu.Lock(); stats = append(stats, s); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	perr := make(chan error, 1)
	go func() { perr <- p.Run(context.Background(), conn) }()
	deadline := time.Now().Add(30 * time.Second)
	for p.LastAcked() < 20 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	conn.Close()
	<-perr
	<-bdone
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
	b := noResumeBackup(t, tempMemory)
	pc, bc := tcpPair(t)
	berr := make(chan error, 1)
	go func() {
		fo, err := b.Handle(context.Background(), bc)
		if fo != nil {
			err = fmt.Errorf("failed over to epoch %d", fo.Epoch)
		}
		berr <- err
	}()
	p, err := replicate.NewPrimary(replicate.Config{VM: vm, Interval: 10 * time.Millisecond, Log: testLog(t),
		Gates: []replicate.OutputGate{&failingGate{failAt: 8}}})
	if err != nil {
		t.Fatal(err)
	}
	perr := p.Run(context.Background(), pc)
	if perr == nil || errors.Is(perr, replicate.ErrBackupLost) || !strings.Contains(perr.Error(), "gate cannot open epoch 8") {
		t.Fatalf("primary: %v, want the gate's error, not a lost backup", perr)
	}
	select {
	case err := <-berr:
		if !errors.Is(err, replicate.ErrPrimaryStopped) || !strings.Contains(err.Error(), "gate cannot open epoch 8") {
			t.Fatalf("backup: %v, want ErrPrimaryStopped with the primary's reason", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("backup's session did not end")
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
	b, err := replicate.NewBackup(replicate.BackupConfig{NewMemory: tempMemory, Log: testLog(t),
		Resume: func(cp *replicate.Checkpoint) error { cp.Memory.Close(); return errors.New("must not resume") }})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	pc, bc := tcpPair(t)
	bdone := make(chan error, 1)
	go func() {
		fo, err := b.Handle(context.Background(), bc)
		if fo != nil {
			err = fmt.Errorf("failed over to epoch %d", fo.Epoch)
		}
		bdone <- err
	}()
	gate := &recordingGate{}
	p, err := replicate.NewPrimary(replicate.Config{VM: vm, Interval: 10 * time.Millisecond, Gates: []replicate.OutputGate{gate}, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	err = p.Run(context.Background(), pc)
	if err == nil || errors.Is(err, replicate.ErrBackupLost) || !strings.Contains(err.Error(), "lost its vCPU") {
		t.Fatalf("primary: %v, want the VM's failure", err)
	}
	if berr := <-bdone; berr == nil || !strings.Contains(berr.Error(), "lost its vCPU") {
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
