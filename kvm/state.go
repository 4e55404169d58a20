package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"github.com/repagent/repagent/internal/le"
)

// VCPUState is everything KVM holds for one vCPU that a checkpoint needs.
// XSave covers the FPU/SSE/AVX registers, so the legacy FPU struct is not
// kept separately.
type VCPUState struct {
	MPState   MPState
	Regs      Regs
	Sregs     Sregs
	XSave     []byte // XSaveSize bytes
	XCRs      XCRs
	DebugRegs DebugRegs
	LAPIC     LAPICState
	MSRs      []MSREntry
	Events    VCPUEvents
	CPUID     []CPUIDEntry2
	TSCKHz    uint32
}

// ReadableMSRs returns the subset of indices that KVM_GET_MSRS can read on
// this vCPU. KVM's MSR index list names MSRs a given CPU model may lack, and
// KVM_GET_MSRS stops at the first one it cannot read, so a VMM filters the list
// once, at setup, and saves that subset at every checkpoint.
func (c *VCPU) ReadableMSRs(indices []uint32) ([]uint32, error) {
	entries := make([]MSREntry, len(indices))
	for i, idx := range indices {
		entries[i].Index = idx
	}
	var ok []uint32
	for len(entries) > 0 {
		n, err := c.GetMSRs(entries)
		if err != nil {
			return nil, err
		}
		for _, e := range entries[:n] {
			ok = append(ok, e.Index)
		}
		if n == len(entries) {
			break
		}
		entries = entries[n+1:] // skip the one KVM refused
	}
	return ok, nil
}

// SaveState reads the vCPU's complete state into s, reusing s's buffers. The
// vCPU must be out of KVM_RUN. msrs is the list from ReadableMSRs.
//
// The order follows what KVM requires: KVM_GET_MP_STATE first, because it may
// process pending INIT/SIPI events and so change the rest; KVM_GET_VCPU_EVENTS
// last, after everything that can raise an event has been read.
func (c *VCPU) SaveState(s *VCPUState, msrs []uint32) error {
	if err := c.GetMPState(&s.MPState); err != nil {
		return err
	}
	if err := c.GetRegs(&s.Regs); err != nil {
		return err
	}
	if err := c.GetSregs(&s.Sregs); err != nil {
		return err
	}
	if n := c.XSaveSize(); len(s.XSave) != n {
		s.XSave = make([]byte, n)
	}
	if err := c.GetXSave(s.XSave); err != nil {
		return err
	}
	if err := c.GetXCRs(&s.XCRs); err != nil {
		return err
	}
	if err := c.GetDebugRegs(&s.DebugRegs); err != nil {
		return err
	}
	if err := c.GetLAPIC(&s.LAPIC); err != nil {
		return err
	}
	khz, err := c.GetTSCKHz()
	if err != nil {
		return err
	}
	s.TSCKHz = khz
	if cap(s.MSRs) < len(msrs) {
		s.MSRs = make([]MSREntry, len(msrs))
	}
	s.MSRs = s.MSRs[:len(msrs)]
	for i, idx := range msrs {
		s.MSRs[i] = MSREntry{Index: idx}
	}
	n, err := c.GetMSRs(s.MSRs)
	if err != nil {
		return err
	}
	if n != len(s.MSRs) {
		return fmt.Errorf("KVM_GET_MSRS: read %d of %d MSRs (MSR %#x refused)", n, len(s.MSRs), s.MSRs[n].Index)
	}
	if s.CPUID == nil {
		if s.CPUID, err = c.GetCPUID(); err != nil {
			return err
		}
	}
	return c.GetVCPUEvents(&s.Events)
}

