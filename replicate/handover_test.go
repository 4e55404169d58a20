package replicate_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
)

// A handover: the final pause leaves the VM stopped, the backup resumes
// exactly that checkpoint (the toy's memory there, byte for byte, is the
// stopped VM's), and Run returns nil with the record.
func TestHandover(t *testing.T) {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()
	var resumed struct {
		epoch uint64
		count uint64
		mem   []byte
		err   error
	}
	gate := &recordingGate{}
	pair := replicatetest.NewPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond, Gates: []replicate.OutputGate{gate}},
		replicate.BackupConfig{Resume: func(cp *replicate.Checkpoint) error {
			defer cp.Memory.Close()
			resumed.epoch, resumed.count = cp.Epoch, binary.LittleEndian.Uint64(cp.State)
			resumed.mem, resumed.err = io.ReadAll(io.NewSectionReader(cp.Memory, 0, int64(cp.Shape.MemSize)))
			if resumed.err == nil {
				resumed.err = checkToyReplica(cp)
			}
			return resumed.err
		}})
	pair.WaitAcked(3)
	if err := pair.Primary.Handover(); err != nil {
		t.Fatal(err)
	}
	if err := pair.PrimaryErr(); err != nil {
		t.Fatalf("primary: %v", err)
	}
	defer vm.Resume() // for close
	ho := pair.Primary.HandedOver()
	fo, err := pair.BackupResult()
	if err != nil || fo == nil || !fo.Handover || resumed.err != nil {
		t.Fatalf("backup: %+v, %v (resume: %v)", fo, err, resumed.err)
	}
	if ho == nil || ho.Epoch != fo.Epoch || ho.Epoch != resumed.epoch || ho.Epoch < 4 || ho.Downtime < ho.Pause || ho.SessionRun < ho.Downtime {
		t.Fatalf("handover %+v, backup resumed epoch %d", ho, fo.Epoch)
	}
	if !paused(vm) {
		t.Fatal("the handed-over VM runs here too")
	}
	if vm.count != resumed.count || !bytes.Equal(vm.mem, resumed.mem) {
		t.Fatalf("the VM stopped at count %d; the backup resumed count %d (memory equal: %v)", vm.count, resumed.count, bytes.Equal(vm.mem, resumed.mem))
	}
	gate.mu.Lock()
	defer gate.mu.Unlock()
	if gate.committed != ho.Epoch || gate.released {
		t.Fatalf("gate: committed %d, released %v; want the final epoch committed, nothing after it released", gate.committed, gate.released)
	}
	t.Logf("handed over epoch %d (%d pages): pause %v, acked %v, downtime %v", ho.Epoch, ho.Pages, ho.Pause, ho.Acked, ho.Downtime)
}

// A backup that cannot resume the handed-over checkpoint says why; the VM
// runs on here, unprotected.
func TestHandoverRefused(t *testing.T) {
	for _, tt := range []struct {
		name string
		want string
	}{
		{"resume fails", "handover of epoch"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			vm := newToyVM(1 << 20)
			vm.start()
			defer vm.close()
			gate := &recordingGate{}
			pair := replicatetest.NewUnstartedPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond, Gates: []replicate.OutputGate{gate}},
				replicate.BackupConfig{Resume: func(cp *replicate.Checkpoint) error {
					cp.Memory.Close()
					return errors.New("no room for it here")
				}})
			pair.Start()
			pair.WaitAcked(3)
			if err := pair.Primary.Handover(); err != nil {
				t.Fatal(err)
			}
			err := pair.PrimaryErr()
			var he *replicate.HandoverError
			if !errors.As(err, &he) || he.Unconfirmed || !errors.Is(err, replicate.ErrBackupLost) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("primary: %v, want a failed handover naming %q, the VM running on unprotected", err, tt.want)
			}
			if paused(vm) {
				t.Fatal("the VM stayed paused after a failed handover")
			}
			if pair.Primary.HandedOver() != nil {
				t.Fatal("a failed handover has a record")
			}
			gate.mu.Lock()
			defer gate.mu.Unlock()
			if !gate.released {
				t.Fatal("the gate still holds: the VM runs on unprotected and its output must pass")
			}
		})
	}
}

// A backup of version 3 has no handover: Handover refuses, and the session
// goes on, protected, as does a fenced VM's.
func TestHandoverRefusedUpFront(t *testing.T) {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()
	pair := replicatetest.NewUnstartedPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond}, replicate.BackupConfig{})
	replicate.BackupSpeaks(pair.Backup, 2, 3)
	pair.Start()
	pair.WaitAcked(3)
	if err := pair.Primary.Handover(); err == nil || !strings.Contains(err.Error(), "version 3") {
		t.Fatalf("Handover with a version-3 backup: %v, want a refusal naming the version", err)
	}
	n := pair.Primary.LastAcked()
	pair.WaitAcked(n + 3)
	if paused(vm) {
		t.Fatal("the VM was paused for a refused handover")
	}
	if err := pair.Stop(); err != nil {
		t.Fatalf("the session did not go on: %v", err)
	}
	lvm := newToyVM(1 << 20)
	p, err := replicate.NewPrimary(replicate.Config{VM: lvm, Lease: newFakeLease(&recordingGate{})})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Handover(); err == nil || !strings.Contains(err.Error(), "fenced VM") {
		t.Fatalf("Handover with a lease: %v, want a refusal", err)
	}
}

// A backup whose restore takes longer than the heartbeat timeout keeps
// heartbeating: the primary waits for its answer, with its own copy paused,
// instead of taking it for dead and resuming a second copy.
func TestHandoverSlowRestore(t *testing.T) {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()
	pair := replicatetest.NewPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond, HeartbeatTimeout: 300 * time.Millisecond},
		replicate.BackupConfig{HeartbeatTimeout: 300 * time.Millisecond, Resume: func(cp *replicate.Checkpoint) error {
			defer cp.Memory.Close()
			time.Sleep(time.Second) // three heartbeat timeouts
			return checkToyReplica(cp)
		}})
	pair.WaitAcked(3)
	if err := pair.Primary.Handover(); err != nil {
		t.Fatal(err)
	}
	if err := pair.PrimaryErr(); err != nil {
		t.Fatalf("primary: %v, want the handover completed", err)
	}
	defer vm.Resume()
	if ho := pair.Primary.HandedOver(); ho == nil || ho.Downtime < time.Second || !paused(vm) {
		t.Fatalf("handover %+v, paused %v: want it waited out the restore, the VM paused here", ho, paused(vm))
	}
	if fo, err := pair.BackupResult(); err != nil || fo == nil || !fo.Handover {
		t.Fatalf("backup: %+v, %v", fo, err)
	}
}
