package kvm

import (
	"fmt"
	"unsafe"
)

// Exit is a decoded kvm_run exit, valid until the vCPU runs again. It points
// into the kvm_run mapping; reading it does not allocate.
type Exit struct {
	c *VCPU
}

// Exit returns the vCPU's last exit.
func (c *VCPU) Exit() Exit { return Exit{c} }

// Reason is kvm_run.exit_reason (KVM_EXIT_*).
func (e Exit) Reason() uint32 { return e.c.run.ExitReason }

// IO describes a KVM_EXIT_IO exit.
type IO struct {
	Out   bool   // direction is KVM_EXIT_IO_OUT
	Size  int    // bytes per access: 1, 2 or 4
	Port  uint16 // the I/O port
	Count int    // number of accesses (string I/O)
	// Data is the accessed bytes, Size*Count of them, inside kvm_run: for OUT
	// what the guest wrote, for IN where the VMM puts its answer.
	Data []byte
}

// IO decodes a KVM_EXIT_IO exit.
func (e Exit) IO() IO {
	r := (*runIO)(unsafe.Pointer(&e.c.run.Exit[0]))
	n := int(r.Size) * int(r.Count)
	off := int(r.DataOffset)
	var data []byte
	if off > 0 && off+n <= len(e.c.runMem) {
		data = e.c.runMem[off : off+n]
	}
	return IO{Out: r.Direction == KVM_EXIT_IO_OUT, Size: int(r.Size), Port: r.Port, Count: int(r.Count), Data: data}
}

// Value returns an OUT's value as a little-endian integer (Size bytes).
func (io IO) Value() uint32 {
	var v uint32
	for i := 0; i < io.Size && i < len(io.Data) && i < 4; i++ {
		v |= uint32(io.Data[i]) << (8 * i)
	}
	return v
}

// MMIO describes a KVM_EXIT_MMIO exit.
type MMIO struct {
	Addr  uint64 // guest-physical address
	Write bool
	Len   int
	// Data holds the written bytes, or receives the bytes to read.
	Data []byte
}

// MMIO decodes a KVM_EXIT_MMIO exit.
func (e Exit) MMIO() MMIO {
	m := (*runMMIO)(unsafe.Pointer(&e.c.run.Exit[0]))
	n := int(m.Len)
	if n > len(m.Data) {
		n = len(m.Data)
	}
	return MMIO{Addr: m.PhysAddr, Write: m.IsWrite != 0, Len: int(m.Len), Data: m.Data[:n]}
}

// FailEntry returns KVM_EXIT_FAIL_ENTRY's hardware reason and CPU.
func (e Exit) FailEntry() (reason uint64, cpu uint32) {
	f := (*runFailEntry)(unsafe.Pointer(&e.c.run.Exit[0]))
	return f.HardwareEntryFailureReason, f.CPU
}

// Internal returns KVM_EXIT_INTERNAL_ERROR's suberror and data words.
func (e Exit) Internal() (suberror uint32, data []uint64) {
	in := (*runInternal)(unsafe.Pointer(&e.c.run.Exit[0]))
	n := int(in.NData)
	if n > len(in.Data) {
		n = len(in.Data)
	}
	return in.Suberror, in.Data[:n]
}

// SystemEvent returns KVM_EXIT_SYSTEM_EVENT's type (KVM_SYSTEM_EVENT_*) and
// data words.
func (e Exit) SystemEvent() (typ uint32, data []uint64) {
	s := (*runSystemEvent)(unsafe.Pointer(&e.c.run.Exit[0]))
	n := int(s.NData)
	if n > len(s.Data) {
		n = len(s.Data)
	}
	return s.Type, s.Data[:n]
}

// ExitReasonName names a KVM_EXIT_* value, for messages.
func ExitReasonName(r uint32) string {
	switch r {
	case KVM_EXIT_UNKNOWN:
		return "UNKNOWN"
	case KVM_EXIT_EXCEPTION:
		return "EXCEPTION"
	case KVM_EXIT_IO:
		return "IO"
	case KVM_EXIT_HLT:
		return "HLT"
	case KVM_EXIT_MMIO:
		return "MMIO"
	case KVM_EXIT_SHUTDOWN:
		return "SHUTDOWN"
	case KVM_EXIT_FAIL_ENTRY:
		return "FAIL_ENTRY"
	case KVM_EXIT_INTR:
		return "INTR"
	case KVM_EXIT_INTERNAL_ERROR:
		return "INTERNAL_ERROR"
	case KVM_EXIT_SYSTEM_EVENT:
		return "SYSTEM_EVENT"
	case KVM_EXIT_DIRTY_RING_FULL:
		return "DIRTY_RING_FULL"
	}
	return fmt.Sprintf("exit %d", r)
}

// String describes the exit for error messages (allocates; not for hot paths).
func (e Exit) String() string {
	switch r := e.Reason(); r {
	case KVM_EXIT_IO:
		io := e.IO()
		dir := "in"
		if io.Out {
			dir = "out"
		}
		return fmt.Sprintf("IO %s port %#x size %d count %d", dir, io.Port, io.Size, io.Count)
	case KVM_EXIT_MMIO:
		m := e.MMIO()
		return fmt.Sprintf("MMIO write=%v addr %#x len %d", m.Write, m.Addr, m.Len)
	case KVM_EXIT_FAIL_ENTRY:
		reason, cpu := e.FailEntry()
		return fmt.Sprintf("FAIL_ENTRY hardware reason %#x on cpu %d", reason, cpu)
	case KVM_EXIT_INTERNAL_ERROR:
		sub, data := e.Internal()
		return fmt.Sprintf("INTERNAL_ERROR suberror %d data %#x", sub, data)
	case KVM_EXIT_SYSTEM_EVENT:
		typ, data := e.SystemEvent()
		return fmt.Sprintf("SYSTEM_EVENT type %d data %#x", typ, data)
	default:
		return ExitReasonName(r)
	}
}
