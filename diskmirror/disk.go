package diskmirror

import (
	"fmt"
	"io"
	"os"
)

// Disk is a disk image: the local image a Mirror writes through to, or the
// backup image a Replica applies to. An *os.File (a regular file or a block
// device) is one.
type Disk interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fsync).
	Sync() error
}

// DiskSize returns the size of d in bytes: Size() if d has it, else the
// length of a regular file (Stat), else the end of a block device (Seek).
func DiskSize(d Disk) (int64, error) {
	if s, ok := d.(interface{ Size() int64 }); ok {
		return s.Size(), nil
	}
	if st, ok := d.(interface{ Stat() (os.FileInfo, error) }); ok {
		fi, err := st.Stat()
		if err != nil {
			return 0, fmt.Errorf("stat disk image: %w", err)
		}
		if fi.Mode().IsRegular() {
			return fi.Size(), nil
		}
	}
	if sk, ok := d.(io.Seeker); ok {
		n, err := sk.Seek(0, io.SeekEnd)
		if err != nil {
			return 0, fmt.Errorf("seek to the end of the disk image: %w", err)
		}
		return n, nil
	}
	return 0, fmt.Errorf("size of disk image: %T has no Size, Stat or Seek", d)
}

// checkSize checks an image size against the format's bounds.
func checkSize(size int64) error {
	if size <= 0 || size > MaxImageSize {
		return fmt.Errorf("image size %d bytes (want 1 to %d)", size, int64(MaxImageSize))
	}
	return nil
}
