package uffd

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file holds the package's only uses of unsafe.

// The ioctl wrappers pass a pointer to one of the uffdio_* mirrors in abi.go,
// whose layout TestABI pins. Each uintptr conversion sits in the Syscall call
// expression, so the struct stays alive and in place for the call
// (unsafe.Pointer rule 4). Syscall, not RawSyscall: UFFDIO_WRITEPROTECT over
// a large range takes milliseconds.

func ioctlAPI(fd int, a *uffdioAPI) unix.Errno {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), UFFDIO_API, uintptr(unsafe.Pointer(a)))
	return errno
}

func ioctlRegister(fd int, r *uffdioRegister) unix.Errno {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), UFFDIO_REGISTER, uintptr(unsafe.Pointer(r)))
	return errno
}

// ioctlRange is UFFDIO_UNREGISTER or UFFDIO_WAKE.
func ioctlRange(fd int, req uintptr, r *uffdioRange) unix.Errno {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(r)))
	return errno
}

func ioctlWriteProtect(fd int, w *uffdioWriteProtect) unix.Errno {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), UFFDIO_WRITEPROTECT, uintptr(unsafe.Pointer(w)))
	return errno
}

// Addr returns the address of b's first byte, as Register, WriteProtect and
// Fault.Addr spell addresses. b must be memory outside the Go heap (a
// mapping from mmap(2)): the Go heap must never be registered, since a
// write-protect fault inside the runtime could deadlock it.
func Addr(b []byte) uint64 {
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}
