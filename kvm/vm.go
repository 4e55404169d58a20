package kvm

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VM is a KVM virtual machine fd. Methods may be called from any goroutine;
// the kernel serialises what needs it.
type VM struct {
	f   *os.File
	fd  int
	sys *System
}

// Close closes the VM fd. The kernel destroys the VM once its vCPU fds are
// closed too.
func (vm *VM) Close() error { return vm.f.Close() }

// FD returns the raw VM fd, for callers that issue ioctls this package lacks.
func (vm *VM) FD() int { return vm.fd }

// System returns the /dev/kvm handle the VM was created from.
func (vm *VM) System() *System { return vm.sys }

func (vm *VM) ptr(name string, req uintptr, arg unsafe.Pointer) error {
	_, errno := ioctlPtr(vm.fd, req, arg)
	runtime.KeepAlive(vm.f)
	if errno != 0 {
		return ioctlError(name, errno)
	}
	return nil
}

func (vm *VM) val(name string, req, arg uintptr) (uintptr, error) {
	r, errno := ioctlVal(vm.fd, req, arg)
	runtime.KeepAlive(vm.f)
	if errno != 0 {
		return 0, ioctlError(name, errno)
	}
	return r, nil
}

// CheckExtension asks the VM (not the system) for a capability; some answers,
// such as KVM_CAP_XSAVE2's size, are per VM.
func (vm *VM) CheckExtension(capability int) int {
	r, errno := ioctlVal(vm.fd, KVM_CHECK_EXTENSION, uintptr(capability))
	runtime.KeepAlive(vm.f)
	if errno != 0 {
		return 0
	}
	return int(r)
}

// EnableCap runs KVM_ENABLE_CAP on the VM. A capability KVM does not report
// returns ErrNotSupported.
func (vm *VM) EnableCap(capability uint32, args ...uint64) error {
	if len(args) > 4 {
		return fmt.Errorf("KVM_ENABLE_CAP %d: %d args, at most 4", capability, len(args))
	}
	if vm.CheckExtension(int(capability)) == 0 {
		return notSupported(fmt.Sprintf("KVM_ENABLE_CAP %d", capability), int(capability))
	}
	c := enableCap{Cap: capability}
	copy(c.Args[:], args)
	return vm.ptr(fmt.Sprintf("KVM_ENABLE_CAP %d", capability), KVM_ENABLE_CAP, unsafe.Pointer(&c))
}

