package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrNotSupported is returned (wrapped, with the feature or ioctl named)
// when this kernel's userfaultfd lacks what a call needs, so a caller can
// fall back to copying in the pause: errors.Is(err, uffd.ErrNotSupported).
var ErrNotSupported = errors.New("not supported by this kernel's userfaultfd")

// ErrClosed is returned (wrapped) by every call on an FD after Close, and by
// Wait when Close ends it.
var ErrClosed = errors.New("userfaultfd is closed")

// RangeError is the error of a call on a range of memory. It names the call,
// the range and the cause (an errno, ErrClosed or ErrNotSupported), which
// errors.Is and errors.As find.
type RangeError struct {
	Op   string // "UFFDIO_WRITEPROTECT(WP)", "UFFDIO_REGISTER(WP)", ...
	Addr uint64
	Len  uint64
	Err  error
}

func (e *RangeError) Error() string {
	cause := e.Err.Error()
	var errno unix.Errno
	if errors.As(e.Err, &errno) {
		if name := unix.ErrnoName(errno); name != "" {
			cause = name + " (" + cause + ")"
		}
	}
	return fmt.Sprintf("uffd: %s [%#x, %#x) (%#x bytes): %s", e.Op, e.Addr, e.Addr+e.Len, e.Len, cause)
}

func (e *RangeError) Unwrap() error { return e.Err }

// Fault is one write-protect fault read from the userfaultfd: a thread is
// blocked writing the page at Addr until the page is unprotected (or woken).
type Fault struct {
	Addr  uint64 // the faulting page's address, page-aligned
	Flags uint64 // UFFD_PAGEFAULT_FLAG_* bits
	TID   uint32 // the faulting thread's id with FeatureThreadID, else 0
}

// WP reports whether the fault is a write-protect fault (the only kind a
// range registered by this package raises).
func (f Fault) WP() bool { return f.Flags&UFFD_PAGEFAULT_FLAG_WP != 0 }

// Write reports whether the faulting access was a write.
func (f Fault) Write() bool { return f.Flags&UFFD_PAGEFAULT_FLAG_WRITE != 0 }

// FD is a userfaultfd in write-protect mode. Its methods may be called from
// any goroutine; Close may be called while others are in Wait or a Handler
// is running, and ends them.
type FD struct {
	// mu is held shared by every call that uses fd, and exclusively by
	// Close, so fd is never closed (and its number reused) under a call.
	mu     sync.RWMutex
	fd     int // the userfaultfd; -1 once closed
	closed int // an eventfd, made readable when Close begins, never read

	features  Feature
	closeOnce sync.Once
	closeErr  error
}

// Offered returns the features this kernel's userfaultfd offers (the
// answer of UFFDIO_API to a request for none, on a throwaway userfaultfd:
// UFFDIO_API works only once per descriptor).
func Offered() (Feature, error) {
	fd, err := newUserfaultfd()
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	a := uffdioAPI{API: UFFD_API}
	if errno := ioctlAPI(fd, &a); errno != 0 {
		return 0, fmt.Errorf("uffd: UFFDIO_API (probing features): %w", errno)
	}
	return Feature(a.Features), nil
}

// Open returns a userfaultfd ready for Register in write-protect mode.
//
// It enables FeaturePagefaultFlagWP, the features asked for, and
// FeatureWPUnpopulated and FeatureWPHugetlbfsShmem when the kernel offers
// them. A feature required (asked for, or PAGEFAULT_FLAG_WP) but not offered
// is an error naming it and wrapping ErrNotSupported.
//
// The descriptor is made by userfaultfd(2) with O_CLOEXEC|O_NONBLOCK and
// deliberately without UFFD_USER_MODE_ONLY: that flag makes the kernel
// refuse faults raised in kernel mode, and KVM's writes to guest memory on a
// vCPU's behalf (get_user_pages in the fault path, copy_to_user for
// emulated accesses and paravirtual structures) and a syscall writing into
// guest memory (read(2) by a device) are kernel-mode: they would fail with
// EFAULT instead of waiting for the page to be copied. Without that flag
// userfaultfd(2) needs CAP_SYS_PTRACE (root has it) or
// vm.unprivileged_userfaultfd=1.
func Open(features ...Feature) (*FD, error) {
	var required Feature
	for _, f := range features {
		required |= f
	}
	return open(required, FeatureWPUnpopulated|FeatureWPHugetlbfsShmem)
}

// open enables required (an error if not offered) and those of wanted that
// are offered.
func open(required, wanted Feature) (*FD, error) {
	required |= FeaturePagefaultFlagWP
	offered, err := Offered()
	if err != nil {
		return nil, err
	}
	if missing := required &^ offered; missing != 0 {
		return nil, fmt.Errorf("uffd: Open: the kernel does not offer %s (it offers %s): %w",
			featureList(missing), offered, ErrNotSupported)
	}
	enable := required | wanted&offered
	fd, err := newUserfaultfd()
	if err != nil {
		return nil, err
	}
	a := uffdioAPI{API: UFFD_API, Features: uint64(enable)}
	if errno := ioctlAPI(fd, &a); errno != 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: UFFDIO_API with features %s: %w", enable, errno)
	}
	if a.Ioctls&(1<<_UFFDIO_REGISTER) == 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: UFFDIO_API: ioctls %#x lack UFFDIO_REGISTER: %w", a.Ioctls, ErrNotSupported)
	}
	closed, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: eventfd for Close: %w", err)
	}
	return &FD{fd: fd, closed: closed, features: enable}, nil
}

