package kvm

import (
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
