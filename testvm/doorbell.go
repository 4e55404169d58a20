package testvm

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/repagent/repagent/kvm"
)

// doorbell is a device's kick port: an eventfd that KVM signals when the
// guest writes the port (KVM_IOEVENTFD, handled in the kernel: no exit to
// userspace), and that the device's goroutine waits on.
//
// The devices use it with kick suppression: before a device sleeps it sets
// a kick flag in guest memory (announceSleep), and the guest writes the port
// only when it sees the flag, so a busy device is never kicked.
type doorbell struct{ fd int }

// newDoorbell registers an eventfd for 4-byte writes to port.
func newDoorbell(vm *kvm.VM, port uint64, device string) (*doorbell, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("%s: eventfd: %w", device, err)
	}
	e := kvm.IOEventFD{Addr: port, Len: 4, FD: int32(fd), Flags: kvm.KVM_IOEVENTFD_FLAG_PIO}
	if err := vm.IOEventFD(e); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: register doorbell port %#x: %w", device, port, err)
	}
	return &doorbell{fd: fd}, nil
}

// wait blocks until the guest (or ring) rang since the last wait.
func (b *doorbell) wait() error {
	var buf [8]byte
	for {
		_, err := unix.Read(b.fd, buf[:])
		if err != unix.EINTR {
			return err
		}
	}
}

// ring wakes a goroutine in wait, from the VMM's side.
func (b *doorbell) ring() {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	unix.Write(b.fd, one[:])
}

// close closes the eventfd (KVM drops its registration with it).
func (b *doorbell) close() {
	if b.fd >= 0 {
		unix.Close(b.fd)
		b.fd = -1
	}
}

// announceSleep sets the kick flag at offset kick and looks once more at the
// producer index at offset prod: if the guest published past cons
// meanwhile, it clears the flag and reports busy, and the device goes on
// instead of sleeping. The flag's store is an XCHG, which orders it before
// the load: the mirror of the guest's fence between publishing and reading
// the flag, so a request is never left behind with the device asleep. With
// the device's lock held.
func (m *Machine) announceSleep(kick, prod uint64, cons uint32) (busy bool) {
	store32(m.mem, kick, 1)
	m.recordWrite(kick, 4)
	if load32(m.mem, prod) != cons {
		store32(m.mem, kick, 0)
		return true
	}
	return false
}