// featureList spells each bit of f with its UFFD_FEATURE_ prefix.
func featureList(f Feature) string {
	names := strings.Split(f.String(), "|")
	for i, n := range names {
		names[i] = "UFFD_FEATURE_" + n
	}
	return strings.Join(names, ", ")
}

func newUserfaultfd() (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	switch errno {
	case 0:
		return int(r), nil
	case unix.ENOSYS:
		return -1, fmt.Errorf("uffd: userfaultfd(2): %w (%w)", ErrNotSupported, errno)
	case unix.EPERM:
		return -1, fmt.Errorf("uffd: userfaultfd(2) without UFFD_USER_MODE_ONLY needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1: %w", errno)
	}
	return -1, fmt.Errorf("uffd: userfaultfd(2): %w", errno)
}

// Features returns the features enabled on f.
func (f *FD) Features() Feature { return f.features }

// acquire returns the descriptor, held open until release.
func (f *FD) acquire() (int, bool) {
	f.mu.RLock()
	if f.fd < 0 {
		f.mu.RUnlock()
		return -1, false
	}
	return f.fd, true
}

func (f *FD) release() { f.mu.RUnlock() }

func rangeError(op string, addr, length uint64, err error) error {
	return &RangeError{Op: op, Addr: addr, Len: length, Err: err}
}

// Register registers [addr, addr+length) in write-protect mode. Both must be
// page-aligned and the range must be mapped (anonymous memory, or a memfd or
// other shmem mapping with FeatureWPHugetlbfsShmem). The range must be
// registered before it is protected. A range whose registration does not
// offer UFFDIO_WRITEPROTECT is unregistered again and refused with
// ErrNotSupported.
func (f *FD) Register(addr, length uint64) error {
	const op = "UFFDIO_REGISTER(WP)"
	fd, ok := f.acquire()
	if !ok {
		return rangeError(op, addr, length, ErrClosed)
	}
	defer f.release()
	r := uffdioRegister{Range: uffdioRange{Start: addr, Len: length}, Mode: UFFDIO_REGISTER_MODE_WP}
	if errno := ioctlRegister(fd, &r); errno != 0 {
		return rangeError(op, addr, length, errno)
	}
	if r.Ioctls&(1<<_UFFDIO_WRITEPROTECT) == 0 {
		u := uffdioRange{Start: addr, Len: length}
		ioctlRange(fd, UFFDIO_UNREGISTER, &u)
		return rangeError(op, addr, length,
			fmt.Errorf("the range's ioctls %#x lack UFFDIO_WRITEPROTECT: %w", r.Ioctls, ErrNotSupported))
	}
	return nil
}

