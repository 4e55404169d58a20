package testvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Snapshot file: a machine state and its guest memory in one file, for saving a
// machine in one process and restoring it in another.
//
//	offset 0   magic "RPAGSNAP", version u32, reserved u32,
//	           stateLen u64, memOffset u64, memLen u64,
//	           memCRC u32 (crc32c of the memory image), headerCRC u32 (of bytes 0..43)
//	offset 48  the state (as Save returns it, with its own checksum)
//	memOffset  the memory image, page aligned; all-zero pages are holes
const (
	snapMagic      = "RPAGSNAP"
	snapVersion    = 1
	snapHeaderSize = 48
)

// ErrBadSnapshot is returned (wrapped) for a snapshot file that is truncated,
// corrupted or of another version.
var ErrBadSnapshot = errors.New("bad snapshot file")

// WriteSnapshot saves the paused machine's state and memory to path. Zero pages
// are left as holes, so the file is as sparse as the guest's memory. The
// machine stays locked against Resume until the memory is written, so state and
// memory are from one moment; the file appears at path only when complete
// (written beside it, then renamed).
func (m *Machine) WriteSnapshot(path string) (err error) {
	m.ctl.Lock()
	defer m.ctl.Unlock()
	state, err := m.saveLocked()
	if err != nil {
		return err
	}
	memOff := (uint64(snapHeaderSize+len(state)) + pageSize - 1) / pageSize * pageSize
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	defer func() {
		f.Close()
		if err != nil {
			os.Remove(tmp)
		}
	}()
	crc := uint32(0)
	for off := uint64(0); off < uint64(len(m.mem)); off += pageSize {
		page := m.mem[off : off+pageSize]
		crc = crc32.Update(crc, castagnoli, page)
		if isZero(page) {
			continue
		}
		if _, err := f.WriteAt(page, int64(memOff+off)); err != nil {
			return fmt.Errorf("write snapshot memory: %w", err)
		}
	}
	if err := f.Truncate(int64(memOff + uint64(len(m.mem)))); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	hdr := make([]byte, snapHeaderSize)
	copy(hdr, snapMagic)
	binary.LittleEndian.PutUint32(hdr[8:], snapVersion)
	binary.LittleEndian.PutUint64(hdr[16:], uint64(len(state)))
	binary.LittleEndian.PutUint64(hdr[24:], memOff)
	binary.LittleEndian.PutUint64(hdr[32:], uint64(len(m.mem)))
	binary.LittleEndian.PutUint32(hdr[40:], crc)
	binary.LittleEndian.PutUint32(hdr[44:], crc32.Checksum(hdr[:44], castagnoli))
	if _, err := f.WriteAt(append(hdr, state...), 0); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	return nil
}

func isZero(b []byte) bool {
	for _, w := range pageWordsOf(b) {
		if w != 0 {
			return false
		}
	}
	return true
}

// snapHeader is a checked snapshot header and its state.
type snapHeader struct {
	state  []byte
	saved  *SavedState
	memOff uint64
	memLen uint64
	memCRC uint32
}

// readSnapHeader reads and checks everything but the memory image.
func readSnapHeader(f *os.File, path string) (*snapHeader, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("read snapshot %s: %w: %s", path, ErrBadSnapshot, fmt.Sprintf(format, args...))
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read snapshot: %w", err)
	}
	hdr := make([]byte, snapHeaderSize)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return nil, bad("header: %v (file of %d bytes)", err, fi.Size())
	}
	if string(hdr[:8]) != snapMagic {
		return nil, bad("magic %q, want %q (not a repagent snapshot)", hdr[:8], snapMagic)
	}
	if v := binary.LittleEndian.Uint32(hdr[8:]); v != snapVersion {
		return nil, bad("version %d, this build reads version %d", v, snapVersion)
	}
	if got, want := crc32.Checksum(hdr[:44], castagnoli), binary.LittleEndian.Uint32(hdr[44:]); got != want {
		return nil, bad("header checksum %#08x, computed %#08x (corrupted)", want, got)
	}
	h := &snapHeader{
		memOff: binary.LittleEndian.Uint64(hdr[24:]),
		memLen: binary.LittleEndian.Uint64(hdr[32:]),
		memCRC: binary.LittleEndian.Uint32(hdr[40:]),
	}
	stateLen := binary.LittleEndian.Uint64(hdr[16:])
	if stateLen > maxStateSize || h.memOff%pageSize != 0 || h.memOff < snapHeaderSize+stateLen ||
		h.memLen%hugePage != 0 || h.memLen < MinMemSize || h.memLen > MaxMemSize {
		return nil, bad("inconsistent header (state %d bytes, memory %d bytes at %d)", stateLen, h.memLen, h.memOff)
	}
	if uint64(fi.Size()) != h.memOff+h.memLen {
		return nil, bad("file is %d bytes, the header says %d (truncated?)", fi.Size(), h.memOff+h.memLen)
	}
	h.state = make([]byte, stateLen)
	if _, err := f.ReadAt(h.state, snapHeaderSize); err != nil {
		return nil, bad("state: %v", err)
	}
	if h.saved, err = DecodeState(h.state); err != nil {
		return nil, fmt.Errorf("read snapshot %s: %w", path, err)
	}
	if h.saved.Config.MemSize != h.memLen {
		return nil, bad("state is for a %s guest, the image holds %s", FormatSize(h.saved.Config.MemSize), FormatSize(h.memLen))
	}
	return h, nil
}

