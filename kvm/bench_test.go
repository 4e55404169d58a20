package kvm_test

import (
	"testing"

	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/kvm"
)

// Floors for the per-epoch state cost: what one vCPU's and the VM-wide state
// cost to read and to write, with nothing around them. See docs/BENCHMARKS.md.

// benchVM makes a VM the way a VMM does before its first run: an irqchip, a
// PIT and one vCPU with the supported CPUID set. It returns the vCPU's
// readable MSR list too.
func benchVM(b *testing.B) (*kvm.VM, *kvm.VCPU, []uint32) {
	b.Helper()
	privileged.Require(b, privileged.KVM)
	sys, err := kvm.Open()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { sys.Close() })
	vm, err := sys.CreateVM()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { vm.Close() })
	if err := vm.SetTSSAddr(0xfffbd000); err != nil {
		b.Fatal(err)
	}
	if err := vm.CreateIRQChip(); err != nil {
		b.Fatal(err)
	}
	if err := vm.CreatePIT2(0); err != nil {
		b.Fatal(err)
	}
	c, err := vm.CreateVCPU(0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		b.Fatal(err)
	}
	if err := c.SetCPUID(cpuid); err != nil {
		b.Fatal(err)
	}
	idx, err := sys.MSRIndexList()
	if err != nil {
		b.Fatal(err)
	}
	msrs, err := c.ReadableMSRs(idx)
	if err != nil {
		b.Fatal(err)
	}
	return vm, c, msrs
}

// BenchmarkVCPUSaveState is one vCPU's checkpoint: MP state, regs, sregs,
// XSAVE, XCRs, debug regs, LAPIC, TSC frequency, every readable MSR and the
// events, reusing the state's buffers (CPUID is read on the first save only).
func BenchmarkVCPUSaveState(b *testing.B) {
	_, c, msrs := benchVM(b)
	var st kvm.VCPUState
	if err := c.SaveState(&st, msrs); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := c.SaveState(&st, msrs); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(msrs)), "msrs")
}

// BenchmarkVCPURestoreState writes a saved vCPU state into a vCPU of another
// VM that has not run yet. Every op restores into the same vCPU: KVM accepts
// CPUID (and everything else) again until the first KVM_RUN, and making a new
// vCPU per op would measure vCPU creation instead.
func BenchmarkVCPURestoreState(b *testing.B) {
	_, c, msrs := benchVM(b)
	var st kvm.VCPUState
	if err := c.SaveState(&st, msrs); err != nil {
		b.Fatal(err)
	}
	_, c2, _ := benchVM(b)
	for b.Loop() {
		if err := c2.RestoreState(&st); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVMSaveState reads the VM-wide state: both PICs, the IOAPIC, the PIT
// and kvmclock.
func BenchmarkVMSaveState(b *testing.B) {
	vm, _, _ := benchVM(b)
	var st kvm.VMState
	for b.Loop() {
		if err := vm.SaveState(&st); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVMRestoreState writes the VM-wide state into another VM.
func BenchmarkVMRestoreState(b *testing.B) {
	vm, _, _ := benchVM(b)
	var st kvm.VMState
	if err := vm.SaveState(&st); err != nil {
		b.Fatal(err)
	}
	vm2, _, _ := benchVM(b)
	for b.Loop() {
		if err := vm2.RestoreState(&st); err != nil {
			b.Fatal(err)
		}
	}
}
