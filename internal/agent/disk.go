package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/repagent/repagent/testvm"
)

// The guest's block device is a raw image file (--disk): block b of the
// device is at byte b*testvm.DiskBlockSize, so the image's size, a multiple
// of the block size, is the disk's. The primary writes it through a
// diskmirror.Mirror, which the engine keeps in step with the backup's image
// (--disk on the backup): at any failover the backup image holds the disk of
// the checkpoint resumed.

// DiskImageSize checks that the image file a flag names exists, is a regular
// file and has a size the block device can have, and returns that size. Any
// error is a usage error.
func DiskImageSize(flag, path string) (int64, error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return 0, Usagef("%s %s: no such file (make an image first, e.g. truncate -s 64M %s)", flag, path, path)
	case err != nil:
		return 0, Usagef("%s %s: %w", flag, path, err)
	case !fi.Mode().IsRegular():
		return 0, Usagef("%s %s: not a regular file (want a raw disk image)", flag, path)
	case fi.Size() == 0 || fi.Size()%testvm.DiskBlockSize != 0:
		return 0, Usagef("%s %s: size %d bytes is not a whole number of %s blocks (resize it, e.g. truncate -s 64M %s)",
			flag, path, fi.Size(), testvm.FormatSize(testvm.DiskBlockSize), path)
	case uint64(fi.Size())/testvm.DiskBlockSize > testvm.MaxDiskBlocks:
		return 0, Usagef("%s %s: %s is larger than the block device's %s", flag, path,
			testvm.FormatSize(uint64(fi.Size())), testvm.FormatSize(testvm.MaxDiskBlocks*testvm.DiskBlockSize))
	}
	return fi.Size(), nil
}

// openDisk opens the image at path for a guest whose block device has blocks
// blocks, and checks that its size still matches (it was checked when the
// flags were parsed).
func openDisk(path string, blocks uint64) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open disk image: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open disk image: %w", err)
	}
	if want := int64(blocks * testvm.DiskBlockSize); fi.Size() != want {
		f.Close()
		return nil, fmt.Errorf("disk image %s: %d bytes, the guest's disk has %d (%d blocks)", path, fi.Size(), want, blocks)
	}
	return f, nil
}

// eraseDisk empties the image f of size bytes, for a new guest that runs the
// disk workload: the guest starts with an empty version table, which says
// every block of its working set (here the whole disk) holds zeros, and
// checks the disk against that (VerifyDisk). Truncating to 0 and back leaves
// a sparse file of zeros, at no cost whatever the size.
func eraseDisk(f *os.File, size int64) error {
	if err := f.Truncate(0); err != nil {
		return fmt.Errorf("erase disk image for the disk workload: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("erase disk image for the disk workload: %w", err)
	}
	return nil
}

// JobDiskSize is the size of the main job's own disk images.
const JobDiskSize = 64 << 20

// JobDiskPrefix starts the name of the directory of the main job's disk
// images, followed by the job's PID: a run that was killed leaves it behind,
// and the next run removes it.
const JobDiskPrefix = "repagent-disk-"

// jobDisks is the main job's pair of disk images, made for one run in a
// temporary directory and removed after it.
type jobDisks struct {
	dir             string
	primary, backup string
}

// newJobDisks makes two empty (sparse) images of jobDiskSize bytes, after
// removing the ones earlier runs left behind when they were killed.
func newJobDisks() (_ *jobDisks, err error) {
	SweepJobDisks(os.TempDir())
	dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", JobDiskPrefix, os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("make the job's disk images (or pass --no-disk): %w", err)
	}
	d := &jobDisks{dir: dir, primary: filepath.Join(dir, "primary.img"), backup: filepath.Join(dir, "backup.img")}
	defer func() {
		if err != nil {
			d.close()
		}
	}()
	for _, p := range []string{d.primary, d.backup} {
		f, err := os.Create(p)
		if err != nil {
			return nil, fmt.Errorf("make the job's disk images (or pass --no-disk): %w", err)
		}
		err = f.Truncate(JobDiskSize)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("make the job's disk images (or pass --no-disk): %w", err)
		}
	}
	return d, nil
}

// close removes the images and their directory.
func (d *jobDisks) close() error {
	if err := os.RemoveAll(d.dir); err != nil {
		return fmt.Errorf("remove the job's disk images: %w", err)
	}
	return nil
}

// SweepJobDisks removes the directories in tmp named jobDiskPrefix + PID +
// "-" + anything whose process no longer exists: what a killed run left
// behind.
func SweepJobDisks(tmp string) {
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), JobDiskPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
			os.RemoveAll(filepath.Join(tmp, e.Name()))
		}
	}
}

// verifyDiskLine checks the image disk against the memory image mem of the
// same checkpoint of a guest that runs the disk workload
// (testvm.VerifyDiskImage) and returns the figures, e.g. "4096 blocks, 4096
// written, newest version 81234, guest writes 81234, batch in flight 0
// completed 0 pending".
func verifyDiskLine(mem, disk io.ReaderAt) (string, error) {
	rep, err := testvm.VerifyDiskImage(mem, disk)
	if err != nil {
		return "", err
	}
	return diskReportString(rep), nil
}

func diskReportString(rep testvm.DiskReport) string {
	return fmt.Sprintf("%d blocks, %d written, newest version %d, guest writes %d, batch in flight %d completed %d pending",
		rep.Blocks, rep.Written, rep.MaxVersion, rep.Writes, rep.Completed, rep.Pending)
}