// Unregister unregisters [addr, addr+length). The kernel drops the range's
// write protection and wakes any thread blocked on it: its write goes
// through uncopied.
func (f *FD) Unregister(addr, length uint64) error {
	return f.rangeCall("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, addr, length)
}

// rangeCall makes an ioctl whose argument is a range (UFFDIO_UNREGISTER,
// UFFDIO_WAKE).
func (f *FD) rangeCall(op string, req uintptr, addr, length uint64) error {
	fd, ok := f.acquire()
	if !ok {
		return rangeError(op, addr, length, ErrClosed)
	}
	defer f.release()
	r := uffdioRange{Start: addr, Len: length}
	if errno := ioctlRange(fd, req, &r); errno != 0 {
		return rangeError(op, addr, length, errno)
	}
	return nil
}

// WriteProtect write-protects [addr, addr+length), which must lie in a
// registered range (else ENOENT). From its return on, the first write to
// each page of it blocks the writer and queues a Fault, until Unprotect.
// Pages never touched are protected only on shmem, or with
// FeatureWPUnpopulated on anonymous memory; otherwise their first write
// escapes protection.
func (f *FD) WriteProtect(addr, length uint64) error {
	return f.writeProtect("UFFDIO_WRITEPROTECT(WP)", addr, length, UFFDIO_WRITEPROTECT_MODE_WP)
}

// Unprotect removes write protection from [addr, addr+length). With wake,
// threads blocked on a fault in the range are woken and their writes
// proceed; without, they stay blocked until Wake (to batch the wake-ups of
// several Unprotects).
func (f *FD) Unprotect(addr, length uint64, wake bool) error {
	if wake {
		return f.writeProtect("UFFDIO_WRITEPROTECT(unprotect)", addr, length, 0)
	}
	return f.writeProtect("UFFDIO_WRITEPROTECT(unprotect, DONTWAKE)", addr, length, UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
}

func (f *FD) writeProtect(op string, addr, length, mode uint64) error {
	fd, ok := f.acquire()
	if !ok {
		return rangeError(op, addr, length, ErrClosed)
	}
	defer f.release()
	w := uffdioWriteProtect{Range: uffdioRange{Start: addr, Len: length}, Mode: mode}
	if errno := ioctlWriteProtect(fd, &w); errno != 0 {
		return rangeError(op, addr, length, errno)
	}
	return nil
}

// Wake wakes the threads blocked on a fault in [addr, addr+length). A woken
// thread whose page is still protected faults again.
func (f *FD) Wake(addr, length uint64) error {
	return f.rangeCall("UFFDIO_WAKE", UFFDIO_WAKE, addr, length)
}

// maxBatch is how many messages one ReadFaults reads at most.
const maxBatch = 64

// ReadFaults reads the queued faults into buf, at most min(len(buf), 64),
// without blocking: it returns 0 and no error when none is queued. A fault
// read is not resolved: its thread stays blocked until its page is
// unprotected (or woken).
func (f *FD) ReadFaults(buf []Fault) (int, error) {
	n := min(len(buf), maxBatch)
	if n == 0 {
		return 0, nil
	}
	var raw [maxBatch * sizeofMsg]byte
	fd, ok := f.acquire()
	if !ok {
		return 0, fmt.Errorf("uffd: read(2) of uffd_msg: %w", ErrClosed)
	}
	got, err := unix.Read(fd, raw[:n*sizeofMsg])
	f.release()
	if err == unix.EAGAIN || err == unix.EINTR {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("uffd: read(2) of uffd_msg: %w", err)
	}
	le := binary.LittleEndian
	for i := range got / sizeofMsg {
		m := raw[i*sizeofMsg : (i+1)*sizeofMsg]
		if m[msgOffEvent] != UFFD_EVENT_PAGEFAULT {
			// Only page faults are possible: no UFFD_FEATURE_EVENT_* is
			// enabled by Open unless asked for.
			return i, fmt.Errorf("uffd: read(2) of uffd_msg: event %#x is not a page fault", m[msgOffEvent])
		}
		buf[i] = Fault{
			Addr:  le.Uint64(m[msgOffAddr:]),
			Flags: le.Uint64(m[msgOffFlags:]),
			TID:   le.Uint32(m[msgOffPtid:]),
		}
	}
	return got / sizeofMsg, nil
}

// errStopped is wait's answer when the stop descriptor became readable.
var errStopped = errors.New("stopped")

// Wait blocks until a fault can be read, and returns ErrClosed (wrapped)
// when f is closed. It blocks its OS thread in poll(2), so it suits a
// goroutine that has called runtime.LockOSThread.
func (f *FD) Wait() error { return f.wait(-1) }

// wait is Wait, also returning errStopped when stop (an eventfd, or -1 for
// none) becomes readable.
func (f *FD) wait(stop int) error {
	fd, ok := f.acquire()
	if !ok {
		return fmt.Errorf("uffd: poll(2): %w", ErrClosed)
	}
	defer f.release()
	fds := [3]unix.PollFd{
		{Fd: int32(fd), Events: unix.POLLIN},
		{Fd: int32(f.closed), Events: unix.POLLIN},
		{Fd: int32(stop), Events: unix.POLLIN},
	}
	nfds := 2
	if stop >= 0 {
		nfds = 3
	}
	for {
		_, err := unix.Poll(fds[:nfds], -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("uffd: poll(2): %w", err)
		}
		switch {
		case fds[1].Revents != 0:
			return fmt.Errorf("uffd: poll(2): %w", ErrClosed)
		case nfds == 3 && fds[2].Revents != 0:
			return errStopped
		case fds[0].Revents&unix.POLLIN != 0:
			return nil
		case fds[0].Revents != 0:
			return fmt.Errorf("uffd: poll(2): userfaultfd revents %#x", fds[0].Revents)
		}
	}
}

// Close closes the userfaultfd. Calls in Wait (and Handlers) return; the
// kernel unregisters every range, dropping its write protection, and wakes
// every blocked faulting thread, whose write then goes through uncopied:
// close only when the pages' old content is no longer needed. Close waits
// for the calls in progress to return; later calls fail with ErrClosed.
func (f *FD) Close() error {
	f.closeOnce.Do(func() {
		// Make the eventfd readable before taking the lock, so the
		// callers in poll(2), who hold it shared, return.
		if err := signal(f.closed); err != nil {
			f.closeErr = fmt.Errorf("uffd: Close: waking waiters: %w", err)
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		if err := unix.Close(f.fd); err != nil && f.closeErr == nil {
			f.closeErr = fmt.Errorf("uffd: Close: %w", err)
		}
		unix.Close(f.closed)
		f.fd, f.closed = -1, -1
	})
	return f.closeErr
}

// signal makes eventfd efd readable.
func signal(efd int) error {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, err := unix.Write(efd, one[:])
	return err
}
