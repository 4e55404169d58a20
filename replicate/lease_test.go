package replicate_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
)

// fakeLease is a Lease the test decides on, which records every standby
// written and whether the gate had released anything at the time.
type fakeLease struct {
	mu          sync.Mutex
	valid       bool
	cause       error
	lost        chan struct{}
	failStandby bool
	gate        *recordingGate
	records     []standbyRecord
}

type standbyRecord struct {
	session   replicate.SessionID
	committed uint64 // the gate's last commit when it was written
	released  bool   // whether the gate was released then
}

func newFakeLease(gate *recordingGate) *fakeLease {
	return &fakeLease{valid: true, lost: make(chan struct{}), gate: gate}
}

func (l *fakeLease) Valid() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.valid
}

func (l *fakeLease) Lost() <-chan struct{} { return l.lost }

func (l *fakeLease) Cause() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cause
}

func (l *fakeLease) SetStandby(_ context.Context, s replicate.SessionID) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.failStandby || !l.valid {
		return errors.New("etcd unreachable")
	}
	l.gate.mu.Lock()
	l.records = append(l.records, standbyRecord{s, l.gate.committed, l.gate.released})
	l.gate.mu.Unlock()
	return nil
}

func (l *fakeLease) lose(cause error) {
	l.mu.Lock()
	l.valid, l.cause = false, cause
	l.mu.Unlock()
	close(l.lost)
}

func (l *fakeLease) snapshot() []standbyRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]standbyRecord(nil), l.records...)
}

func leasePair(t *testing.T) (*toyVM, *recordingGate, *fakeLease, *replicatetest.Pair) {
	vm := newToyVM(1 << 20)
	vm.start()
	gate := &recordingGate{}
	lease := newFakeLease(gate)
	pair := replicatetest.NewPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond,
		Gates: []replicate.OutputGate{gate}, Lease: lease}, replicate.BackupConfig{})
	pair.WaitAcked(5)
	recs := lease.snapshot()
	if len(recs) == 0 || recs[0].session != pair.Primary.Session() || recs[0].session.IsZero() || recs[0].committed != 0 {
		t.Fatalf("standby records %+v: want the session's (%v) first, before any commit", recs, pair.Primary.Session())
	}
	return vm, gate, lease, pair
}

// paused reports whether the toy VM is paused (Pause holds its run lock).
func paused(vm *toyVM) bool {
	if vm.run.TryLock() {
		vm.run.Unlock()
		return false
	}
	return true
}

// The lease's loss fences: nothing more is committed or released, the VM
// is paused, Run says why.
func TestLeaseLostFences(t *testing.T) {
	vm, gate, lease, pair := leasePair(t)
	defer vm.close()
	lease.lose(errors.New("lease expired"))
	err := pair.PrimaryErr()
	fe, ok := errors.AsType[*replicate.FencedError](err)
	if !ok || !errors.Is(err, replicate.ErrFenced) {
		t.Fatalf("primary: %v, want a *FencedError", err)
	}
	defer vm.Resume() // for close
	gate.mu.Lock()
	committed, released := gate.committed, gate.released
	gate.mu.Unlock()
	if released || committed != fe.LastCommitted || fe.LastRelease.After(fe.At) {
		t.Fatalf("gate: committed %d, released %v; fence: last committed %d at %v, fenced at %v: want nothing after the fence, nothing released",
			committed, released, fe.LastCommitted, fe.LastRelease, fe.At)
	}
	if !paused(vm) {
		t.Fatal("the fenced VM runs")
	}
	// The backup saw a lost primary, as after a crash: it would fail over
	// once it owns the VM (this pair's backup has no Resume).
	if _, err := pair.BackupResult(); !errors.Is(err, replicatetest.ErrNoResume) {
		t.Fatalf("backup: %v, want an attempted failover", err)
	}
}

// A lease that turns invalid fences at the next ack, before Lost closes.
func TestLeaseInvalidFencesAtAck(t *testing.T) {
	vm, gate, lease, pair := leasePair(t)
	defer vm.close()
	lease.mu.Lock()
	lease.valid = false
	lease.mu.Unlock()
	err := pair.PrimaryErr()
	if !errors.Is(err, replicate.ErrFenced) {
		t.Fatalf("primary: %v, want fenced", err)
	}
	defer vm.Resume()
	gate.mu.Lock()
	defer gate.mu.Unlock()
	if gate.released {
		t.Fatal("the gate was released after the lease turned invalid")
	}
}

// A lost backup: the record says no backup holds the VM before the held
// output is released.
func TestLeaseBackupLostClearsStandby(t *testing.T) {
	vm, gate, lease, pair := leasePair(t)
	defer vm.close()
	pair.KillBackup()
	err := pair.PrimaryErr()
	if !errors.Is(err, replicate.ErrBackupLost) {
		t.Fatalf("primary: %v, want the backup lost", err)
	}
	recs := lease.snapshot()
	last := recs[len(recs)-1]
	if !last.session.IsZero() || last.released {
		t.Fatalf("standby records %+v: want the last one empty, written before the gate's release", recs)
	}
	gate.mu.Lock()
	defer gate.mu.Unlock()
	if !gate.released {
		t.Fatal("the gate was not released: the VM runs unprotected and its output must pass")
	}
	if paused(vm) {
		t.Fatal("the VM of a primary that holds its lease was paused")
	}
}

// A lost backup whose loss cannot be recorded (etcd unreachable too):
// fenced, the held output never released.
func TestLeaseBackupLostUnrecordedFences(t *testing.T) {
	vm, gate, lease, pair := leasePair(t)
	defer vm.close()
	lease.mu.Lock()
	lease.failStandby = true
	lease.mu.Unlock()
	pair.KillBackup()
	err := pair.PrimaryErr()
	if !errors.Is(err, replicate.ErrFenced) {
		t.Fatalf("primary: %v, want fenced", err)
	}
	defer vm.Resume()
	gate.mu.Lock()
	defer gate.mu.Unlock()
	if gate.released {
		t.Fatal("held output was released though no record says the backup no longer holds the VM")
	}
	if !paused(vm) {
		t.Fatal("the fenced VM runs")
	}
}

// A backup of a version that cannot name its session cannot be fenced
// with: Run refuses before it replicates.
func TestLeaseNeedsNamedSessions(t *testing.T) {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()
	gate := &recordingGate{}
	pair := replicatetest.NewUnstartedPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond,
		Gates: []replicate.OutputGate{gate}, Lease: newFakeLease(gate)}, replicate.BackupConfig{})
	replicate.BackupSpeaks(pair.Backup, 2, 3)
	pair.Start()
	if err := pair.PrimaryErr(); err == nil || !strings.Contains(err.Error(), "fencing needs a backup that names its session") {
		t.Fatalf("primary: %v, want a refusal to fence with a version-3 backup", err)
	}
	gate.mu.Lock()
	defer gate.mu.Unlock()
	if gate.opened != 0 {
		t.Fatalf("the gate was opened (%d) for a session that cannot be fenced", gate.opened)
	}
}
