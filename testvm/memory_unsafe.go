package testvm

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// newMemFile creates a memfd of size bytes for guest memory. A memfd lets a
// backup map the same bytes, and lets a restored VM map a replica without a copy.
func newMemFile(size uint64) (*os.File, error) {
	fd, err := unix.MemfdCreate("repagent-guest", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "repagent-guest")
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("size guest memory to %s: %w", FormatSize(size), err)
	}
	return f, nil
}

// mapMemFile maps size bytes of f shared, read-write.
func mapMemFile(f *os.File, size uint64) ([]byte, error) {
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map guest memory (%s): %w", FormatSize(size), err)
	}
	return mem, nil
}

func unmapMem(mem []byte) error { return unix.Munmap(mem) }

// hostAddr is the host virtual address of mem[off].
func hostAddr(mem []byte, off uint64) uint64 { return uint64(uintptr(unsafe.Pointer(&mem[off]))) }

// load64 reads an aligned 64-bit word of guest memory atomically, so a read
// racing a guest store sees the old or the new value, never a mix.
func load64(mem []byte, off uint64) uint64 {
	return atomic.LoadUint64((*uint64)(unsafe.Pointer(&mem[off])))
}

func load32(mem []byte, off uint64) uint32 {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&mem[off])))
}

// store64 writes an aligned 64-bit word of guest memory atomically.
func store64(mem []byte, off, v uint64) {
	atomic.StoreUint64((*uint64)(unsafe.Pointer(&mem[off])), v)
}

// pageWords views one 4 KiB guest page as 512 words.
func pageWords(mem []byte, off uint64) *[512]uint64 {
	return (*[512]uint64)(unsafe.Pointer(&mem[off]))
}

// kick interrupts thread tid of this process with SIGURG. The Go runtime
// already uses SIGURG for goroutine preemption and ignores spurious ones, so
// no handler is needed; its only effect is that KVM_RUN returns EINTR.
func kick(tid int) error {
	return unix.Tgkill(pid, tid, unix.SIGURG)
}

// pid is this process's id, read once: kick runs on every pause.
var pid = unix.Getpid()

// pageWordsOf views a page-sized byte slice as words.
func pageWordsOf(b []byte) []uint64 {
	return unsafe.Slice((*uint64)(unsafe.Pointer(&b[0])), len(b)/8)
}

// store32 writes an aligned 32-bit word of guest memory atomically. On amd64
// the store is an XCHG: a full fence, which the network device's kick
// protocol relies on (see net.go).
func store32(mem []byte, off uint64, v uint32) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&mem[off])), v)
}
