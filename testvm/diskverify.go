package testvm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
)

// DiskReport summarises a verification of the Disk workload's blocks.
type DiskReport struct {
	Blocks     uint64 // working-set blocks checked
	Written    uint64 // blocks that hold a version (0 = never written) and were checked to hold exactly it
	Writes     uint64 // block writes the guest completed and recorded (its status page)
	MaxVersion uint64 // the newest version found
	// Completed and Pending are the blocks of the write batch the guest had in
	// flight: the device had completed the first (they must hold the new
	// data) and not yet taken the second (they must still hold the old).
	Completed, Pending uint64
}

// VerifyDisk checks the machine's disk (its DiskBackend) against the Disk
// workload's record in guest memory, as VerifyDiskImage does. Call it while
// the machine is paused, or before it starts (a restored machine).
func (m *Machine) VerifyDisk() (DiskReport, error) {
	m.memMu.RLock()
	defer m.memMu.RUnlock()
	if m.mem == nil {
		return DiskReport{}, fmt.Errorf("verify disk: %w", ErrStopped)
	}
	if m.disk == nil {
		return DiskReport{}, fmt.Errorf("verify disk: the machine has no block device")
	}
	return verifyDisk(bytes.NewReader(m.mem), m.disk.io)
}

// VerifyDiskImage checks a disk image against the memory image of a guest
// that runs the Disk workload (a memory file, a replica, or
// bytes.NewReader(Machine.Memory())), taken at the same checkpoint. Every
// block of the working set must hold exactly what the guest's record says:
//   - a block whose version in the guest's table is v holds the stamp of
//     write v (a block never written holds zeros);
//   - of the batch of writes the guest had in flight, the blocks of the
//     requests the device had completed (the ring's req_cons is past them)
//     hold the new data from the guest's buffers, and the others still hold
//     what the table says.
//
// So it proves that the image is the one the checkpoint's device state
// implies: no completed write missing, no write the checkpoint had not
// reached present. It needs nothing but the two images: the parameters,
// table, status page, ring and buffers are all in guest memory.
func VerifyDiskImage(mem, disk io.ReaderAt) (DiskReport, error) {
	return verifyDisk(mem, disk)
}

