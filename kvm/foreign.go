package kvm

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VMs and vCPUs another VMM made. A VMM that creates its VM itself (its own
// KVM_CREATE_VM, as any VMM written without this package does) can still use
// this module's packages on it, the dirty tracker above all: VMFromFD and
// VCPUFromFD wrap its fds. Each wrapper holds a duplicate of the fd, so
// closing the wrapper leaves the VMM's fd open, and the VMM may close its
// own whenever it likes: the kernel keeps the VM while any fd refers to it.

// VMFromFD returns a VM for fd, a KVM VM fd, with sys (Open) for the
// system-wide queries. It checks that fd is a KVM VM fd.
func VMFromFD(sys *System, fd int) (*VM, error) {
	d, err := dupFD(fd)
	if err != nil {
		return nil, err
	}
	// KVM_CHECK_EXTENSION answers on VM fds (and on /dev/kvm's, whose VM
	// ioctls then fail, each with its name); a vCPU fd or any other file
	// refuses it.
	if _, errno := ioctlVal(d, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY); errno != 0 {
		unix.Close(d)
		return nil, fmt.Errorf("fd %d is not a KVM VM: %w", fd, ioctlError("KVM_CHECK_EXTENSION", errno))
	}
	return &VM{f: os.NewFile(uintptr(d), "kvm-vm"), fd: d, sys: sys}, nil
}

// VCPUFromFD returns a VCPU for fd, vCPU id of vm, made by another VMM. It
// maps the vCPU's kvm_run a second time (the VMM keeps its own mapping); a
// file that cannot be mapped so is not a vCPU fd. The VMM's rule for vCPU
// ioctls holds for the wrapper too: one thread at a time, the one that runs
// the vCPU or any while it is out of KVM_RUN.
func (vm *VM) VCPUFromFD(fd, id int) (*VCPU, error) {
	d, err := dupFD(fd)
	if err != nil {
		return nil, err
	}
	mem, err := unix.Mmap(d, 0, vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(d)
		return nil, fmt.Errorf("fd %d is not a KVM vCPU (mmap kvm_run: %w)", fd, err)
	}
	c := &VCPU{f: os.NewFile(uintptr(d), fmt.Sprintf("kvm-vcpu:%d", id)), fd: d, id: id, vm: vm, runMem: mem}
	c.run = (*runHeader)(unsafe.Pointer(&mem[0]))
	return c, nil
}

// dupFD duplicates fd, close-on-exec.
func dupFD(fd int) (int, error) {
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("dup fd %d: %w", fd, err)
	}
	return d, nil
}
