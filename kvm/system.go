package kvm

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DevicePath is the KVM device node.
const DevicePath = "/dev/kvm"

// System is an open /dev/kvm: the handle for system-wide queries and for
// creating VMs. It is safe for concurrent use.
type System struct {
	f        *os.File
	fd       int
	mmapSize int
}

// Open opens /dev/kvm and checks that KVM speaks API version 12. Errors a user
// can meet say what to do about them.
func Open() (*System, error) {
	fd, err := unix.Open(DevicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, openError(err)
	}
	s := &System{f: os.NewFile(uintptr(fd), DevicePath), fd: fd}
	v, errno := ioctlVal(fd, KVM_GET_API_VERSION, 0)
	if errno != 0 {
		s.Close()
		return nil, ioctlError("KVM_GET_API_VERSION", errno)
	}
	if v != APIVersion {
		s.Close()
		return nil, fmt.Errorf("open %s: KVM API version %d, want %d", DevicePath, v, APIVersion)
	}
	n, errno := ioctlVal(fd, KVM_GET_VCPU_MMAP_SIZE, 0)
	if errno != 0 {
		s.Close()
		return nil, ioctlError("KVM_GET_VCPU_MMAP_SIZE", errno)
	}
	s.mmapSize = int(n)
	return s, nil
}

func openError(err error) error {
	switch {
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return fmt.Errorf("open %s: %w (run as root or add the user to group kvm)", DevicePath, err)
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENODEV), errors.Is(err, unix.ENXIO):
		return fmt.Errorf("open %s: %w (KVM is not available here: enable virtualization and load the kvm module)", DevicePath, err)
	}
	return fmt.Errorf("open %s: %w", DevicePath, err)
}

// Close closes /dev/kvm. VMs created from it stay valid.
func (s *System) Close() error { return s.f.Close() }

// CheckExtension returns KVM_CHECK_EXTENSION's answer for a capability: 0 when
// it is absent, otherwise a capability-specific positive value.
func (s *System) CheckExtension(capability int) int {
	r, errno := ioctlVal(s.fd, KVM_CHECK_EXTENSION, uintptr(capability))
	runtime.KeepAlive(s.f)
	if errno != 0 {
		return 0
	}
	return int(r)
}

// VCPUMmapSize is the size of the kvm_run mapping of each vCPU fd.
func (s *System) VCPUMmapSize() int { return s.mmapSize }

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can
// present to a guest.
func (s *System) SupportedCPUID() ([]CPUIDEntry2, error) {
	for n := 128; n <= 4096; n *= 2 {
		entries, errno := getCPUID(s.fd, KVM_GET_SUPPORTED_CPUID, n)
		runtime.KeepAlive(s.f)
		if errno == unix.E2BIG {
			continue
		}
		if errno != 0 {
			return nil, ioctlError("KVM_GET_SUPPORTED_CPUID", errno)
		}
		return entries, nil
	}
	return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: more than 4096 entries")
}

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores
// for a guest.
func (s *System) MSRIndexList() ([]uint32, error) {
	for n := 256; n <= 16384; n *= 2 {
		buf := make([]uint32, 1+n)
		buf[0] = uint32(n)
		_, errno := ioctlPtr(s.fd, KVM_GET_MSR_INDEX_LIST, unsafe.Pointer(&buf[0]))
		runtime.KeepAlive(s.f)
		if errno == unix.E2BIG {
			continue
		}
		if errno != 0 {
			return nil, ioctlError("KVM_GET_MSR_INDEX_LIST", errno)
		}
		return buf[1 : 1+buf[0]], nil
	}
	return nil, fmt.Errorf("KVM_GET_MSR_INDEX_LIST: more than 16384 MSRs")
}

// CreateVM creates a VM (machine type 0).
func (s *System) CreateVM() (*VM, error) {
	r, errno := ioctlVal(s.fd, KVM_CREATE_VM, 0)
	runtime.KeepAlive(s.f)
	if errno != 0 {
		return nil, ioctlError("KVM_CREATE_VM", errno)
	}
	fd := int(r)
	unix.CloseOnExec(fd)
	return &VM{f: os.NewFile(uintptr(fd), "kvm-vm"), fd: fd, sys: s}, nil
}

// getCPUID runs a KVM_GET_*CPUID* ioctl with room for n entries.
func getCPUID(fd int, req uintptr, n int) ([]CPUIDEntry2, unix.Errno) {
	buf := make([]byte, int(unsafe.Sizeof(cpuid2Header{}))+n*int(unsafe.Sizeof(CPUIDEntry2{})))
	hdr := (*cpuid2Header)(unsafe.Pointer(&buf[0]))
	hdr.Nent = uint32(n)
	_, errno := ioctlPtr(fd, req, unsafe.Pointer(&buf[0]))
	if errno != 0 {
		return nil, errno
	}
	src := unsafe.Slice((*CPUIDEntry2)(unsafe.Pointer(&buf[unsafe.Sizeof(cpuid2Header{})])), hdr.Nent)
	out := make([]CPUIDEntry2, len(src))
	copy(out, src)
	return out, 0
}
