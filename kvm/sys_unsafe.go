package kvm

import (
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlPtr issues an ioctl whose argument is a pointer. It returns the raw
// errno (0 on success) so the caller wraps it only on failure.
//
// A signal can interrupt KVM ioctls that wait (creating a VM, taking KVM's
// locks), and the Go runtime signals threads on its own (SIGURG for
// preemption), so EINTR is retried. Only KVM_RUN, where EINTR is how a kick
// arrives, goes through ioctlRun instead.
func ioctlPtr(fd int, req uintptr, arg unsafe.Pointer) (uintptr, unix.Errno) {
	for {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if e != unix.EINTR {
			return r, e
		}
	}
}

// ioctlVal issues an ioctl whose argument is a plain integer, retrying EINTR.
func ioctlVal(fd int, req, arg uintptr) (uintptr, unix.Errno) {
	for {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
		if e != unix.EINTR {
			return r, e
		}
	}
}

// ioctlValNoSignals issues an ioctl once, with every asynchronous signal
// blocked on the calling thread (locked to it for the call), so that no
// signal can interrupt it: for KVM_RESET_DIRTY_RINGS, which since Linux 6.17
// stops early when a signal is pending and then leaves pages unprotected (see
// VM.ResetDirtyRings). A signal sent meanwhile stays pending and is delivered
// once the mask is restored. EINTR is returned, not retried: it can only mean
// a signal that cannot be blocked (SIGKILL).
func ioctlValNoSignals(fd int, req, arg uintptr) (uintptr, unix.Errno) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old unix.Sigset_t
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &asyncSignals, &old); err != nil {
		return 0, err.(unix.Errno)
	}
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if err := unix.PthreadSigmask(unix.SIG_SETMASK, &old, nil); err != nil && e == 0 {
		e = err.(unix.Errno)
	}
	return r, e
}

// asyncSignals is every signal but the synchronous ones (a fault in the
// thread's own code), which must never be blocked.
var asyncSignals = func() unix.Sigset_t {
	var s unix.Sigset_t
	for sig := 1; sig <= 64; sig++ {
		switch unix.Signal(sig) {
		case unix.SIGSEGV, unix.SIGBUS, unix.SIGFPE, unix.SIGILL, unix.SIGTRAP, unix.SIGSYS:
			continue
		}
		s.Val[(sig-1)/64] |= 1 << ((sig - 1) % 64)
	}
	return s
}()

// ioctlRun issues KVM_RUN once: EINTR is returned, not retried.
func ioctlRun(fd int) unix.Errno {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), KVM_RUN, 0)
	return e
}

// bytesOf views a fixed-size kernel struct mirror as bytes, for encoding.
func bytesOf[T any](p *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(p)), unsafe.Sizeof(*p))
}

// sliceBytes views a slice of fixed-size struct mirrors as bytes.
func sliceBytes[T any](s []T) []byte {
	if len(s) == 0 {
		return nil
	}
	var z T
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), len(s)*int(unsafe.Sizeof(z)))
}