// RestoreState writes s into a vCPU that has not run yet.
//
// Order: CPUID before anything that depends on guest features (XSAVE, MSRs);
// the TSC frequency before the TSC MSR; sregs (which carry APIC_BASE) before the
// LAPIC; the LAPIC before the MSRs (TSC deadline) and before events; MP state
// and events last, so nothing set later clears a pending event.
func (c *VCPU) RestoreState(s *VCPUState) error {
	if len(s.CPUID) > 0 {
		if err := c.SetCPUID(s.CPUID); err != nil {
			return err
		}
	}
	if s.TSCKHz != 0 {
		if cur, err := c.GetTSCKHz(); err != nil || cur != s.TSCKHz {
			if err := c.SetTSCKHz(s.TSCKHz); err != nil {
				return fmt.Errorf("restore TSC frequency %d kHz (this host runs at %d kHz): %w", s.TSCKHz, cur, err)
			}
		}
	}
	if err := c.SetSregs(&s.Sregs); err != nil {
		return err
	}
	if err := c.SetRegs(&s.Regs); err != nil {
		return err
	}
	if len(s.XSave) > 0 {
		if err := c.SetXSave(s.XSave); err != nil {
			return err
		}
	}
	if err := c.SetXCRs(&s.XCRs); err != nil {
		return err
	}
	if err := c.SetDebugRegs(&s.DebugRegs); err != nil {
		return err
	}
	if err := c.SetLAPIC(&s.LAPIC); err != nil {
		return err
	}
	n, err := c.SetMSRs(s.MSRs)
	if err != nil {
		return err
	}
	if n != len(s.MSRs) {
		return fmt.Errorf("KVM_SET_MSRS: wrote %d of %d MSRs (MSR %#x refused)", n, len(s.MSRs), s.MSRs[n].Index)
	}
	if err := c.SetMPState(&s.MPState); err != nil {
		return err
	}
	return c.SetVCPUEvents(&s.Events)
}

// VMState is the VM-wide in-kernel state: kvmclock, the PICs, the IOAPIC and
// the PIT.
type VMState struct {
	Clock     ClockData
	PICMaster IRQChip
	PICSlave  IRQChip
	IOAPIC    IRQChip
	PIT       PITState2
}

// SaveState reads the VM-wide state. All vCPUs must be out of KVM_RUN.
func (vm *VM) SaveState(s *VMState) error {
	if err := vm.GetIRQChip(KVM_IRQCHIP_PIC_MASTER, &s.PICMaster); err != nil {
		return err
	}
	if err := vm.GetIRQChip(KVM_IRQCHIP_PIC_SLAVE, &s.PICSlave); err != nil {
		return err
	}
	if err := vm.GetIRQChip(KVM_IRQCHIP_IOAPIC, &s.IOAPIC); err != nil {
		return err
	}
	if err := vm.GetPIT2(&s.PIT); err != nil {
		return err
	}
	return vm.GetClock(&s.Clock)
}

// RestoreState writes the VM-wide state into a VM with an irqchip and PIT.
// The clock goes last so that the guest's time jumps as little as possible.
func (vm *VM) RestoreState(s *VMState) error {
	for _, chip := range []*IRQChip{&s.PICMaster, &s.PICSlave, &s.IOAPIC} {
		if err := vm.SetIRQChip(chip); err != nil {
			return err
		}
	}
	if err := vm.SetPIT2(&s.PIT); err != nil {
		return err
	}
	return vm.SetClock(&s.Clock)
}

// Encoding. Both state types encode as the kernel structs' bytes in a fixed
// order (little-endian, as on amd64), variable parts prefixed with a uint32
// count. The encoding carries no version: the containers that hold it (testvm's
// state file, replicate's wire messages) do. Decoding reads with internal/le,
// as testvm's does: a state cut short matches ErrShortState and names the
// field it ends in; a count over its limit wraps a *le.LimitError.

// Limits that keep a decoder from allocating on a hostile length.
const (
	maxXSave = 1 << 20
	maxMSRs  = 4096
	maxCPUID = 4096
)

// ErrShortState is returned (wrapped) by VCPUState.Decode and VMState.Decode
// when the encoded state ends early; the error names the field it ends in.
var ErrShortState = errors.New("truncated kvm state")

