package kvm

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestOpenErrorsSayWhatToDo(t *testing.T) {
	tests := []struct {
		errno unix.Errno
		want  string
	}{
		{unix.EACCES, "run as root or add the user to group kvm"},
		{unix.ENOENT, "KVM is not available here"},
		{unix.EIO, "open /dev/kvm: input/output error"},
	}
	for _, tt := range tests {
		err := openError(tt.errno)
		if !strings.Contains(err.Error(), tt.want) || !errors.Is(err, tt.errno) {
			t.Errorf("openError(%v) = %q, want it to wrap the errno and say %q", tt.errno, err, tt.want)
		}
	}
}

func TestUnsupportedIoctlIsErrNotSupported(t *testing.T) {
	for _, errno := range []unix.Errno{unix.ENOTTY, unix.ENOSYS} {
		if err := ioctlError("KVM_X", errno); !errors.Is(err, ErrNotSupported) || !errors.Is(err, errno) {
			t.Errorf("ioctlError(%v) = %v, want ErrNotSupported wrapping the errno", errno, err)
		}
	}
	if err := ioctlError("KVM_X", unix.EINVAL); errors.Is(err, ErrNotSupported) {
		t.Errorf("EINVAL became ErrNotSupported: %v", err)
	}
}
