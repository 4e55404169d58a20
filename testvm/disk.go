package testvm

import (
	"fmt"
	"io"
	"sync/atomic"
	"time"
)

// DiskBackend is the store behind the block device: a raw disk image, block b
// at byte offset b*DiskBlockSize. An *os.File satisfies it, and so does a
// writer that mirrors every write elsewhere (a backup).
//
//   - ReadAt may return io.EOF with a short count past the end of the store:
//     the rest reads as zeros, so a sparse or short image file works.
//   - WriteAt must write all of p or return an error. A write the guest
//     marked FUA (force unit access) is WriteAt followed by Sync, and
//     completes only after both.
//   - Sync makes every write completed before it durable: a guest flush.
//
// The device calls it from its own goroutine, one call at a time, and never
// between Machine.Pause and Resume (see diskDev), so a wrapper that tags
// writes with the checkpoint epoch they belong to can advance its epoch
// during the pause and needs no other coordination with the VMM. A failed
// call completes the guest's request with an error status; it never stops
// the machine.
type DiskBackend interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
}

// DiskConfig is the guest's view of its block device and the Disk workload's
// settings. It is part of the guest configuration (saved with the state); the
// backend is not (Config.DiskIO, RestoreOptions.DiskIO).
type DiskConfig struct {
	// Blocks is the disk's size in DiskBlockSize blocks, 1 to MaxDiskBlocks.
	// The backend need not be that large: what lies past its end reads as
	// zeros.
	Blocks uint64
	// WorkingSet is the number of blocks, from block 0, the Disk workload
	// writes. 0 means Blocks. The guest keeps a version table of 8 bytes per
	// block at the start of vCPU 0's region, which must hold it.
	WorkingSet uint64
	// FlushEvery makes the Disk workload send a flush request after every
	// FlushEvery block writes. 0 means DefaultDiskFlushEvery.
	FlushEvery uint64
}

// Block device defaults and limits.
const (
	// MaxDiskBlocks is the largest disk: 16 TiB.
	MaxDiskBlocks         = 1 << 32
	DefaultDiskFlushEvery = 256
	// DefaultDiskPoll is how long the block device polls its ring after the
	// last request before it sleeps (Config.DiskPoll).
	DefaultDiskPoll = 100 * time.Microsecond
)

func (d DiskConfig) withDefaults() DiskConfig {
	if d.WorkingSet == 0 {
		d.WorkingSet = d.Blocks
	}
	if d.FlushEvery == 0 {
		d.FlushEvery = DefaultDiskFlushEvery
	}
	return d
}

func (d DiskConfig) validate() error {
	d = d.withDefaults()
	switch {
	case d.Blocks == 0 || d.Blocks > MaxDiskBlocks:
		return fmt.Errorf("disk of %d blocks: want 1 to %d", d.Blocks, uint64(MaxDiskBlocks))
	case d.WorkingSet > d.Blocks:
		return fmt.Errorf("disk working set of %d blocks exceeds the disk's %d blocks", d.WorkingSet, d.Blocks)
	}
	return nil
}

// checkTable reports whether the Disk workload's version table fits in a
// vCPU region of regionPages pages.
func (d DiskConfig) checkTable(regionPages uint64) error {
	d = d.withDefaults()
	if d.WorkingSet > regionPages*(pageSize/8) {
		return fmt.Errorf("disk working set of %d blocks needs a %s version table, vCPU 0's region holds %s (give more memory or fewer vCPUs, or a smaller DiskConfig.WorkingSet)",
			d.WorkingSet, FormatSize(d.WorkingSet*8), FormatSize(regionPages*pageSize))
	}
	return nil
}

// DiskStats counts what the VMM's block device did.
type DiskStats struct {
	Reads, Writes, Flushes    uint64 // requests completed successfully
	BlocksRead, BlocksWritten uint64
	FUAWrites                 uint64 // writes with FUA (each followed by a Sync)
	BadRequests               uint64 // requests refused: bad op, range or buffer (DISK_S_BAD_*)
	IOErrors                  uint64 // requests the backend failed (DISK_S_IO_ERROR)
	Batches                   uint64 // times the device found requests on the ring
	Kicks                     uint64 // doorbells (PORT_DISK_KICK) the device woke for
	Overruns                  uint64 // times the guest published more requests than the ring holds
}

// diskDev is the VMM side of the paravirtual block device: one goroutine that
// executes the requests the guest puts on its ring, woken by an ioeventfd
// doorbell only when it went idle (the guest polls for completions).
//
// Locking: every batch (all requests from req_cons to the req_prod it read,
// and the req_cons update after them) runs under mu, every call into the
// backend is in a batch, and Machine.Pause takes mu after the vCPUs are
// parked and holds it until Resume. So at any checkpoint, a request is either
// complete (its data on the backend or in guest memory, its status written,
// req_cons past it) or not started: a write is on the image if and only if
// the saved req_cons says it completed, and the restored device executes
// exactly the requests after it. Nothing reaches the backend while the
// machine is paused.
type diskDev struct {
	device // the request ring (cons is req_cons) and PORT_DISK_KICK
	io     DiskBackend
	blocks uint64
	poll   time.Duration // how long to poll the ring before sleeping (Config.DiskPoll)

	stats struct {
		reads, writes, flushes, blocksRead, blocksWritten atomic.Uint64
		fua, bad, ioErrors, batches, overruns             atomic.Uint64
	}
}

