package testvm

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/privileged"
)

func TestDiskRequestCheck(t *testing.T) {
	const blocks = 200
	buf := uint64(diskBufAddr)
	end := uint64(diskBufAddr + diskBufSize)
	for _, tc := range []struct {
		name string
		r    diskRequest
		want uint32
	}{
		{"read", diskRequest{op: diskOpRead, block: 3, count: 2, buf: buf}, diskSOK},
		{"write FUA", diskRequest{op: diskOpWrite, flags: diskFFUA, block: blocks - 1, count: 1, buf: end - DiskBlockSize}, diskSOK},
		{"write whole area", diskRequest{op: diskOpWrite, block: 0, count: diskMaxCount, buf: buf}, diskSOK},
		{"unaligned buffer", diskRequest{op: diskOpRead, block: 0, count: 1, buf: buf + 8}, diskSOK},
		{"flush", diskRequest{op: diskOpFlush, block: 1 << 60, count: 0, buf: 0}, diskSOK},
		{"op 0", diskRequest{op: 0, block: 0, count: 1, buf: buf}, diskSBadOp},
		{"op 4", diskRequest{op: 4, block: 0, count: 1, buf: buf}, diskSBadOp},
		{"read FUA", diskRequest{op: diskOpRead, flags: diskFFUA, block: 0, count: 1, buf: buf}, diskSBadOp},
		{"write flag 2", diskRequest{op: diskOpWrite, flags: 2, block: 0, count: 1, buf: buf}, diskSBadOp},
		{"flush FUA", diskRequest{op: diskOpFlush, flags: diskFFUA}, diskSBadOp},
		{"count 0", diskRequest{op: diskOpRead, block: 0, count: 0, buf: buf}, diskSBadRange},
		{"count past area", diskRequest{op: diskOpRead, block: 0, count: diskMaxCount + 1, buf: buf}, diskSBadRange},
		{"block past end", diskRequest{op: diskOpWrite, block: blocks, count: 1, buf: buf}, diskSBadRange},
		{"run past end", diskRequest{op: diskOpWrite, block: blocks - 1, count: 2, buf: buf}, diskSBadRange},
		{"block overflow", diskRequest{op: diskOpWrite, block: 1<<64 - 1, count: 2, buf: buf}, diskSBadRange},
		{"buffer below", diskRequest{op: diskOpRead, block: 0, count: 1, buf: buf - 8}, diskSBadBuf},
		{"buffer straddles end", diskRequest{op: diskOpRead, block: 0, count: 2, buf: end - DiskBlockSize}, diskSBadBuf},
		{"buffer at end", diskRequest{op: diskOpRead, block: 0, count: 1, buf: end}, diskSBadBuf},
		{"buffer wraps", diskRequest{op: diskOpRead, block: 0, count: 1, buf: 1<<64 - 8}, diskSBadBuf},
		{"buffer in code", diskRequest{op: diskOpWrite, block: 0, count: 1, buf: codeAddr}, diskSBadBuf},
	} {
		if got := tc.r.check(blocks); got != tc.want {
			t.Errorf("%s: %+v: status %d, want %d", tc.name, tc.r, got, tc.want)
		}
	}
}

