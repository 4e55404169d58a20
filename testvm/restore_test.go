package testvm_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/testvm"
)

// The restore side of TestSaveRestoreAcrossProcesses runs in a child process:
// this test binary re-executed with envChild set.
const envChild = "REPAGENT_TESTVM_RESTORE_CHILD"

func TestMain(m *testing.M) {
	if path := os.Getenv(envChild); path != "" {
		if err := restoreChild(path, os.Getenv(envChild+"_WANT")); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		fmt.Println("child: ok")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// describe records what the parent saw when it saved: per vCPU its counter,
// hash and writes, and the memory checksum.
func describe(m *testvm.Machine) string {
	var parts []string
	for i := 0; i < m.NumVCPUs(); i++ {
		st := m.Status(i)
		parts = append(parts, fmt.Sprintf("%d,%d,%d", st.Counter, st.Hash, st.Writes))
	}
	parts = append(parts, strconv.FormatUint(uint64(crc32.Checksum(m.Memory(), crcTable)), 10))
	return strings.Join(parts, ";")
}

// restoreChild restores the snapshot, checks that the machine is exactly what
// the parent saved, runs it, and checks that the guest continued from there.
func restoreChild(path, want string) error {
	state, mem, err := testvm.ReadSnapshot(path)
	if err != nil {
		return err
	}
	m, err := testvm.Restore(state, mem, testvm.RestoreOptions{})
	if err != nil {
		return err
	}
	defer m.Close()
	if got := describe(m); got != want {
		return fmt.Errorf("restored machine is %q, saved was %q", got, want)
	}
	saved := make([]testvm.Status, m.NumVCPUs())
	for i := range saved {
		saved[i] = m.Status(i)
	}
	if err := m.Start(); err != nil {
		return err
	}
	deadline := time.Now().Add(vmtest.Wait)
	for i := range saved {
		for m.Status(i).Iterations < saved[i].Iterations+1000 {
			if m.Err() != nil {
				return m.Err()
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("vCPU %d made no progress after restore", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
	if err := m.Pause(); err != nil {
		return err
	}
	for i, s := range saved {
		st := m.Status(i)
		switch m.Config().Workload {
		case testvm.Counter:
			// The counter went on from exactly the saved value: its hash chain,
			// continued from the saved (counter, hash), gives the hash now.
			if want := testvm.CounterHash(s.Hash, s.Counter, st.Counter); st.Counter <= s.Counter || st.Hash != want {
				return fmt.Errorf("vCPU %d: counter %d hash %#x after restore; from the saved %d/%#x the hash should be %#x",
					i, st.Counter, st.Hash, s.Counter, s.Hash, want)
			}
		case testvm.Dirty:
			if st.Writes <= s.Writes {
				return fmt.Errorf("vCPU %d: %d writes after restore, saved %d", i, st.Writes, s.Writes)
			}
			if _, err := m.VerifyPages(i); err != nil {
				return err
			}
		}
	}
	return nil
}

// Save in one process and restore in another: the guest continues from exactly
// the saved values and its memory verifies.
func TestSaveRestoreAcrossProcesses(t *testing.T) {
	tests := []struct {
		name string
		cfg  testvm.Config
	}{
		{"counter", testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Counter}},
		{"dirty", testvm.Config{MemSize: 64 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.Seq, WorkingSet: 3000}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := vmtest.Boot(t, tt.cfg, nil)
			vmtest.WaitProgress(t, m, []uint64{10000, 10000})
			if err := m.Pause(); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 2; i++ {
				if _, err := m.VerifyPages(i); err != nil && tt.cfg.Workload == testvm.Dirty {
					t.Fatal(err)
				}
			}
			path := filepath.Join(t.TempDir(), "vm.snap")
			if err := m.WriteSnapshot(path); err != nil {
				t.Fatal(err)
			}
			want := describe(m)
			m.Close()

			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), envChild+"="+path, envChild+"_WANT="+want)
			out, err := cmd.CombinedOutput()
			if err != nil || !bytes.Contains(out, []byte("child: ok")) {
				t.Fatalf("restore in a child process: %v\n%s", err, out)
			}
		})
	}
}

// snapshot boots a small counter VM, saves it and returns the file.
func snapshot(t *testing.T) string {
	m := vmtest.Boot(t, testvm.Config{MemSize: 16 << 20, VCPUs: 1, Workload: testvm.Counter}, nil)
	vmtest.WaitProgress(t, m, []uint64{1000})
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "vm.snap")
	if err := m.WriteSnapshot(path); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestBadSnapshotFiles(t *testing.T) {
	path := snapshot(t)
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, mem, err := testvm.ReadSnapshot(path); err != nil {
		t.Fatalf("the good snapshot: %v", err)
	} else {
		mem.Close()
	}
	stateLen := int(binary.LittleEndian.Uint64(good[16:]))
	memOff := int(binary.LittleEndian.Uint64(good[24:]))
	tests := []struct {
		name   string
		mutate func([]byte) []byte
		want   error
	}{
		{"empty", func(b []byte) []byte { return nil }, testvm.ErrBadSnapshot},
		{"truncated header", func(b []byte) []byte { return b[:20] }, testvm.ErrBadSnapshot},
		{"truncated memory", func(b []byte) []byte { return b[:len(b)-4096] }, testvm.ErrBadSnapshot},
		{"not a snapshot", func(b []byte) []byte { b[0] = 'X'; return b }, testvm.ErrBadSnapshot},
		{"header bit flip", func(b []byte) []byte { b[33] ^= 1; return b }, testvm.ErrBadSnapshot},
		{"state bit flip", func(b []byte) []byte { b[48+stateLen/2] ^= 0x10; return b }, testvm.ErrBadState},
		{"state version", func(b []byte) []byte { b[48+8] = 9; return b }, testvm.ErrBadState},
		{"memory bit flip", func(b []byte) []byte { b[memOff+0x100000+77] ^= 4; return b }, testvm.ErrBadSnapshot},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := filepath.Join(t.TempDir(), "bad.snap")
			if err := os.WriteFile(bad, tt.mutate(append([]byte(nil), good...)), 0o644); err != nil {
				t.Fatal(err)
			}
			state, mem, err := testvm.ReadSnapshot(bad)
			if !errors.Is(err, tt.want) {
				t.Fatalf("ReadSnapshot = %v, want %v", err, tt.want)
			}
			if state != nil || mem != nil {
				t.Fatal("ReadSnapshot returned a result with its error")
			}
			t.Log(err)
		})
	}
}

