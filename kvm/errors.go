package kvm

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrNotSupported is returned (wrapped) by every call that needs a KVM
// capability or ioctl this kernel does not offer, so callers can fall back:
// errors.Is(err, kvm.ErrNotSupported).
var ErrNotSupported = errors.New("not supported by this kernel's KVM")

// ioctlError wraps an errno from a named ioctl. It is built only on the error
// path, so successful calls do not allocate.
func ioctlError(name string, errno unix.Errno) error {
	if errno == unix.ENOTTY || errno == unix.ENOSYS {
		return fmt.Errorf("%s: %w (%w)", name, ErrNotSupported, errno)
	}
	return fmt.Errorf("%s: %w", name, errno)
}

// notSupported returns an error for a capability KVM did not report.
func notSupported(what string, capability int) error {
	return fmt.Errorf("%s: %w (KVM_CHECK_EXTENSION %d returned 0)", what, ErrNotSupported, capability)
}