// bootDisk builds, starts and readies a machine with a disk on a new image
// of blocks blocks.
func bootDisk(t *testing.T, cfg Config, blocks uint64, before func(*Machine)) (*Machine, *os.File) {
	t.Helper()
	privileged.Require(t, privileged.KVM)
	img, err := os.Create(filepath.Join(t.TempDir(), "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	if err := img.Truncate(int64(blocks * DiskBlockSize)); err != nil {
		t.Fatal(err)
	}
	cfg.Disk = &DiskConfig{Blocks: blocks}
	cfg.DiskIO = img
	return boot(t, cfg, before), img
}

// boot builds, starts and readies a machine, calling before (if not nil)
// between build and start (no vmtest here: it imports this package).
func boot(t *testing.T, cfg Config, before func(*Machine)) *Machine {
	t.Helper()
	privileged.Require(t, privileged.KVM)
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if before != nil {
		before(m)
	}
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestDiskRingRequests: requests put on the ring by hand (the guest idles
// and never touches it) are executed in order; bad ones complete with their
// error status and touch nothing.
func TestDiskRingRequests(t *testing.T) {
	const blocks = 64
	type req struct {
		r    diskRequest
		want uint32
	}
	b0, b1, b2 := uint64(diskBufAddr), uint64(diskBufAddr+DiskBlockSize), uint64(diskBufAddr+4*DiskBlockSize)
	reqs := []req{
		{diskRequest{op: diskOpWrite, block: 5, count: 2, buf: b0}, diskSOK},
		{diskRequest{op: 9, block: 5, count: 1, buf: b2}, diskSBadOp},
		{diskRequest{op: diskOpWrite, block: blocks, count: 1, buf: b0}, diskSBadRange},
		{diskRequest{op: diskOpRead, block: 60, count: 5, buf: b2}, diskSBadRange},
		{diskRequest{op: diskOpRead, block: 0, count: 1, buf: DataAddr}, diskSBadBuf},
		{diskRequest{op: diskOpWrite, block: 0, count: 0, buf: b0}, diskSBadRange},
		{diskRequest{op: diskOpRead, block: 5, count: 2, buf: b2}, diskSOK},
		{diskRequest{op: diskOpWrite, flags: diskFFUA, block: 63, count: 1, buf: b1}, diskSOK},
		{diskRequest{op: diskOpFlush}, diskSOK},
		{diskRequest{op: diskOpFlush, flags: 7}, diskSBadOp},
	}
	var payload [2 * DiskBlockSize]byte
	for i := range payload {
		payload[i] = byte(i*7 + i>>12)
	}
	m, img := bootDisk(t, Config{MemSize: 16 << 20, VCPUs: 1, Workload: Idle}, blocks, func(m *Machine) {
		if err := m.WriteGuest(b0, payload[:]); err != nil {
			t.Fatal(err)
		}
		for i, r := range reqs {
			d := diskRingAddr + uint64(i)*diskDescSize
			store32(m.mem, d+dOp, r.r.op)
			store32(m.mem, d+dFlags, r.r.flags)
			store64(m.mem, d+dBlock, r.r.block)
			store32(m.mem, d+dCount, r.r.count)
			store64(m.mem, d+dBuf, r.r.buf)
		}
		store32(m.mem, diskAddr+dkReqProd, uint32(len(reqs)))
	})
	deadline := time.Now().Add(time.Minute)
	for load32(m.mem, diskAddr+dkReqCons) != uint32(len(reqs)) {
		if time.Now().After(deadline) {
			t.Fatalf("device stopped at req_cons %d of %d", load32(m.mem, diskAddr+dkReqCons), len(reqs))
		}
		time.Sleep(time.Millisecond)
	}
	for i, r := range reqs {
		if st := load32(m.mem, diskRingAddr+uint64(i)*diskDescSize+dStatus); st != r.want {
			t.Errorf("request %d %+v: status %d, want %d", i, r.r, st, r.want)
		}
	}
	if got := m.mem[b2 : b2+2*DiskBlockSize]; !bytes.Equal(got, payload[:]) {
		t.Error("reading blocks 5-6 back did not give what was written")
	}
	disk := make([]byte, blocks*DiskBlockSize)
	if _, err := img.ReadAt(disk, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, blocks*DiskBlockSize)
	copy(want[5*DiskBlockSize:], payload[:])
	copy(want[63*DiskBlockSize:], payload[DiskBlockSize:])
	if !bytes.Equal(disk, want) {
		t.Error("the image holds more or less than the two good writes")
	}
	ds := m.DiskStats()
	if ds.Writes != 2 || ds.Reads != 1 || ds.Flushes != 1 || ds.FUAWrites != 1 || ds.BadRequests != 6 || ds.IOErrors != 0 {
		t.Errorf("device stats %+v", ds)
	}
	if err := m.Err(); err != nil {
		t.Fatalf("the machine stopped: %v", err)
	}
}

// TestDiskReadDMADirty: the pages the device reads blocks into are in the
// dirty tracker's harvest. The guest never stores into its read buffers, so
// only the VMM's report of its DMA can put them there.
func TestDiskReadDMADirty(t *testing.T) {
	var tr *dirtylog.Tracker
	m, _ := bootDisk(t, Config{MemSize: 16 << 20, VCPUs: 1, Workload: Disk}, 512, func(m *Machine) {
		var err error
		if tr, err = m.DirtyTracker(dirtylog.Bitmap, false); err != nil {
			t.Fatal(err)
		}
		if err := tr.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tr.Stop() })
	})
	waitReads := func(n uint64) {
		deadline := time.Now().Add(time.Minute)
		for m.DiskStats().Reads < n {
			if m.Err() != nil || time.Now().After(deadline) {
				t.Fatalf("device at %+v, machine %v", m.DiskStats(), m.Err())
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitReads(10)
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	set := tr.NewSet()
	if _, err := tr.Harvest(set); err != nil {
		t.Fatal(err)
	}
	ds := m.DiskStats()
	if err := m.Resume(); err != nil {
		t.Fatal(err)
	}
	// Enough requests that every descriptor on the ring is from after the
	// harvest.
	for m.DiskStats().Reads+m.DiskStats().Writes+m.DiskStats().Flushes < ds.Reads+ds.Writes+ds.Flushes+2*diskSlots {
		waitReads(m.DiskStats().Reads + 1)
	}
	if err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	set.Clear()
	hs, err := tr.Harvest(set)
	if err != nil {
		t.Fatal(err)
	}
	if hs.VMMPages == 0 {
		t.Error("the harvest has no pages the VMM wrote")
	}
	reads := 0
	for i := uint64(0); i < diskSlots; i++ {
		d := diskRingAddr + i*diskDescSize
		r := loadDiskRequest(m.mem, d)
		if r.op != diskOpRead || load32(m.mem, d+dStatus) != diskSOK {
			continue
		}
		reads++
		if r.buf < diskBufAddr+diskBufSize/2 {
			t.Fatalf("the guest reads into %#x, in the lower half of the buffer area, which it writes itself", r.buf)
		}
		for p := r.buf &^ (pageSize - 1); p < r.buf+uint64(r.count)*DiskBlockSize; p += pageSize {
			if !set.Has(m.GPA(p)) {
				t.Errorf("read of block %d into %#x: page %#x is not in the harvest", r.block, r.buf, p)
			}
		}
	}
	if reads == 0 {
		t.Fatal("no completed read on the ring")
	}
	t.Logf("%d reads on the ring, all in a harvest of %d pages (%d from the VMM)", reads, set.Count(), hs.VMMPages)
}

// pauseHoldingDisk pauses m as Pause does, except that the caller already
// holds the block device's lock (so the device could not take the batch the
// guest published); Resume releases it.
func pauseHoldingDisk(t *testing.T, m *Machine) {
	t.Helper()
	m.ctl.Lock()
	defer m.ctl.Unlock()
	for _, v := range m.vcpus {
		v.requestPause()
	}
	for _, v := range m.vcpus {
		if !v.waitParked(false) {
			t.Fatalf("vCPU %d exited: %v", v.id, m.Err())
		}
	}
	if !m.state.CompareAndSwap(int32(Running), int32(Paused)) {
		t.Fatalf("machine is %s", m.State())
	}
	m.devHeld = true
}

// TestDiskCheckpointPendingRequests: a checkpoint taken while the guest's
// published batch waits on the ring (the device did not take it yet) holds
// none of its writes; the restored device executes them, exactly once, and
// both the original and the restored machine go on and verify.
func TestDiskCheckpointPendingRequests(t *testing.T) {
	const blocks = 256
	m, img := bootDisk(t, Config{MemSize: 16 << 20, VCPUs: 1, Workload: Disk, Pattern: Random}, blocks, nil)
	deadline := time.Now().Add(time.Minute)
	for m.Status(0).DiskWrites < 2*blocks {
		if m.Err() != nil || time.Now().After(deadline) {
			t.Fatalf("guest at %+v, machine %v", m.Status(0), m.Err())
		}
		time.Sleep(time.Millisecond)
	}
	// Hold the device until the guest has published a write batch (not one
	// of its verify reads or flushes) that the device could not take.
	for {
		m.disk.mu.Lock()
		for load32(m.mem, diskAddr+dkReqProd) == m.disk.cons {
			if m.Err() != nil || time.Now().After(deadline) {
				m.disk.mu.Unlock()
				t.Fatalf("the guest published nothing: %+v, machine %v", m.Status(0), m.Err())
			}
			time.Sleep(50 * time.Microsecond)
		}
		if m.Status(0).DiskInFlight != 0 {
			break
		}
		m.disk.mu.Unlock()
		time.Sleep(50 * time.Microsecond)
	}
	pauseHoldingDisk(t, m)
	saved, err := m.VerifyDisk()
	if err != nil {
		t.Fatal(err)
	}
	if saved.Pending == 0 || saved.Completed != 0 {
		t.Fatalf("want a checkpoint with the whole batch pending, got %+v", saved)
	}
	state, err := m.Save()
	if err != nil {
		t.Fatal(err)
	}
	mem, err := NewMemFile(uint64(len(m.mem)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mem.WriteAt(m.mem, 0); err != nil {
		t.Fatal(err)
	}
	replica, err := os.Create(filepath.Join(t.TempDir(), "replica.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer replica.Close()
	image := make([]byte, blocks*DiskBlockSize)
	if _, err := img.ReadAt(image, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := replica.WriteAt(image, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(); err != nil {
		t.Fatal(err)
	}
	r, err := Restore(state, mem, RestoreOptions{DiskIO: replica})
	if err != nil {
		mem.Close()
		t.Fatal(err)
	}
	defer r.Close()
	if rep, err := r.VerifyDisk(); err != nil || rep != saved {
		t.Fatalf("restored machine before it runs: %+v, %v; saved %+v", rep, err, saved)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	for _, x := range []*Machine{m, r} {
		for x.Status(0).DiskWrites < saved.Writes+blocks {
			if x.Err() != nil || time.Now().After(deadline) {
				t.Fatalf("guest at %+v, machine %v", x.Status(0), x.Err())
			}
			time.Sleep(time.Millisecond)
		}
		if err := x.Pause(); err != nil {
			t.Fatal(err)
		}
		if _, err := x.VerifyDisk(); err != nil {
			t.Fatal(err)
		}
	}
	// The restored device executed the pending batch: its first request was
	// the first the restored device took.
	if rs := r.DiskStats(); rs.Batches == 0 || rs.BlocksWritten < saved.Pending {
		t.Errorf("restored device %+v, pending at the checkpoint %d blocks", rs, saved.Pending)
	}
}