// A state restored onto memory of another size is refused, and the memory
// file is left as it was.
func TestRestoreRejectsOtherMemorySize(t *testing.T) {
	state, mem, err := testvm.ReadSnapshot(snapshot(t))
	if err != nil {
		t.Fatal(err)
	}
	mem.Close()
	fd, err := unix.MemfdCreate("other", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	other := os.NewFile(uintptr(fd), "other")
	defer other.Close()
	if err := other.Truncate(32 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := other.WriteAt([]byte("marker"), 4096); err != nil {
		t.Fatal(err)
	}
	m, err := testvm.Restore(state, other, testvm.RestoreOptions{})
	if err == nil {
		m.Close()
		t.Fatal("Restore accepted a 32 MiB memory file for a 16 MiB state")
	}
	if !errors.Is(err, testvm.ErrBadState) || !strings.Contains(err.Error(), "16MiB") {
		t.Fatalf("Restore = %v, want ErrBadState naming the 16MiB guest", err)
	}
	buf := make([]byte, 6)
	if _, err := other.ReadAt(buf, 4096); err != nil || string(buf) != "marker" {
		t.Fatalf("memory file changed by a refused restore: %q %v", buf, err)
	}
	if fi, _ := other.Stat(); fi.Size() != 32<<20 {
		t.Fatalf("memory file resized to %d", fi.Size())
	}
	// Truncated and corrupted states are refused too, before anything is built.
	for _, n := range []int{0, 10, len(state) / 3, len(state) - 1} {
		if _, err := testvm.DecodeState(state[:n]); !errors.Is(err, testvm.ErrBadState) {
			t.Errorf("DecodeState(%d of %d bytes) = %v, want ErrBadState", n, len(state), err)
		}
	}
}

// A restore that fails while building the VM (here: KVM refuses an absurd
// dirty ring) returns an error, cleans up, and leaves the memory file open and
// the caller's.
func TestRestoreErrorPathCleansUp(t *testing.T) {
	state, mem, err := testvm.ReadSnapshot(snapshot(t))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	m, err := testvm.Restore(state, mem, testvm.RestoreOptions{DirtyRingEntries: 1 << 30})
	if err == nil {
		m.Close()
		t.Fatal("Restore with a 1G-entry dirty ring succeeded")
	}
	if _, err := mem.Stat(); err != nil {
		t.Fatalf("the memory file was closed by a failed restore: %v", err)
	}
	m, err = testvm.Restore(state, mem, testvm.RestoreOptions{})
	if err != nil {
		t.Fatalf("restoring the same state and memory after the failure: %v", err)
	}
	m.Close()
}

// A Shell built from an early checkpoint, over memory that changes after
// (as a backup's replica does), restores a later checkpoint exactly: the
// machine is what was saved then, and its counters go on from there.
func TestShellRestoresLaterState(t *testing.T) {
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Counter}, nil)
	type snap struct {
		state, mem []byte
		desc       string
		status     []testvm.Status
	}
	snapshot := func() snap {
		t.Helper()
		if err := m.Pause(); err != nil {
			t.Fatal(err)
		}
		defer m.Resume()
		state, err := m.Save()
		if err != nil {
			t.Fatal(err)
		}
		sn := snap{state: state, mem: append([]byte(nil), m.Memory()...), desc: describe(m)}
		for i := range m.NumVCPUs() {
			sn.status = append(sn.status, m.Status(i))
		}
		return sn
	}
	early := snapshot()
	mem, err := testvm.NewMemFile(32 << 20)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mem.WriteAt(early.mem, 0); err != nil {
		t.Fatal(err)
	}
	sh, err := testvm.Prepare(early.state, mem, testvm.RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	late := snapshot()
	if _, err := mem.WriteAt(late.mem, 0); err != nil { // the replica moves on
		t.Fatal(err)
	}
	r, err := sh.Restore(late.state, testvm.RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := describe(r); got != late.desc || late.desc == early.desc {
		t.Fatalf("the shell restored %q, the late checkpoint was %q (the early one %q)", got, late.desc, early.desc)
	}
	if _, err := sh.Restore(late.state, testvm.RestoreOptions{}); err == nil {
		t.Fatal("a shell restored twice")
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if err := r.Pause(); err != nil {
		t.Fatal(err)
	}
	for i, s := range late.status {
		st := r.Status(i)
		if want := testvm.CounterHash(s.Hash, s.Counter, st.Counter); st.Counter <= s.Counter || st.Hash != want {
			t.Fatalf("vCPU %d: counter %d hash %#x after restore; from the saved %d/%#x the hash should be %#x",
				i, st.Counter, st.Hash, s.Counter, s.Hash, want)
		}
	}
	// A shell of another shape refuses a state, and leaves its file.
	other := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Counter}, nil)
	if err := other.Pause(); err != nil {
		t.Fatal(err)
	}
	ostate, err := other.Save()
	if err != nil {
		t.Fatal(err)
	}
	mem2, err := testvm.NewMemFile(32 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem2.Close()
	sh2, err := testvm.Prepare(early.state, mem2, testvm.RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sh2.Restore(ostate, testvm.RestoreOptions{}); !errors.Is(err, testvm.ErrBadState) {
		t.Fatalf("a 2-vCPU shell restored a 1-vCPU state: %v", err)
	}
	if _, err := mem2.Stat(); err != nil {
		t.Fatalf("the refused shell closed the caller's file: %v", err)
	}
}
