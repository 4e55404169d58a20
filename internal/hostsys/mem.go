package hostsys

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// MapShared maps the first size bytes of f, readable and writable, shared:
// writes go to the file. Unmap releases the mapping.
func MapShared(f *os.File, size int) ([]byte, error) {
	b, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes of %s: %w", size, f.Name(), err)
	}
	return b, nil
}

// Unmap releases a mapping MapShared returned.
func Unmap(b []byte) error { return unix.Munmap(b) }

// populatePiece is how much one MADV_POPULATE_WRITE call covers: the call
// holds the process's memory map lock, and one call over a GiB stalls every
// mmap in the process (the Go allocator's too) for about half a second.
const populatePiece = 2 << 20

// CanPopulate reports whether Populate works here (MADV_POPULATE_WRITE,
// Linux 5.14), by populating the first page of b.
func CanPopulate(b []byte) bool {
	b = pageAligned(b)
	return len(b) >= os.Getpagesize() && unix.Madvise(b[:os.Getpagesize()], unix.MADV_POPULATE_WRITE) == nil
}

// Populate makes the whole pages of b resident and writable without
// writing them, so it may run while others write b. Errors (no such advice
// on this kernel, or no memory) leave pages to fault in when touched.
func Populate(b []byte) {
	b = pageAligned(b)
	for i := 0; i < len(b); i += populatePiece {
		unix.Madvise(b[i:min(i+populatePiece, len(b))], unix.MADV_POPULATE_WRITE)
	}
}

// Holes calls hole for each hole of f between file offsets from and to
// (SEEK_DATA and SEEK_HOLE: a memfd, tmpfs or most file systems), in
// order. A file system that cannot say reports all of it as data. It
// moves f's offset.
func Holes(f *os.File, from, to int64, hole func(from, to int64)) error {
	fd := int(f.Fd())
	for pos := from; pos < to; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			hole(pos, to) // no data past pos
			return nil
		}
		if err != nil {
			return fmt.Errorf("seek data in %s: %w", f.Name(), err)
		}
		if data > pos {
			hole(pos, min(data, to))
		}
		if data >= to {
			return nil
		}
		if pos, err = unix.Seek(fd, data, unix.SEEK_HOLE); err != nil {
			return fmt.Errorf("seek hole in %s: %w", f.Name(), err)
		}
	}
	return nil
}

// FreeRAM returns the memory free now (not counting the page cache).
func FreeRAM() (uint64, error) {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0, fmt.Errorf("sysinfo: %w", err)
	}
	return uint64(si.Freeram) * uint64(si.Unit), nil
}