// SetUserMemoryRegion adds, changes or (MemorySize 0) removes a memory slot.
func (vm *VM) SetUserMemoryRegion(r UserspaceMemoryRegion) error {
	return vm.ptr("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, unsafe.Pointer(&r))
}

// SetTSSAddr places the three pages KVM needs for real-mode emulation (Intel)
// at a guest-physical address no memory slot covers.
func (vm *VM) SetTSSAddr(addr uint32) error {
	_, err := vm.val("KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, uintptr(addr))
	return err
}

// SetIdentityMapAddr places the one-page EPT identity map (Intel) at a
// guest-physical address no memory slot covers.
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	return vm.ptr("KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR, unsafe.Pointer(&addr))
}

// CreateIRQChip creates the in-kernel PICs, IOAPIC and local APICs. Call it
// before creating vCPUs.
func (vm *VM) CreateIRQChip() error {
	_, err := vm.val("KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP, 0)
	return err
}

// CreatePIT2 creates the in-kernel i8254 PIT (after CreateIRQChip).
func (vm *VM) CreatePIT2(flags uint32) error {
	c := pitConfig{Flags: flags}
	return vm.ptr("KVM_CREATE_PIT2", KVM_CREATE_PIT2, unsafe.Pointer(&c))
}

// GetIRQChip reads one in-kernel interrupt controller (KVM_IRQCHIP_*).
func (vm *VM) GetIRQChip(chip uint32, out *IRQChip) error {
	out.ChipID = chip
	return vm.ptr("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP, unsafe.Pointer(out))
}

// SetIRQChip writes one in-kernel interrupt controller.
func (vm *VM) SetIRQChip(c *IRQChip) error {
	return vm.ptr("KVM_SET_IRQCHIP", KVM_SET_IRQCHIP, unsafe.Pointer(c))
}

// GetClock reads the VM's kvmclock.
func (vm *VM) GetClock(out *ClockData) error {
	return vm.ptr("KVM_GET_CLOCK", KVM_GET_CLOCK, unsafe.Pointer(out))
}

// SetClock sets the VM's kvmclock. Only Clock (and Flags) are used: KVM
// rejects the realtime and host_tsc flags on set unless asked for them.
func (vm *VM) SetClock(c *ClockData) error {
	in := ClockData{Clock: c.Clock}
	return vm.ptr("KVM_SET_CLOCK", KVM_SET_CLOCK, unsafe.Pointer(&in))
}

// GetPIT2 reads the in-kernel PIT.
func (vm *VM) GetPIT2(out *PITState2) error {
	return vm.ptr("KVM_GET_PIT2", KVM_GET_PIT2, unsafe.Pointer(out))
}

// SetPIT2 writes the in-kernel PIT.
func (vm *VM) SetPIT2(p *PITState2) error {
	return vm.ptr("KVM_SET_PIT2", KVM_SET_PIT2, unsafe.Pointer(p))
}

// IOEventFD registers (or, with KVM_IOEVENTFD_FLAG_DEASSIGN, removes) an
// eventfd that KVM signals in the kernel on a guest write to an address.
func (vm *VM) IOEventFD(e IOEventFD) error {
	return vm.ptr("KVM_IOEVENTFD", KVM_IOEVENTFD, unsafe.Pointer(&e))
}

// IRQFD binds an eventfd to a GSI: signalling it injects the interrupt.
func (vm *VM) IRQFD(e IRQFD) error {
	return vm.ptr("KVM_IRQFD", KVM_IRQFD, unsafe.Pointer(&e))
}

// GetDirtyLog runs KVM_GET_DIRTY_LOG for a slot into bitmap, one bit per page
// of the slot, rounded up to 64 bits. It is on the harvest hot path: it does not
// allocate on success. With a dirty ring enabled KVM fails it with ENXIO, which
// comes back wrapped and unswallowed.
func (vm *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	if len(bitmap) == 0 {
		return fmt.Errorf("KVM_GET_DIRTY_LOG slot %d: empty bitmap", slot)
	}
	// The bitmap's address travels inside the struct as an integer. That is
	// sound because Go's heap does not move objects, and KeepAlive below keeps
	// the bitmap alive until the ioctl returned.
	d := dirtyLog{Slot: slot, DirtyBitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	_, errno := ioctlPtr(vm.fd, KVM_GET_DIRTY_LOG, unsafe.Pointer(&d))
	runtime.KeepAlive(vm.f)
	runtime.KeepAlive(bitmap)
	if errno != 0 {
		return dirtyLogError("KVM_GET_DIRTY_LOG", slot, errno)
	}
	return nil
}

// ClearDirtyLog runs KVM_CLEAR_DIRTY_LOG: it re-protects the pages of slot
// [first, first+num) whose bits are set in bitmap (bit 0 = page first). first
// must be a multiple of 64, and num too unless the range ends the slot.
func (vm *VM) ClearDirtyLog(slot uint32, first uint64, num uint32, bitmap []uint64) error {
	if len(bitmap) == 0 || uint64(len(bitmap))*64 < uint64(num) {
		return fmt.Errorf("KVM_CLEAR_DIRTY_LOG slot %d: bitmap of %d words for %d pages", slot, len(bitmap), num)
	}
	c := clearDirtyLog{Slot: slot, NumPages: num, FirstPage: first,
		DirtyBitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	_, errno := ioctlPtr(vm.fd, KVM_CLEAR_DIRTY_LOG, unsafe.Pointer(&c))
	runtime.KeepAlive(vm.f)
	runtime.KeepAlive(bitmap)
	if errno != 0 {
		return dirtyLogError("KVM_CLEAR_DIRTY_LOG", slot, errno)
	}
	return nil
}

func dirtyLogError(name string, slot uint32, errno unix.Errno) error {
	if errno == unix.ENXIO {
		return fmt.Errorf("%s slot %d: %w (dirty logging is off for the slot, or a dirty ring is enabled: with a ring on, harvest the rings instead)", name, slot, errno)
	}
	return fmt.Errorf("%s slot %d: %w", name, slot, errno)
}

// ResetDirtyRings runs KVM_RESET_DIRTY_RINGS: the kernel re-protects the
// pages of every ring entry userspace marked reset and reclaims the entries. It
// returns how many entries were reset.
//
// The ioctl runs with the thread's asynchronous signals blocked. Since Linux
// 6.17 (commit 49005a2a3d2a, "KVM: Bail from the dirty ring reset flow if a
// signal is pending") the kernel stops the reset when the thread has a
// signal pending, and the entries it had already taken off the ring but not
// yet re-protected (a batch of up to 64 pages) are dropped: their pages stay
// writable, so the guest's next writes to them are never logged. The ioctl
// still returns a count (of the entries taken, dropped ones included) rather
// than an error, so the caller cannot see it happen, and a retry cannot repair
// it. Go's runtime signals threads on its own (SIGURG, to preempt), so an
// unprotected reset loses pages now and then. A count below the entries the
// caller marked, or EINTR (only from a signal that cannot be blocked), means
// the reset stopped early.
func (vm *VM) ResetDirtyRings() (int, error) {
	r, errno := ioctlValNoSignals(vm.fd, KVM_RESET_DIRTY_RINGS, 0)
	runtime.KeepAlive(vm.f)
	if errno != 0 {
		return 0, ioctlError("KVM_RESET_DIRTY_RINGS", errno)
	}
	return int(r), nil
}

// CreateVCPU creates vCPU id and maps its kvm_run structure.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	r, err := vm.val(fmt.Sprintf("KVM_CREATE_VCPU %d", id), KVM_CREATE_VCPU, uintptr(id))
	if err != nil {
		return nil, err
	}
	fd := int(r)
	unix.CloseOnExec(fd)
	c := &VCPU{f: os.NewFile(uintptr(fd), fmt.Sprintf("kvm-vcpu:%d", id)), fd: fd, id: id, vm: vm}
	mem, err := unix.Mmap(fd, 0, vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		c.f.Close()
		return nil, fmt.Errorf("mmap kvm_run of vCPU %d: %w", id, err)
	}
	c.runMem = mem
	c.run = (*runHeader)(unsafe.Pointer(&mem[0]))
	return c, nil
}
