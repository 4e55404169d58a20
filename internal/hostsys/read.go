package hostsys

import (
	"os"

	"golang.org/x/sys/unix"
)

// Read is one read(2) of fd into b, retried on EINTR: for a
// syscall.RawConn's Read callback, which must tell "no data yet" (again:
// the caller waits for readiness and calls again) from a result. n is 0
// and err nil at end of file.
func Read(fd uintptr, b []byte) (n int, again bool, err error) {
	for {
		n, err = unix.Read(int(fd), b)
		switch err {
		case nil:
			return n, false, nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return 0, true, nil
		}
		return 0, false, os.NewSyscallError("read", err)
	}
}
