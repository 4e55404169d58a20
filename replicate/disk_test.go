package replicate_test

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

// P4 through the engine: the toy VM writes a block per step through a
// diskmirror.Mirror, and the backup's image must be, byte for byte, what the
// count of the checkpoint it holds implies (checkToyDisk).

// Message types of the disk, as documented in doc.go.
const (
	tDiskSync = 11
	tDisk     = 12
)

// toyDiskSize is the toy's disk: 512 blocks of 4 KiB, synced in 16 KiB blocks.
const (
	toyDiskSize  = 512 * toyBlockSize
	toyDiskBlock = 16 << 10
)

// diskImage makes an image file of size bytes in the test's temp dir. With
// junk, every other sync block is random, so the initial sync must fix the
// backup's image; the rest is zeros, as on a fresh primary.
func diskImage(t *testing.T, name string, size int64, junk bool) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if junk {
		b := make([]byte, toyDiskBlock)
		for off := int64(0); off < size; off += 2 * toyDiskBlock {
			rand.Read(b)
			if _, err := f.WriteAt(b[:min(int64(len(b)), size-off)], off); err != nil {
				t.Fatal(err)
			}
		}
	}
	return f
}

func readAll(t *testing.T, f *os.File) []byte {
	t.Helper()
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// toyDisk returns a Mirror over a fresh primary image and a backup image
// with junk.
func toyDisk(t *testing.T) (*diskmirror.Mirror, *os.File) {
	t.Helper()
	m, err := diskmirror.NewMirror(diskImage(t, "primary.img", toyDiskSize, false), diskmirror.Config{SpillDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	return m, diskImage(t, "backup.img", toyDiskSize, true)
}

// withDisk replicates the toy with a disk through m.
func withDisk(t *testing.T, m mangler) (streamResult, *os.File) {
	t.Helper()
	return withDiskStaging(t, m, 0)
}

// withDiskStaging is withDisk with staging of the given size (0: default).
func withDiskStaging(t *testing.T, m mangler, staging uint64) (streamResult, *os.File) {
	t.Helper()
	mirror, bimg := toyDisk(t)
	return replicateThroughWith(t, m, through{disk: mirror, backupDisk: bimg, diskBlock: toyDiskBlock, staging: staging}), bimg
}

// checkDiskKept checks that the backup image is what the count of checkpoint
// epoch implies: nothing of a later epoch was applied.
func checkDiskKept(t *testing.T, r streamResult, img *os.File, epoch uint64) {
	t.Helper()
	count, ok := r.counts[epoch]
	if !ok {
		t.Fatalf("the primary recorded no count for epoch %d", epoch)
	}
	if err := checkToyDisk(count, img, toyDiskSize); err != nil {
		t.Fatalf("backup image after epoch %d: %v", epoch, err)
	}
}

// A primary lost in the middle of an epoch's disk stream: the backup resumes
// the epoch before, memory and disk (Resume checks both).
func TestDiskFailoverMidStream(t *testing.T) {
	r, img := withDisk(t, onEpoch(func(f frame) ([]frame, bool) {
		if f.typ() == tDisk {
			f.payload = f.payload[:len(f.payload)/2]
			return []frame{f}, true // the header says more: cut inside the message
		}
		return []frame{f}, false
	}))
	if r.backupErr != nil {
		t.Fatalf("backup: %v, want a failover", r.backupErr)
	}
	if r.failover.Epoch != badEpoch-1 || !r.failover.Stream || !r.failover.Verified {
		t.Fatalf("failover to epoch %d (disk %v, verified %v), want epoch %d with its disk", r.failover.Epoch,
			r.failover.Stream, r.failover.Verified, badEpoch-1)
	}
	checkDiskKept(t, r, img, badEpoch-1)
	var phases []string
	for _, d := range r.diskSync {
		phases = append(phases, d.Phase.String())
	}
	if len(r.diskSync) != 3 || r.diskSync[0].Phase != replicate.SyncPrecopy || r.diskSync[2].Phase != replicate.SyncResidual {
		t.Fatalf("disk sync phases %v, want precopy, catch-up, residual", phases)
	}
	pre := r.diskSync[0]
	blocks := toyDiskSize / toyDiskBlock
	// The junk halves differ; the guest may have written into the others.
	if pre.Units != blocks || pre.Sent < blocks/2 || pre.Unchanged+pre.Sent < blocks {
		t.Errorf("precopy %+v: want %d blocks, at least the %d junk ones sent", pre.StreamSync, blocks, blocks/2)
	}
}

// Every checkpoint a backup applies leaves its image as the primary's was at
// the pause: checked after a clean cut at each of several epochs.
func TestDiskEveryEpochConsistent(t *testing.T) {
	for _, cut := range []uint64{2, 3, 8} {
		r, img := withDisk(t, func(f frame) ([]frame, bool) {
			if f.epoch() == cut && f.typ() != 8 {
				return nil, true // the primary dies before epoch cut leaves
			}
			return []frame{f}, false
		})
		if r.backupErr != nil {
			t.Fatalf("cut at %d: backup: %v, want a failover", cut, r.backupErr)
		}
		if r.failover.Epoch != cut-1 {
			t.Fatalf("cut at %d: failover to epoch %d", cut, r.failover.Epoch)
		}
		checkDiskKept(t, r, img, cut-1)
	}
}

// Oversized epochs are sent during their pause (stop-and-copy), before the
// pause ends: their disk streams must still be whole and in their epochs.
func TestDiskOversizeEpochs(t *testing.T) {
	r, img := withDiskStaging(t, func(f frame) ([]frame, bool) {
		if f.epoch() == 8 && f.typ() != 8 {
			return nil, true
		}
		return []frame{f}, false
	}, 64*replicate.PageSize)
	if r.backupErr != nil {
		t.Fatalf("backup: %v, want a failover", r.backupErr)
	}
	if r.oversize == 0 {
		t.Fatal("no epoch was oversized: the test proved nothing")
	}
	if r.failover.Epoch != 7 {
		t.Fatalf("failover to epoch %d, want 7", r.failover.Epoch)
	}
	checkDiskKept(t, r, img, 7)
}

// recrc recomputes the engine's checksum of every checkpoint over the frames
// m sends, so that what reaches the backup passes the engine's check and
// only diskmirror's own checks (or the disk rules) can catch the fault.
func recrc(m mangler) mangler {
	crcs := map[uint64]uint32{}
	return func(f frame) ([]frame, bool) {
		out, cut := m(f)
		for i, o := range out {
			if o.epoch() == 0 { // pre-copy rounds and heartbeats
				continue
			}
			switch o.typ() {
			case tPages, tState, tDiskSync, tDisk:
				crcs[o.epoch()] = crc32.Update(crcs[o.epoch()], castagnoli, o.covered())
			case tEnd:
				o.payload = append([]byte(nil), o.payload...)
				binary.LittleEndian.PutUint32(o.payload[16:], crcs[o.epoch()])
				out[i] = o
			}
		}
		return out, cut
	}
}

// epochStream encodes a diskmirror epoch stream as the documented format
// says, with correct checksums around what the test chooses.
func epochStream(size int64, epoch uint64, writes ...diskmirror.Write) []byte {
	le := binary.LittleEndian
	b := append([]byte("DISKMIRR"), 0, 0, 0, 0, 0, 0, 0, 0)
	le.PutUint16(b[8:], 1)  // version
	le.PutUint16(b[10:], 1) // kind: epoch
	b = le.AppendUint64(b, uint64(size))
	b = le.AppendUint64(b, epoch)
	var total uint64
	for _, w := range writes {
		b = le.AppendUint16(b, 1) // write
		b = le.AppendUint16(b, 0)
		b = le.AppendUint32(b, uint32(len(w.Data)))
		b = le.AppendUint64(b, epoch)
		b = le.AppendUint64(b, uint64(w.Offset))
		b = le.AppendUint32(b, crc32.Checksum(w.Data, castagnoli))
		b = le.AppendUint32(b, 0)
		b = append(b, w.Data...)
		total += uint64(len(w.Data))
	}
	crc := crc32.Checksum(b, castagnoli)
	b = le.AppendUint16(b, 2) // end
	b = le.AppendUint16(b, 0)
	b = le.AppendUint32(b, uint32(len(writes)))
	b = le.AppendUint64(b, epoch)
	b = le.AppendUint64(b, total)
	b = le.AppendUint32(b, crc)
	return le.AppendUint32(b, 0)
}

// diskFrame is a message of type typ in badEpoch.
func diskFrame(typ uint16, payload []byte) frame {
	var f frame
	binary.LittleEndian.PutUint16(f.hdr[0:], typ)
	binary.LittleEndian.PutUint32(f.hdr[4:], uint32(len(payload)))
	binary.LittleEndian.PutUint64(f.hdr[8:], badEpoch)
	f.payload = payload
	return f
}

// replaceDisk sends instead of badEpoch's disk messages the frames of mk.
func replaceDisk(mk func() []frame) mangler {
	sent := false
	return onEpoch(func(f frame) ([]frame, bool) {
		if f.typ() != tDisk {
			return []frame{f}, false
		}
		if sent {
			return nil, false
		}
		sent = true
		return mk(), false
	})
}

// Bad disk data in an epoch that otherwise checks out: the backup rejects
// the session naming the problem, and its image keeps the epoch before.
func TestDiskStreamRejected(t *testing.T) {
	block := func(v byte) []byte { return bytes.Repeat([]byte{v}, toyBlockSize) }
	var stateHeld *frame
	var bad uint64           // the epoch a case made bad; 0 means badEpoch
	var seen map[uint64]bool // epochs whose first disk message went by
	tests := []struct {
		name    string
		m       mangler
		wantErr string
	}{
		{"corrupted write record", func(f frame) ([]frame, bool) {
			// The first epoch from badEpoch on whose stream starts with a
			// write (a slow toy may write nothing in an epoch).
			if f.typ() != tDisk || seen[f.epoch()] {
				return []frame{f}, false
			}
			seen[f.epoch()] = true
			if bad == 0 && f.epoch() >= badEpoch && binary.LittleEndian.Uint16(f.payload[diskmirror.StreamHeaderSize:]) == 1 {
				bad = f.epoch()
				f.payload = append([]byte(nil), f.payload...)
				f.payload[diskmirror.StreamHeaderSize+diskmirror.RecordHeaderSize] ^= 0x10 // its first data byte
			}
			return []frame{f}, false
		}, "data checksum"},
		{"write beyond the end", replaceDisk(func() []frame {
			return []frame{diskFrame(tDisk, epochStream(toyDiskSize, badEpoch,
				diskmirror.Write{Offset: toyDiskSize - toyBlockSize/2, Data: block(7)}))}
		}), "beyond the end"},
		{"another epoch's disk stream", replaceDisk(func() []frame {
			return []frame{diskFrame(tDisk, epochStream(toyDiskSize, badEpoch+1, diskmirror.Write{Offset: 0, Data: block(7)}))}
		}), "where epoch 5 is expected"},
		{"another image size", replaceDisk(func() []frame {
			return []frame{diskFrame(tDisk, epochStream(2*toyDiskSize, badEpoch, diskmirror.Write{Offset: 0, Data: block(7)}))}
		}), "image size mismatch: stream is for a 4194304-byte image"},
		{"no disk stream", replaceDisk(func() []frame { return nil }), "has no stream part"},
		{"disk stream cut short", replaceDisk(func() []frame {
			s := epochStream(toyDiskSize, badEpoch, diskmirror.Write{Offset: 0, Data: block(7)})
			return []frame{diskFrame(tDisk, s[:len(s)-32])}
		}), "truncated"},
		{"disk after the state", onEpoch(func(f frame) ([]frame, bool) {
			switch f.typ() {
			case tDisk:
				if stateHeld == nil {
					return nil, false
				}
			case tState:
				stateHeld = &f
				return nil, false
			case tEnd:
				return []frame{*stateHeld, diskFrame(tDisk, epochStream(toyDiskSize, badEpoch)), f}, false
			}
			return []frame{f}, false
		}), "after the state"},
		{"disk sync in a later epoch", onEpoch(func(f frame) ([]frame, bool) {
			if f.typ() == tState {
				return []frame{diskFrame(tDiskSync, []byte("sync")), f}, false
			}
			return []frame{f}, false
		}), "stream sync message in checkpoint epoch 5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stateHeld, bad, seen = nil, 0, map[uint64]bool{}
			r, img := withDisk(t, recrc(tt.m))
			if !errors.Is(r.backupErr, replicate.ErrProtocol) || !strings.Contains(r.backupErr.Error(), tt.wantErr) {
				t.Fatalf("backup: %v, want a protocol error naming %q", r.backupErr, tt.wantErr)
			}
			if !strings.Contains(r.primaryErr.Error(), tt.wantErr) {
				t.Errorf("primary: %v, want the backup's reason", r.primaryErr)
			}
			if bad == 0 {
				bad = badEpoch
			}
			checkKept(t, r, bad-1)
			checkDiskKept(t, r, img, bad-1)
		})
	}
}

// A session whose disks do not match is refused at hello, and the backup
// image is not touched.
func TestDiskRefusedAtHello(t *testing.T) {
	tests := []struct {
		name          string
		primary, back int64 // image sizes; 0: no disk
		wantErr       string
	}{
		{"backup image too large", toyDiskSize, toyDiskSize + toyBlockSize, "image size mismatch: the primary's image has 2097152 bytes, the backup image 2101248"},
		{"backup image too small", toyDiskSize, toyDiskSize / 2, "image size mismatch"},
		{"backup has no disk", toyDiskSize, 0, "this backup has no sink for it"},
		{"primary has no disk", 0, toyDiskSize, "the primary replicates none"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var o through
			if tt.primary != 0 {
				m, err := diskmirror.NewMirror(diskImage(t, "primary.img", tt.primary, false), diskmirror.Config{})
				if err != nil {
					t.Fatal(err)
				}
				o.disk, o.diskBlock = m, toyDiskBlock
			}
			var before []byte
			if tt.back != 0 {
				o.backupDisk = diskImage(t, "backup.img", tt.back, true)
				before = readAll(t, o.backupDisk)
			}
			r := replicateThroughWith(t, func(f frame) ([]frame, bool) { return []frame{f}, false }, o)
			if !errors.Is(r.backupErr, replicate.ErrProtocol) || !strings.Contains(r.backupErr.Error(), tt.wantErr) {
				t.Fatalf("backup: %v, want a protocol error naming %q", r.backupErr, tt.wantErr)
			}
			if r.primaryErr == nil || !strings.Contains(r.primaryErr.Error(), tt.wantErr) {
				t.Errorf("primary: %v, want the backup's reason", r.primaryErr)
			}
			if before != nil && !bytes.Equal(readAll(t, o.backupDisk), before) {
				t.Fatal("the refused session changed the backup image")
			}
		})
	}
}

// The real guest: the testvm disk workload on a mirrored block device, cut
// off; the backup's image must be what the resumed guest's own records say
// (testvm.VerifyDiskImage), and its verifying reads must pass afterwards.
func TestKVMDiskFailover(t *testing.T) {
	const blocks = 2048
	size := int64(blocks * testvm.DiskBlockSize)
	pimg := diskImage(t, "primary.img", size, false)
	bimg := diskImage(t, "backup.img", size, true)
	mirror, err := diskmirror.NewMirror(pimg, diskmirror.Config{SpillDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	cfg := testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Disk, Pattern: testvm.Random,
		Disk: &testvm.DiskConfig{Blocks: blocks, WorkingSet: blocks}, DiskIO: mirror}
	m := vmtest.Boot(t, cfg, nil)
	resumed := make(chan *testvm.Machine, 1)
	var report testvm.DiskReport
	var syncs []replicate.StreamSyncProgress
	src, err := diskmirror.NewSource(mirror, diskmirror.SourceConfig{Block: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	pair := replicatetest.NewPair(t, replicate.Config{VM: m, Interval: 10 * time.Millisecond, AuditEvery: 1,
		Stream: src, OnStreamSync: func(d replicate.StreamSyncProgress) { syncs = append(syncs, d) }}, replicate.BackupConfig{
		NewMemory:     testvm.NewMemFile,
		VerifyReplica: true,
		NewSink:       diskmirror.NewSink(bimg, diskmirror.ReplicaConfig{}),
		Resume: func(cp *replicate.Checkpoint) error {
			rep, err := testvm.VerifyDiskImage(cp.Memory, bimg)
			if err != nil {
				cp.Memory.Close()
				return err
			}
			report = rep
			rm, err := testvm.Restore(cp.State, cp.Memory, testvm.RestoreOptions{DiskIO: bimg})
			if err != nil {
				return err
			}
			resumed <- rm
			return nil
		},
	})
	p := pair.Primary
	pair.WaitAcked(30)
	pair.KillPrimary() // the primary's host dies
	fo, err := pair.BackupResult()
	if err != nil {
		t.Fatalf("backup: %v", err)
	}
	if !errors.Is(pair.PrimaryErr(), replicate.ErrBackupLost) {
		t.Error("primary did not report its backup lost")
	}
	rm := <-resumed
	defer rm.Close()
	t.Logf("failover to epoch %d (acked %d); disk %+v; sync %+v", fo.Epoch, p.LastAcked(), report, syncs)
	if fo.Epoch < 30 || !fo.Stream || report.Written == 0 || report.Writes == 0 {
		t.Fatalf("failover to epoch %d (disk %v) with %d blocks written: the test proved nothing", fo.Epoch, fo.Stream, report.Written)
	}
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	before := rm.Status(0)
	if err := rm.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(vmtest.Wait)
	for rm.Status(0).DiskReads < before.DiskReads+100 {
		if time.Now().After(deadline) {
			t.Fatalf("the resumed guest verified %d blocks in %v", rm.Status(0).DiskReads-before.DiskReads, vmtest.Wait)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := rm.Pause(); err != nil {
		t.Fatal(err)
	}
	if st := rm.Status(0); st.DiskErrors != 0 || st.DiskWrites <= before.DiskWrites {
		t.Fatalf("the resumed guest's verifying reads failed (%d errors) or it wrote nothing: %+v", st.DiskErrors, st)
	}
	if _, err := rm.VerifyDisk(); err != nil {
		t.Fatalf("after running on: %v", err)
	}
}
