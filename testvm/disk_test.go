package testvm_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/testvm"
)

// diskImage returns a new sparse image file of blocks blocks, closed with the
// test.
func diskImage(t *testing.T, blocks uint64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(blocks * testvm.DiskBlockSize)); err != nil {
		t.Fatal(err)
	}
	return f
}

func diskConfig(t *testing.T, blocks uint64, p testvm.Pattern) testvm.Config {
	return testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Disk, Pattern: p, Seed: 7,
		Disk: &testvm.DiskConfig{Blocks: blocks, FlushEvery: 500}, DiskIO: diskImage(t, blocks)}
}

// waitDisk waits until vCPU 0's disk workload has done at least writes block
// writes and reads verified reads.
func waitDisk(t *testing.T, m *testvm.Machine, writes, reads uint64) {
	t.Helper()
	deadline := time.Now().Add(vmtest.Wait)
	for {
		st := m.Status(0)
		if st.DiskWrites >= writes && st.DiskReads >= reads {
			return
		}
		if err := m.Err(); err != nil {
			t.Fatalf("machine stopped: %v (guest %+v)", err, st)
		}
		if time.Now().After(deadline) {
			t.Fatalf("disk workload at %d writes, %d reads after %v; want %d, %d", st.DiskWrites, st.DiskReads, vmtest.Wait, writes, reads)
		}
		time.Sleep(time.Millisecond)
	}
}

// verifyPaused checks the paused machine's disk, by the machine and from bare
// images, and returns the report.
func verifyPaused(t *testing.T, m *testvm.Machine, img io.ReaderAt) testvm.DiskReport {
	t.Helper()
	rep, err := m.VerifyDisk()
	if err != nil {
		t.Fatalf("%v (guest %+v, device %+v)", err, m.Status(0), m.DiskStats())
	}
	rep2, err := testvm.VerifyDiskImage(bytes.NewReader(m.Memory()), img)
	if err != nil || rep2 != rep {
		t.Fatalf("VerifyDiskImage = %+v, %v; VerifyDisk said %+v", rep2, err, rep)
	}
	return rep
}

// TestDiskWorkload: with each pattern, the guest sweeps its working set, then
// writes where its pattern says, reads earlier blocks back and flushes; at
// every pause the image holds exactly what the guest's record says. With
// polling off, every request waits for a doorbell.
func TestDiskWorkload(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pattern testvm.Pattern
		poll    time.Duration
	}{
		{"seq", testvm.Seq, 0},
		{"random", testvm.Random, 0},
		{"hotcold/doorbells", testvm.HotCold, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const blocks = 1024
			cfg := diskConfig(t, blocks, tc.pattern)
			cfg.DiskPoll = tc.poll
			m := vmtest.Boot(t, cfg, nil)
			inFlight := 0
			for i := 0; i < 10; i++ {
				waitDisk(t, m, uint64(i+1)*blocks/4, 0)
				if err := m.Pause(); err != nil {
					t.Fatal(err)
				}
				if rep := verifyPaused(t, m, cfg.DiskIO); rep.Completed+rep.Pending > 0 {
					inFlight++
				}
				if err := m.Resume(); err != nil {
					t.Fatal(err)
				}
			}
			waitDisk(t, m, 4*blocks, 200)
			if err := m.Pause(); err != nil {
				t.Fatal(err)
			}
			rep := verifyPaused(t, m, cfg.DiskIO)
			st, ds := m.Status(0), m.DiskStats()
			if rep.Written != blocks {
				t.Errorf("%d of %d blocks written after %d writes: the first sweep covers them all", rep.Written, blocks, st.DiskWrites)
			}
			if st.DiskFlushes == 0 || ds.Flushes < st.DiskFlushes || ds.Flushes > st.DiskFlushes+1 || ds.FUAWrites == 0 {
				t.Errorf("flushes: guest %d, device %d; FUA writes %d", st.DiskFlushes, ds.Flushes, ds.FUAWrites)
			}
			// The pause may fall between the device completing a batch and the
			// guest recording it.
			if ds.BlocksWritten < st.DiskWrites || ds.BlocksWritten > st.DiskWrites+32 ||
				ds.BlocksRead < st.DiskReads || ds.BlocksRead > st.DiskReads+4 {
				t.Errorf("device wrote %d blocks and read %d, guest recorded %d and verified %d", ds.BlocksWritten, ds.BlocksRead, st.DiskWrites, st.DiskReads)
			}
			if ds.BadRequests != 0 || ds.IOErrors != 0 || st.DiskErrors != 0 {
				t.Errorf("errors: device %+v, guest %d", ds, st.DiskErrors)
			}
			if tc.poll < 0 && ds.Kicks < ds.Batches/2 {
				t.Errorf("without polling, %d doorbells for %d batches", ds.Kicks, ds.Batches)
			}
			if st1 := m.Status(1); st1.DiskWrites != 0 || st1.Iterations == 0 {
				t.Errorf("vCPU 1 should idle: %+v", st1)
			}
			t.Logf("report %+v; %d of 11 pauses caught a batch in flight; device %+v", rep, inFlight, ds)
		})
	}
}

