package kvm

import (
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VCPU is a KVM vCPU fd with its kvm_run mapping. KVM requires that all vCPU
// ioctls except the kick (SetImmediateExit) come from one thread at a time; the
// VMM runs each vCPU on its own locked OS thread and issues every other ioctl
// only while that thread is out of Run.
type VCPU struct {
	f      *os.File
	fd     int
	id     int
	vm     *VM
	runMem []byte
	run    *runHeader
	ring   []byte
	xsave  int    // XSAVE area size, fixed per VM
	msrBuf []byte // scratch for KVM_GET/SET_MSRS, so a checkpoint does not allocate
}

// ID returns the vCPU index given to CreateVCPU.
func (c *VCPU) ID() int { return c.id }

// FD returns the raw vCPU fd.
func (c *VCPU) FD() int { return c.fd }

// Close unmaps kvm_run and the dirty ring and closes the fd.
func (c *VCPU) Close() error {
	if c.ring != nil {
		unix.Munmap(c.ring)
		c.ring = nil
	}
	if c.runMem != nil {
		unix.Munmap(c.runMem)
		c.runMem, c.run = nil, nil
	}
	return c.f.Close()
}

func (c *VCPU) ptr(name string, req uintptr, arg unsafe.Pointer) error {
	_, errno := ioctlPtr(c.fd, req, arg)
	runtime.KeepAlive(c.f)
	if errno != 0 {
		return ioctlError(name, errno)
	}
	return nil
}

// Run enters the guest (KVM_RUN) until the next exit. It returns nil when the
// vCPU exited for a reason now in Exit(), and the raw unix.EINTR when a signal
// or immediate_exit kicked it out; any other errno is returned as is. Run does
// not allocate.
func (c *VCPU) Run() error {
	errno := ioctlRun(c.fd)
	runtime.KeepAlive(c.f)
	if errno != 0 {
		return errno
	}
	return nil
}

// SetImmediateExit sets kvm_run.immediate_exit. With it set, KVM_RUN returns
// EINTR at once instead of entering the guest; together with a signal to the
// vCPU thread this kicks a vCPU out of the guest without a race. Safe to call
// from any thread.
func (c *VCPU) SetImmediateExit(on bool) {
	// The first word of kvm_run holds request_interrupt_window (byte 0, never
	// used by this package, so 0) and immediate_exit (byte 1); an atomic
	// 32-bit store publishes the flag before the kick signal is sent.
	var v uint32
	if on {
		v = 1 << 8
	}
	(*atomic.Uint32)(unsafe.Pointer(c.run)).Store(v)
}

// ImmediateExit reports kvm_run.immediate_exit.
func (c *VCPU) ImmediateExit() bool {
	return (*atomic.Uint32)(unsafe.Pointer(c.run)).Load()>>8&0xff != 0
}

// GetRegs reads the general-purpose registers.
func (c *VCPU) GetRegs(out *Regs) error {
	return c.ptr("KVM_GET_REGS", KVM_GET_REGS, unsafe.Pointer(out))
}

// SetRegs writes the general-purpose registers.
func (c *VCPU) SetRegs(r *Regs) error {
	return c.ptr("KVM_SET_REGS", KVM_SET_REGS, unsafe.Pointer(r))
}

// GetSregs reads the segment and control registers.
func (c *VCPU) GetSregs(out *Sregs) error {
	return c.ptr("KVM_GET_SREGS", KVM_GET_SREGS, unsafe.Pointer(out))
}

// SetSregs writes the segment and control registers.
func (c *VCPU) SetSregs(s *Sregs) error {
	return c.ptr("KVM_SET_SREGS", KVM_SET_SREGS, unsafe.Pointer(s))
}

// GetFPU reads the legacy FPU/SSE state.
func (c *VCPU) GetFPU(out *FPU) error {
	return c.ptr("KVM_GET_FPU", KVM_GET_FPU, unsafe.Pointer(out))
}

// SetFPU writes the legacy FPU/SSE state.
func (c *VCPU) SetFPU(f *FPU) error {
	return c.ptr("KVM_SET_FPU", KVM_SET_FPU, unsafe.Pointer(f))
}

// XSaveSize is the size of this VM's XSAVE area: KVM_CAP_XSAVE2's answer
// where it is larger than the 4 KiB of struct kvm_xsave, else 4096.
func (c *VCPU) XSaveSize() int {
	if c.xsave == 0 {
		c.xsave = sizeofXSave
		if n := c.vm.CheckExtension(KVM_CAP_XSAVE2); n > sizeofXSave {
			c.xsave = n
		}
	}
	return c.xsave
}

// GetXSave reads the XSAVE area into buf, which must be XSaveSize bytes
// (KVM_GET_XSAVE2 is used when that is more than 4 KiB).
func (c *VCPU) GetXSave(buf []byte) error {
	if len(buf) < sizeofXSave {
		return fmt.Errorf("KVM_GET_XSAVE: buffer of %d bytes, need %d", len(buf), sizeofXSave)
	}
	if len(buf) > sizeofXSave {
		return c.ptr("KVM_GET_XSAVE2", KVM_GET_XSAVE2, unsafe.Pointer(&buf[0]))
	}
	return c.ptr("KVM_GET_XSAVE", KVM_GET_XSAVE, unsafe.Pointer(&buf[0]))
}

// SetXSave writes an XSAVE area read by GetXSave (KVM_SET_XSAVE accepts the
// larger XSAVE2 layout too). KVM reads XSaveSize bytes whatever the buffer's
// length, so a shorter area (saved where XSAVE was smaller) is passed
// zero-padded, and a longer one than this host's is refused.
func (c *VCPU) SetXSave(buf []byte) error {
	n := c.XSaveSize()
	switch {
	case len(buf) < sizeofXSave:
		return fmt.Errorf("KVM_SET_XSAVE: buffer of %d bytes, need at least %d", len(buf), sizeofXSave)
	case len(buf) > n:
		return fmt.Errorf("KVM_SET_XSAVE: XSAVE area of %d bytes, this host's is %d (saved on a CPU with more state components)", len(buf), n)
	case len(buf) < n:
		padded := make([]byte, n)
		copy(padded, buf)
		buf = padded
	}
	return c.ptr("KVM_SET_XSAVE", KVM_SET_XSAVE, unsafe.Pointer(&buf[0]))
}

// GetXCRs reads the extended control registers (XCR0).
func (c *VCPU) GetXCRs(out *XCRs) error {
	return c.ptr("KVM_GET_XCRS", KVM_GET_XCRS, unsafe.Pointer(out))
}

// SetXCRs writes the extended control registers.
func (c *VCPU) SetXCRs(x *XCRs) error {
	return c.ptr("KVM_SET_XCRS", KVM_SET_XCRS, unsafe.Pointer(x))
}

// GetMSRs reads the MSRs whose Index is set in entries, filling Data. It
// returns how many were read: KVM stops at the first MSR it cannot read.
func (c *VCPU) GetMSRs(entries []MSREntry) (int, error) {
	return c.msrs("KVM_GET_MSRS", KVM_GET_MSRS, entries)
}

// SetMSRs writes entries and returns how many KVM accepted; it stops at the
// first it refuses.
func (c *VCPU) SetMSRs(entries []MSREntry) (int, error) {
	return c.msrs("KVM_SET_MSRS", KVM_SET_MSRS, entries)
}

func (c *VCPU) msrs(name string, req uintptr, entries []MSREntry) (int, error) {
	if len(entries) == 0 {
		return 0, nil
	}
	// struct kvm_msrs is an 8-byte header followed by the entries.
	hs := int(unsafe.Sizeof(msrsHeader{}))
	n := hs + len(entries)*int(unsafe.Sizeof(MSREntry{}))
	if cap(c.msrBuf) < n {
		c.msrBuf = make([]byte, n)
	}
	buf := c.msrBuf[:n]
	(*msrsHeader)(unsafe.Pointer(&buf[0])).NMSRs = uint32(len(entries))
	copy(buf[hs:], sliceBytes(entries))
	r, errno := ioctlPtr(c.fd, req, unsafe.Pointer(&buf[0]))
	runtime.KeepAlive(c.f)
	if errno != 0 {
		return 0, ioctlError(name, errno)
	}
	copy(sliceBytes(entries), buf[hs:])
	return int(r), nil
}

// GetLAPIC reads the local APIC (needs the in-kernel irqchip).
func (c *VCPU) GetLAPIC(out *LAPICState) error {
	return c.ptr("KVM_GET_LAPIC", KVM_GET_LAPIC, unsafe.Pointer(out))
}

// SetLAPIC writes the local APIC.
func (c *VCPU) SetLAPIC(l *LAPICState) error {
	return c.ptr("KVM_SET_LAPIC", KVM_SET_LAPIC, unsafe.Pointer(l))
}

// GetVCPUEvents reads pending exceptions, interrupts, NMIs and SMIs.
func (c *VCPU) GetVCPUEvents(out *VCPUEvents) error {
	return c.ptr("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, unsafe.Pointer(out))
}

// SetVCPUEvents writes pending events.
func (c *VCPU) SetVCPUEvents(e *VCPUEvents) error {
	return c.ptr("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, unsafe.Pointer(e))
}

// GetDebugRegs reads DR0-3, DR6 and DR7.
func (c *VCPU) GetDebugRegs(out *DebugRegs) error {
	return c.ptr("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, unsafe.Pointer(out))
}

// SetDebugRegs writes the debug registers.
func (c *VCPU) SetDebugRegs(d *DebugRegs) error {
	return c.ptr("KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS, unsafe.Pointer(d))
}

// GetMPState reads the multiprocessing state (runnable, halted, ...).
func (c *VCPU) GetMPState(out *MPState) error {
	return c.ptr("KVM_GET_MP_STATE", KVM_GET_MP_STATE, unsafe.Pointer(out))
}

// SetMPState writes the multiprocessing state.
func (c *VCPU) SetMPState(m *MPState) error {
	return c.ptr("KVM_SET_MP_STATE", KVM_SET_MP_STATE, unsafe.Pointer(m))
}

// GetCPUID reads the CPUID leaves set on this vCPU.
func (c *VCPU) GetCPUID() ([]CPUIDEntry2, error) {
	for n := 128; n <= 4096; n *= 2 {
		e, errno := getCPUID(c.fd, KVM_GET_CPUID2, n)
		runtime.KeepAlive(c.f)
		if errno == unix.E2BIG {
			continue
		}
		if errno != 0 {
			return nil, ioctlError("KVM_GET_CPUID2", errno)
		}
		return e, nil
	}
	return nil, fmt.Errorf("KVM_GET_CPUID2: more than 4096 entries")
}

// SetCPUID sets the CPUID leaves the guest sees. KVM accepts it only before
// the vCPU first runs (or with identical leaves after).
func (c *VCPU) SetCPUID(entries []CPUIDEntry2) error {
	hs := int(unsafe.Sizeof(cpuid2Header{}))
	buf := make([]byte, hs+len(entries)*int(unsafe.Sizeof(CPUIDEntry2{})))
	(*cpuid2Header)(unsafe.Pointer(&buf[0])).Nent = uint32(len(entries))
	copy(buf[hs:], sliceBytes(entries))
	return c.ptr("KVM_SET_CPUID2", KVM_SET_CPUID2, unsafe.Pointer(&buf[0]))
}

// GetTSCKHz reads the vCPU's TSC frequency in kHz.
func (c *VCPU) GetTSCKHz() (uint32, error) {
	r, errno := ioctlVal(c.fd, KVM_GET_TSC_KHZ, 0)
	runtime.KeepAlive(c.f)
	if errno != 0 {
		return 0, ioctlError("KVM_GET_TSC_KHZ", errno)
	}
	return uint32(r), nil
}

// SetTSCKHz sets the vCPU's TSC frequency (needs KVM_CAP_TSC_CONTROL for any
// frequency other than the host's).
func (c *VCPU) SetTSCKHz(khz uint32) error {
	_, errno := ioctlVal(c.fd, KVM_SET_TSC_KHZ, uintptr(khz))
	runtime.KeepAlive(c.f)
	if errno != 0 {
		return ioctlError("KVM_SET_TSC_KHZ", errno)
	}
	return nil
}

// MapDirtyRing maps the vCPU's dirty ring of n entries (KVM_DIRTY_LOG_PAGE_OFFSET
// pages into the vCPU fd). The ring must have been enabled on the VM with
// KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) before the vCPU was created. The returned
// slice aliases kernel-shared memory: read Flags with DirtyGFNFlags.
func (c *VCPU) MapDirtyRing(n int) ([]DirtyGFN, error) {
	if c.ring != nil {
		return nil, fmt.Errorf("map dirty ring of vCPU %d: already mapped", c.id)
	}
	size := n * int(unsafe.Sizeof(DirtyGFN{}))
	mem, err := unix.Mmap(c.fd, int64(KVM_DIRTY_LOG_PAGE_OFFSET*os.Getpagesize()), size,
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map dirty ring of vCPU %d: %w", c.id, err)
	}
	c.ring = mem
	return unsafe.Slice((*DirtyGFN)(unsafe.Pointer(&mem[0])), n), nil
}

// UnmapDirtyRing unmaps the ring MapDirtyRing mapped; slices of it must no
// longer be used. It does nothing if no ring is mapped.
func (c *VCPU) UnmapDirtyRing() error {
	if c.ring == nil {
		return nil
	}
	err := unix.Munmap(c.ring)
	c.ring = nil
	if err != nil {
		return fmt.Errorf("unmap dirty ring of vCPU %d: %w", c.id, err)
	}
	return nil
}

// LoadDirtyGFNFlags reads a ring entry's flags with acquire ordering, as
// KVM_CAP_DIRTY_LOG_RING_ACQ_REL requires.
func LoadDirtyGFNFlags(e *DirtyGFN) uint32 { return atomic.LoadUint32(&e.Flags) }

// StoreDirtyGFNFlags writes a ring entry's flags with release ordering.
func StoreDirtyGFNFlags(e *DirtyGFN, flags uint32) { atomic.StoreUint32(&e.Flags, flags) }