// newDiskDev registers the doorbell with KVM. It does not start the
// goroutine (start does).
func newDiskDev(m *Machine, backend DiskBackend, blocks uint64, poll time.Duration) (*diskDev, error) {
	d := &diskDev{io: backend, blocks: blocks, poll: poll}
	ring := ringRegs{prod: diskAddr + dkReqProd, cons: diskAddr + dkReqCons, kick: diskAddr + dkKick, slots: diskSlots}
	if err := d.init(m, portDiskKick, "block device", ring); err != nil {
		return nil, err
	}
	return d, nil
}

// start runs the device's loop: it executes every request on the ring,
// polls the ring for a while (Config.DiskPoll), then announces that it
// sleeps (req_kick = 1) and waits for the doorbell, so a busy device takes
// requests without exits.
func (d *diskDev) start() {
	d.goRun(func() {
		d.serve(d.poll, d.executeBatch, func() { d.stats.overruns.Add(1) })
	})
}

// stop ends the goroutine, if it was started, and closes the doorbell. The
// backend stays open: it belongs to the caller.
func (d *diskDev) stop(started bool) { d.device.stop(started, nil) }

// executeBatch executes the requests of ring entries from to to, in order.
// With mu held.
func (d *diskDev) executeBatch(from, to uint32) {
	mem := d.m.mem
	d.stats.batches.Add(1)
	d.m.guardWrite(diskRingAddr, diskSlots*diskDescSize) // the statuses
	for c := from; c != to; c++ {
		desc := diskRingAddr + uint64(c%diskSlots)*diskDescSize
		store32(mem, desc+dStatus, d.execute(mem, desc))
	}
	d.m.recordWrite(diskRingAddr, diskSlots*diskDescSize) // the statuses
}

// diskRequest is one descriptor, read once from guest memory (the guest
// could change it meanwhile; the device acts on what it checked).
type diskRequest struct {
	op, flags uint32
	block     uint64
	count     uint32
	buf       uint64
}

func loadDiskRequest(mem []byte, desc uint64) diskRequest {
	return diskRequest{op: load32(mem, desc+dOp), flags: load32(mem, desc+dFlags), block: load64(mem, desc+dBlock),
		count: load32(mem, desc+dCount), buf: load64(mem, desc+dBuf)}
}

// check returns DISK_S_OK for a request a disk of blocks blocks can execute,
// or the error status it completes with: an unknown op or flag, blocks
// outside the disk (or none, or more than the buffer area holds), a buffer
// outside the buffer area.
func (r diskRequest) check(blocks uint64) uint32 {
	switch r.op {
	case diskOpFlush:
		if r.flags != 0 {
			return diskSBadOp
		}
		return diskSOK
	case diskOpRead:
		if r.flags != 0 {
			return diskSBadOp
		}
	case diskOpWrite:
		if r.flags&^diskFFUA != 0 {
			return diskSBadOp
		}
	default:
		return diskSBadOp
	}
	if r.count == 0 || r.count > diskMaxCount || r.block >= blocks || uint64(r.count) > blocks-r.block {
		return diskSBadRange
	}
	n := uint64(r.count) * DiskBlockSize
	if r.buf < diskBufAddr || r.buf > diskBufAddr+diskBufSize || n > diskBufAddr+diskBufSize-r.buf {
		return diskSBadBuf
	}
	return diskSOK
}

// execute runs the request at desc and returns its status. With mu held.
func (d *diskDev) execute(mem []byte, desc uint64) uint32 {
	r := loadDiskRequest(mem, desc)
	if st := r.check(d.blocks); st != diskSOK {
		d.stats.bad.Add(1)
		return st
	}
	if r.op == diskOpFlush {
		if err := d.io.Sync(); err != nil {
			d.stats.ioErrors.Add(1)
			return diskSIOError
		}
		d.stats.flushes.Add(1)
		return diskSOK
	}
	n := uint64(r.count) * DiskBlockSize
	p := mem[r.buf : r.buf+n]
	off := r.block * DiskBlockSize
	if r.op == diskOpRead {
		d.m.guardWrite(r.buf, n)
		err := readFull(d.io, p, off)
		// DMA into guest memory: reported even when the read failed midway.
		d.m.recordWrite(r.buf, n)
		if err != nil {
			d.stats.ioErrors.Add(1)
			return diskSIOError
		}
		d.stats.reads.Add(1)
		d.stats.blocksRead.Add(uint64(r.count))
		return diskSOK
	}
	if _, err := d.io.WriteAt(p, int64(off)); err != nil {
		d.stats.ioErrors.Add(1)
		return diskSIOError
	}
	if r.flags&diskFFUA != 0 {
		if err := d.io.Sync(); err != nil {
			d.stats.ioErrors.Add(1)
			return diskSIOError
		}
		d.stats.fua.Add(1)
	}
	d.stats.writes.Add(1)
	d.stats.blocksWritten.Add(uint64(r.count))
	return diskSOK
}

func (d *diskDev) snapshot() DiskStats {
	s := &d.stats
	return DiskStats{
		Reads: s.reads.Load(), Writes: s.writes.Load(), Flushes: s.flushes.Load(),
		BlocksRead: s.blocksRead.Load(), BlocksWritten: s.blocksWritten.Load(), FUAWrites: s.fua.Load(),
		BadRequests: s.bad.Load(), IOErrors: s.ioErrors.Load(), Batches: s.batches.Load(), Kicks: d.kicks.Load(),
		Overruns: s.overruns.Load(),
	}
}

// DiskStats returns the block device's counters; zero without a device.
func (m *Machine) DiskStats() DiskStats {
	if m.disk == nil {
		return DiskStats{}
	}
	return m.disk.snapshot()
}