// checkpoint pauses m (if it runs) and saves it, and returns the state and
// a new memory file of m's size: a copy of m's memory with withMemory, else
// all zeros (memory of another checkpoint, from before the guest ran).
func checkpoint(t *testing.T, m *testvm.Machine, withMemory bool) ([]byte, *os.File) {
	t.Helper()
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	state, err := m.Save()
	if err != nil {
		t.Fatal(err)
	}
	mem, err := testvm.NewMemFile(uint64(len(m.Memory())))
	if err != nil {
		t.Fatal(err)
	}
	if withMemory {
		if _, err := mem.WriteAt(m.Memory(), 0); err != nil {
			mem.Close()
			t.Fatal(err)
		}
	}
	return state, mem
}

// copyImage copies an image file, as a backup's replica of it.
func copyImage(t *testing.T, src *os.File) *os.File {
	t.Helper()
	dst, err := os.Create(filepath.Join(t.TempDir(), "replica.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	if _, err := io.Copy(dst, io.NewSectionReader(src, 0, 1<<62)); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestDiskSaveRestore: machines saved mid-run and restored, on the same image
// or on a copy taken at the checkpoint while the original goes on, verify
// before they run and continue from the checkpoint: no write of the device
// was lost or repeated across it.
func TestDiskSaveRestore(t *testing.T) {
	const blocks = 1024
	cfg := diskConfig(t, blocks, testvm.Random)
	m := vmtest.Boot(t, cfg, nil)
	img := cfg.DiskIO.(*os.File)
	for round := 1; round <= 4; round++ {
		waitDisk(t, m, uint64(round)*blocks, 0)
		if err := m.Pause(); err != nil {
			t.Fatal(err)
		}
		saved := verifyPaused(t, m, img)
		state, mem := checkpoint(t, m, true)
		var r *testvm.Machine
		var rimg *os.File
		if round < 4 {
			// A fork: the copy restores on a replica of the image, the
			// original goes on.
			rimg = copyImage(t, img)
			if err := m.Resume(); err != nil {
				t.Fatal(err)
			}
		} else {
			// The original stops; the restored machine takes its image.
			m.Close()
			rimg = img
		}
		r, err := testvm.Restore(state, mem, testvm.RestoreOptions{DiskIO: rimg})
		if err != nil {
			mem.Close()
			t.Fatal(err)
		}
		if rep, err := r.VerifyDisk(); err != nil || rep != saved {
			t.Fatalf("restored machine before it runs: %+v, %v; saved %+v", rep, err, saved)
		}
		if err := r.Start(); err != nil {
			t.Fatal(err)
		}
		waitDisk(t, r, saved.Writes+blocks, r.Status(0).DiskReads+50)
		if err := r.Pause(); err != nil {
			t.Fatal(err)
		}
		rep := verifyPaused(t, r, rimg)
		if rep.Writes <= saved.Writes {
			t.Errorf("round %d: restored guest at %d writes, saved at %d", round, rep.Writes, saved.Writes)
		}
		t.Logf("round %d: saved %+v, restored went on to %+v", round, saved, rep)
		r.Close()
	}
}

// TestDiskStateMismatch: a state whose ring position disagrees with the
// memory image is refused, naming the block device.
func TestDiskStateMismatch(t *testing.T) {
	cfg := diskConfig(t, 256, testvm.Random)
	m := vmtest.Boot(t, cfg, nil)
	waitDisk(t, m, 100, 0)
	state, mem := checkpoint(t, m, false) // req_cons 0
	defer mem.Close()
	_, err := testvm.Restore(state, mem, testvm.RestoreOptions{DiskIO: cfg.DiskIO})
	if !errors.Is(err, testvm.ErrBadState) || !strings.Contains(err.Error(), "block device ring") {
		t.Fatalf("restore with another checkpoint's memory: %v, want ErrBadState naming the block device ring", err)
	}
	_, err = testvm.Restore(state, mem, testvm.RestoreOptions{})
	if err == nil || !strings.Contains(err.Error(), "without a backend") {
		t.Fatalf("restore without a disk backend: %v", err)
	}
}

// failingDisk fails every write after the first n.
type failingDisk struct {
	*os.File
	n int
}

func (d *failingDisk) WriteAt(p []byte, off int64) (int, error) {
	if d.n == 0 {
		return 0, errors.New("injected write error")
	}
	d.n--
	return d.File.WriteAt(p, off)
}

// TestDiskBackendError: a backend that fails completes the guest's request
// with an error status; the guest reports it and the VMM stays sound.
func TestDiskBackendError(t *testing.T) {
	cfg := diskConfig(t, 256, testvm.Random)
	cfg.VCPUs = 1 // so the guest is ready (vmtest.Boot) before it fails
	cfg.DiskIO = &failingDisk{File: cfg.DiskIO.(*os.File), n: 10}
	m := vmtest.Boot(t, cfg, nil)
	select {
	case <-m.Done():
	case <-time.After(vmtest.Wait):
		t.Fatal("the guest did not stop on a failed write")
	}
	var ge *testvm.GuestError
	if err := m.Err(); !errors.As(err, &ge) || !strings.Contains(err.Error(), "disk request failed") {
		t.Fatalf("machine error %v, want the guest's disk error", err)
	}
	st, ds := m.Status(0), m.DiskStats()
	if st.State != testvm.GuestFailed || st.DiskErrors != 1 || st.DiskBadStatus != 5 || st.DiskBadBlock == 0 || ds.IOErrors == 0 {
		t.Errorf("guest %+v, device %+v", st, ds)
	}
	if _, err := m.VerifyDisk(); err == nil || !strings.Contains(err.Error(), "the guest failed") {
		t.Errorf("VerifyDisk of a failed guest: %v", err)
	}
}

func TestDiskConfigErrors(t *testing.T) {
	img := os.Stdin // any DiskBackend; Validate does not use it
	for _, tc := range []struct {
		name string
		cfg  testvm.Config
		want string
	}{
		{"disk workload without disk", testvm.Config{VCPUs: 1, Workload: testvm.Disk}, "needs a block device"},
		{"backend without disk", testvm.Config{VCPUs: 1, DiskIO: img}, "backend without a block device"},
		{"no blocks", testvm.Config{VCPUs: 1, Disk: &testvm.DiskConfig{}, DiskIO: img}, "disk of 0 blocks"},
		{"huge disk", testvm.Config{VCPUs: 1, Disk: &testvm.DiskConfig{Blocks: testvm.MaxDiskBlocks + 1}, DiskIO: img}, "want 1 to"},
		{"working set", testvm.Config{VCPUs: 1, Disk: &testvm.DiskConfig{Blocks: 10, WorkingSet: 11}, DiskIO: img}, "exceeds the disk's 10 blocks"},
		{"table too big", testvm.Config{MemSize: 8 << 20, VCPUs: 4, Workload: testvm.Disk,
			Disk: &testvm.DiskConfig{Blocks: 1 << 20}, DiskIO: img}, "version table"},
	} {
		err := tc.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	ok := testvm.Config{VCPUs: 1, Workload: testvm.Disk, Disk: &testvm.DiskConfig{Blocks: 1 << 20}, DiskIO: img}
	if err := ok.Validate(); err != nil {
		t.Errorf("valid config: %v", err)
	}
	if w, err := testvm.ParseWorkload("disk"); err != nil || w != testvm.Disk {
		t.Errorf("ParseWorkload(disk) = %v, %v", w, err)
	}
	// Without a backend, New refuses a disk (Validate cannot: a saved config
	// has none).
	vmtest.Build(t, testvm.Config{VCPUs: 1}) // the KVM gate
	if m, err := testvm.New(testvm.Config{VCPUs: 1, Disk: &testvm.DiskConfig{Blocks: 8}}); err == nil {
		m.Close()
		t.Error("New accepted a disk without a backend")
	} else if !strings.Contains(err.Error(), "without a backend") {
		t.Errorf("New without a backend: %v", err)
	}
}