// readFull reads len(p) bytes at off; what lies past the end reads as zeros.
func readFull(r io.ReaderAt, p []byte, off uint64) error {
	n, err := r.ReadAt(p, int64(off))
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

func verifyDisk(mem, img io.ReaderAt) (DiskReport, error) {
	var rep DiskReport
	le := binary.LittleEndian
	fail := func(format string, args ...any) (DiskReport, error) {
		return rep, fmt.Errorf("verify disk: "+format, args...)
	}
	params := make([]byte, pageSize)
	if err := readFull(mem, params, paramsAddr); err != nil {
		return fail("read the params page: %v", err)
	}
	if le.Uint64(params[pMagic:]) != paramsMagic || le.Uint32(params[pABIVersion:]) != abiVersion {
		return fail("no params page of guest ABI %d in the memory image", abiVersion)
	}
	if w := Workload(le.Uint32(params[pWorkload:])); w != Disk {
		return fail("the guest runs workload %s, not disk", w)
	}
	blocks, ws := le.Uint64(params[pDiskBlocks:]), le.Uint64(params[pDiskWS:])
	table := le.Uint64(params[pVCPU+pvBase:])
	if le.Uint32(params[pDiskFlags:])&diskPresent == 0 || ws == 0 || ws > blocks || blocks > MaxDiskBlocks || table < DataAddr {
		return fail("params page: disk of %d blocks, working set %d, table at %#x", blocks, ws, table)
	}
	rep.Blocks = ws

	status := make([]byte, pageSize)
	if err := readFull(mem, status, StatusOffset(0)); err != nil {
		return fail("read vCPU 0's status page: %v", err)
	}
	if GuestState(le.Uint32(status[sState:])) == GuestFailed {
		return fail("the guest failed: %v (block %d, status %d)", &GuestError{Code: le.Uint32(status[sError:])},
			int64(le.Uint64(status[sDiskBadBlk:]))-1, le.Uint64(status[sDiskBadStat:]))
	}
	writes := le.Uint64(status[sDiskWrites:])
	rep.Writes = writes
	batch, batchN := uint32(le.Uint64(status[sDiskBatch:])), le.Uint64(status[sDiskBatchN:])

	versions := make([]byte, ws*8)
	if err := readFull(mem, versions, table); err != nil {
		return fail("read the version table: %v", err)
	}

	// The batch in flight: what each of its blocks must hold.
	expect := map[uint64][]byte{}
	limit := writes // the newest version the table may hold
	if batchN != 0 {
		hdr := make([]byte, 128)
		ring := make([]byte, diskSlots*diskDescSize)
		bufs := make([]byte, diskBufSize)
		for _, r := range []struct {
			p   []byte
			off uint64
		}{{hdr, diskAddr}, {ring, diskRingAddr}, {bufs, diskBufAddr}} {
			if err := readFull(mem, r.p, r.off); err != nil {
				return fail("read the block device's memory: %v", err)
			}
		}
		cons, prod := le.Uint32(hdr[dkReqCons:]), le.Uint32(hdr[dkReqProd:])
		done := uint64(cons - batch)
		if batchN > diskSlots || done > batchN || uint64(prod-batch) > batchN || done > uint64(prod-batch) {
			return fail("batch of %d requests from ring index %d in flight, but req_cons is %d and req_prod %d", batchN, batch, cons, prod)
		}
		// The batch's versions are consecutive, from v0+1; the guest's count
		// of writes is v0 until it recorded them all, then v0+n.
		var n, v0 uint64
		for j := uint64(0); j < batchN; j++ {
			desc := uint64((batch+uint32(j))%diskSlots) * diskDescSize
			r := loadDiskRequest(ring, desc)
			if r.op != diskOpWrite || r.check(blocks) != diskSOK {
				return fail("request %d of the batch in flight is not a valid write: %+v", j, r)
			}
			if st := le.Uint32(ring[desc+dStatus:]); j < done && st != diskSOK {
				return fail("the device failed write request %d (block %d) with status %d", j, r.block, st)
			}
			for k := uint64(0); k < uint64(r.count); k++ {
				b := r.block + k
				data := bufs[r.buf-diskBufAddr+k*DiskBlockSize:][:DiskBlockSize]
				if b >= ws {
					return fail("the batch in flight writes block %d, outside the working set of %d", b, ws)
				}
				v := le.Uint64(data[8:])
				if n == 0 {
					v0 = v - 1
				}
				n++
				if v != v0+n || !isDiskStamp(data, b, v) {
					return fail("the guest's buffer for block %d (request %d of the batch in flight) holds %s, want version %d",
						b, j, describeBlock(data), v0+n)
				}
				if j < done {
					expect[b] = data
					rep.Completed++
				} else {
					rep.Pending++
				}
			}
		}
		if writes != v0 && writes != v0+n {
			return fail("the batch in flight writes versions %d to %d, but the guest reports %d writes", v0+1, v0+n, writes)
		}
		// The guest may have recorded some of the batch's versions already.
		limit = v0 + n
	}

	const chunk = 64
	buf := make([]byte, chunk*DiskBlockSize)
	for b0 := uint64(0); b0 < ws; b0 += chunk {
		n := min(chunk, ws-b0)
		if err := readFull(img, buf[:n*DiskBlockSize], b0*DiskBlockSize); err != nil {
			return fail("read the image at block %d: %v", b0, err)
		}
		for k := uint64(0); k < n; k++ {
			b := b0 + k
			got := buf[k*DiskBlockSize:][:DiskBlockSize]
			if want, ok := expect[b]; ok {
				if !bytes.Equal(got, want) {
					return fail("block %d: the device completed the write of version %d (req_cons is past it), but the image holds %s",
						b, le.Uint64(want[8:]), describeBlock(got))
				}
				rep.Written++
				rep.MaxVersion = max(rep.MaxVersion, le.Uint64(want[8:]))
				continue
			}
			v := le.Uint64(versions[b*8:])
			if v > limit {
				return fail("block %d: version %d in the guest's table, newer than the %d writes it reports", b, v, limit)
			}
			if !isDiskStamp(got, b, v) {
				return fail("block %d: the guest's table says version %d, the image holds %s", b, v, describeBlock(got))
			}
			if v != 0 {
				rep.Written++
				rep.MaxVersion = max(rep.MaxVersion, v)
			}
		}
	}
	if batchN == 0 && rep.MaxVersion != writes {
		return fail("newest version on the image is %d, but the guest reports %d writes", rep.MaxVersion, writes)
	}
	return rep, nil
}

// isDiskStamp reports whether b holds the stamp of write v of block (all
// zeros for v = 0; see abi.h).
func isDiskStamp(b []byte, block, v uint64) bool {
	w := pageWordsOf(b)
	if v == 0 {
		return isZero(b)
	}
	w0 := uint64(diskStampTag) | block
	if w[0] != w0 || w[1] != v {
		return false
	}
	fb := fillBase(w0, v)
	for k := 2; k < len(w); k++ {
		if w[k] != fb+uint64(k)*fillK {
			return false
		}
	}
	return true
}

// describeBlock says what a block holds, for error messages.
func describeBlock(b []byte) string {
	w := pageWordsOf(b)
	switch {
	case isZero(b):
		return "zeros"
	case w[0]&^(1<<48-1) == diskStampTag:
		block, v := w[0]&(1<<48-1), w[1]
		if isDiskStamp(b, block, v) {
			return fmt.Sprintf("the stamp of block %d version %d", block, v)
		}
		return fmt.Sprintf("a damaged stamp of block %d version %d", block, v)
	}
	return fmt.Sprintf("data that is no stamp (words %#x %#x)", w[0], w[1])
}