// ReadSnapshotConfig reads only the header and state of a snapshot file and
// returns the guest configuration it holds: a cheap look before ReadSnapshot
// copies the memory.
func ReadSnapshotConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("read snapshot: %w", err)
	}
	defer f.Close()
	h, err := readSnapHeader(f, path)
	if err != nil {
		return Config{}, err
	}
	return h.saved.Config, nil
}

// ReadSnapshot reads a snapshot file: it checks the header, the state's own
// checksum and the memory checksum, and copies the memory into a new memfd. It
// returns the state and the memfd, ready for Restore; nothing is returned when
// anything fails to check.
func ReadSnapshot(path string) (state []byte, mem *os.File, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read snapshot: %w", err)
	}
	defer f.Close()
	h, err := readSnapHeader(f, path)
	if err != nil {
		return nil, nil, err
	}
	mem, err = newMemFile(h.memLen)
	if err != nil {
		return nil, nil, err
	}
	dst, err := mapMemFile(mem, h.memLen)
	if err != nil {
		mem.Close()
		return nil, nil, err
	}
	defer unmapMem(dst)
	crc, err := readExtents(f, h.memOff, dst)
	if err != nil {
		mem.Close()
		return nil, nil, fmt.Errorf("read snapshot %s: %w: memory: %w", path, ErrBadSnapshot, err)
	}
	if crc != h.memCRC {
		mem.Close()
		return nil, nil, fmt.Errorf("read snapshot %s: %w: memory checksum %#08x, computed %#08x (corrupted)", path, ErrBadSnapshot, h.memCRC, crc)
	}
	return h.state, mem, nil
}

// readExtents copies the memory image at off in f into dst, reading only the
// file's data extents: holes stay unwritten in dst, so a sparse image (or a
// forged one that claims a large guest) allocates only what the file really
// holds. It returns the CRC32C of the whole image, holes counted as zeros.
func readExtents(f *os.File, off uint64, dst []byte) (uint32, error) {
	fd := int(f.Fd())
	n := uint64(len(dst))
	crc := uint32(0)
	for pos := uint64(0); pos < n; {
		data, err := unix.Seek(fd, int64(off+pos), unix.SEEK_DATA)
		if err == unix.ENXIO {
			data = int64(off + n) // no data after pos: the rest is a hole
		} else if err != nil {
			return 0, fmt.Errorf("seek data: %w", err)
		}
		dataPos := min(uint64(data)-off, n)
		crc = crcZeros(crc, dataPos-pos)
		if pos = dataPos; pos >= n {
			break
		}
		hole, err := unix.Seek(fd, int64(off+pos), unix.SEEK_HOLE)
		if err != nil {
			return 0, fmt.Errorf("seek hole: %w", err)
		}
		end := min(uint64(hole)-off, n)
		if _, err := f.ReadAt(dst[pos:end], int64(off+pos)); err != nil {
			return 0, err
		}
		crc = crc32.Update(crc, castagnoli, dst[pos:end])
		pos = end
	}
	return crc, nil
}

var zeroChunk = make([]byte, 1<<20)

// crcZeros extends crc over n zero bytes.
func crcZeros(crc uint32, n uint64) uint32 {
	for n > 0 {
		k := min(n, uint64(len(zeroChunk)))
		crc = crc32.Update(crc, castagnoli, zeroChunk[:k])
		n -= k
	}
	return crc
}