// AppendBinary appends the encoding of s to b.
func (s *VCPUState) AppendBinary(b []byte) ([]byte, error) {
	b = append(b, bytesOf(&s.MPState)...)
	b = append(b, bytesOf(&s.Regs)...)
	b = append(b, bytesOf(&s.Sregs)...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(s.XSave)))
	b = append(b, s.XSave...)
	b = append(b, bytesOf(&s.XCRs)...)
	b = append(b, bytesOf(&s.DebugRegs)...)
	b = append(b, bytesOf(&s.LAPIC)...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(s.MSRs)))
	b = append(b, sliceBytes(s.MSRs)...)
	b = append(b, bytesOf(&s.Events)...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(s.CPUID)))
	b = append(b, sliceBytes(s.CPUID)...)
	b = binary.LittleEndian.AppendUint32(b, s.TSCKHz)
	return b, nil
}

// Decode reads an encoding made by AppendBinary from the front of b and returns
// the rest. On error s is unspecified.
func (s *VCPUState) Decode(b []byte) ([]byte, error) {
	r := le.NewReader(b)
	r.Fixed("mp_state", bytesOf(&s.MPState))
	r.Fixed("regs", bytesOf(&s.Regs))
	r.Fixed("sregs", bytesOf(&s.Sregs))
	s.XSave = r.Bytes("xsave", maxXSave)
	r.Fixed("xcrs", bytesOf(&s.XCRs))
	r.Fixed("debugregs", bytesOf(&s.DebugRegs))
	r.Fixed("lapic", bytesOf(&s.LAPIC))
	s.MSRs = decodeSlice[MSREntry](&r, "msrs", maxMSRs)
	r.Fixed("vcpu_events", bytesOf(&s.Events))
	s.CPUID = decodeSlice[CPUIDEntry2](&r, "cpuid", maxCPUID)
	s.TSCKHz = r.U32("tsc_khz")
	if err := r.Err(); err != nil {
		return nil, decodeErr("vCPU state", err)
	}
	if s.XSave != nil && len(s.XSave) < sizeofXSave {
		return nil, fmt.Errorf("decode vCPU state: xsave area of %d bytes, need at least %d", len(s.XSave), sizeofXSave)
	}
	return r.Rest(), nil
}

// AppendBinary appends the encoding of s to b.
func (s *VMState) AppendBinary(b []byte) ([]byte, error) {
	b = append(b, bytesOf(&s.Clock)...)
	b = append(b, bytesOf(&s.PICMaster)...)
	b = append(b, bytesOf(&s.PICSlave)...)
	b = append(b, bytesOf(&s.IOAPIC)...)
	b = append(b, bytesOf(&s.PIT)...)
	return b, nil
}

// Decode reads an encoding made by AppendBinary from the front of b and
// returns the rest.
func (s *VMState) Decode(b []byte) ([]byte, error) {
	r := le.NewReader(b)
	r.Fixed("clock", bytesOf(&s.Clock))
	r.Fixed("pic master", bytesOf(&s.PICMaster))
	r.Fixed("pic slave", bytesOf(&s.PICSlave))
	r.Fixed("ioapic", bytesOf(&s.IOAPIC))
	r.Fixed("pit2", bytesOf(&s.PIT))
	if err := r.Err(); err != nil {
		return nil, decodeErr("VM state", err)
	}
	want := [3]uint32{KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC}
	for i, c := range []*IRQChip{&s.PICMaster, &s.PICSlave, &s.IOAPIC} {
		if c.ChipID != want[i] {
			return nil, fmt.Errorf("decode VM state: irqchip %d has chip id %d, want %d", i, c.ChipID, want[i])
		}
	}
	return r.Rest(), nil
}

// decodeErr wraps a Reader's error for the decoder of what: an input that
// ends early matches ErrShortState.
func decodeErr(what string, err error) error {
	if _, ok := errors.AsType[*le.ShortError](err); ok {
		return fmt.Errorf("decode %s: %w: %w", what, ErrShortState, err)
	}
	return fmt.Errorf("decode %s: %w", what, err)
}

// decodeSlice reads a count, at most limit, and that many kernel struct
// mirrors.
func decodeSlice[T any](r *le.Reader, what string, limit int) []T {
	n := r.Count(what, limit)
	var z T
	p := r.Take(what, n*int(unsafe.Sizeof(z)))
	if len(p) == 0 {
		return nil
	}
	out := make([]T, n)
	copy(sliceBytes(out), p)
	return out
}
