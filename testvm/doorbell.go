package testvm

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

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
	m.guardWrite(kick, 4)
	store32(m.mem, kick, 1)
	m.recordWrite(kick, 4)
	if load32(m.mem, prod) != cons {
		store32(m.mem, kick, 0)
		return true
	}
	return false
}

// device is what the network and block devices share: the loop that serves
// a ring the guest produces into, with its lock, doorbell and goroutines.
//
// Every batch runs under mu, and Machine.Pause takes mu after the vCPUs are
// parked and holds it until Resume, so a checkpoint never splits a batch from
// its ring update.
type device struct {
	m    *Machine
	name string    // for errors: "network device", "block device"
	bell *doorbell // the kick port
	ring ringRegs

	mu      sync.Mutex // held per batch; held by Pause for the whole pause
	stopped bool       // guarded by mu
	cons    uint32     // guarded by mu: the device's copy of the ring's consumer index
	kicks   atomic.Uint64
	wg      sync.WaitGroup
}

// ringRegs locates the ring the guest produces into: the offsets in guest
// memory of its producer index, consumer index and kick flag, and its size.
type ringRegs struct {
	prod, cons, kick uint64
	slots            uint32
}

// init registers the device's doorbell at port with KVM.
func (d *device) init(m *Machine, port uint64, name string, ring ringRegs) error {
	bell, err := newDoorbell(m.vm, port, name)
	if err != nil {
		return err
	}
	d.m, d.name, d.bell, d.ring = m, name, bell, ring
	return nil
}

// goRun runs f on a goroutine that stop waits for.
func (d *device) goRun(f func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
}

// serve is a device's ring loop. With mu held it takes everything the guest
// published (see take); then, with poll > 0, it watches the ring for up to
// poll without the lock (see pollRing); then it announces that it sleeps
// (the kick flag, see announceSleep) and waits for the doorbell. It returns
// when stop is called.
func (d *device) serve(poll time.Duration, batch func(from, to uint32), overrun func()) {
	for {
		d.mu.Lock()
		if d.stopped {
			d.mu.Unlock()
			return
		}
		d.take(batch, overrun)
		if poll > 0 {
			cons := d.cons
			d.mu.Unlock()
			if d.pollRing(cons, poll) {
				continue
			}
			d.mu.Lock()
			if d.stopped {
				d.mu.Unlock()
				return
			}
		}
		busy := d.m.announceSleep(d.ring.kick, d.ring.prod, d.cons)
		d.mu.Unlock()
		if busy {
			continue
		}
		if err := d.bell.wait(); err != nil {
			d.m.fail(fmt.Errorf("%s: read doorbell: %w", d.name, err))
			return
		}
		d.kicks.Add(1)
	}
}

// take calls batch for the entries the guest published past cons, then
// publishes the consumer index past them. A guest that claims more entries
// than the ring holds (a guest bug) makes it call overrun and take what the
// ring can hold, once. With mu held.
func (d *device) take(batch func(from, to uint32), overrun func()) {
	mem := d.m.mem
	prod := load32(mem, d.ring.prod)
	if prod == d.cons {
		return
	}
	if prod-d.cons > d.ring.slots {
		overrun()
		d.cons = prod - d.ring.slots
	}
	batch(d.cons, prod)
	d.cons = prod
	d.m.guardWrite(d.ring.cons, 4)
	store32(mem, d.ring.cons, prod)
	d.m.recordWrite(d.ring.cons, 4)
}

// pollRing watches the producer index for up to poll without the lock
// (Pause can take it meanwhile) and reports whether the guest published past
// cons. A guest that issues batch after batch so never needs a doorbell, and
// the device never pays the wake-up of a sleeping thread (hundreds of
// microseconds here, against about 3 µs for the exit-free doorbell itself).
func (d *device) pollRing(cons uint32, poll time.Duration) bool {
	deadline := time.Now().Add(poll)
	for load32(d.m.mem, d.ring.prod) == cons {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// stop ends the device's goroutines, if Start started them, and closes the
// doorbell. wake, if not nil, unblocks goroutines that wait elsewhere than on
// the doorbell (it runs once they will see stopped).
func (d *device) stop(started bool, wake func()) {
	if started {
		d.mu.Lock()
		d.stopped = true
		d.mu.Unlock()
		d.bell.ring()
		if wake != nil {
			wake()
		}
		d.wg.Wait()
	}
	d.bell.close()
}
