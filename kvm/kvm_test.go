package kvm_test

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/kvm"
	"golang.org/x/sys/unix"
)

func openSystem(t *testing.T) *kvm.System {
	t.Helper()
	privileged.Require(t, privileged.KVM)
	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sys.Close() })
	return sys
}

// newVM makes a VM with an irqchip, a PIT and one vCPU with the supported
// CPUID set.
func newVM(t *testing.T, sys *kvm.System) (*kvm.VM, *kvm.VCPU) {
	t.Helper()
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.SetTSSAddr(0xfffbd000); err != nil {
		t.Fatal(err)
	}
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	if err := vm.CreatePIT2(0); err != nil {
		t.Fatal(err)
	}
	c, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetCPUID(cpuid); err != nil {
		t.Fatal(err)
	}
	return vm, c
}

func TestSystem(t *testing.T) {
	sys := openSystem(t)
	if n := sys.VCPUMmapSize(); n < 4096 {
		t.Errorf("VCPUMmapSize = %d, want at least a page", n)
	}
	for _, c := range []int{kvm.KVM_CAP_IRQCHIP, kvm.KVM_CAP_USER_MEMORY, kvm.KVM_CAP_IMMEDIATE_EXIT} {
		if sys.CheckExtension(c) == 0 {
			t.Errorf("KVM_CHECK_EXTENSION(%d) = 0, want supported", c)
		}
	}
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if len(cpuid) == 0 || cpuid[0].Function != 0 {
		t.Errorf("SupportedCPUID: %d entries, first leaf %#x; want leaf 0 first", len(cpuid), cpuid[0].Function)
	}
	msrs, err := sys.MSRIndexList()
	if err != nil {
		t.Fatal(err)
	}
	if !containsMSR(msrs, 0x10) { // IA32_TSC
		t.Errorf("MSRIndexList (%d MSRs) lacks IA32_TSC", len(msrs))
	}
}

func containsMSR(l []uint32, idx uint32) bool {
	for _, m := range l {
		if m == idx {
			return true
		}
	}
	return false
}

func TestMissingCapabilityIsErrNotSupported(t *testing.T) {
	sys := openSystem(t)
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	err = vm.EnableCap(0x7fff0000)
	if !errors.Is(err, kvm.ErrNotSupported) {
		t.Fatalf("EnableCap(unknown) = %v, want ErrNotSupported", err)
	}
}

func TestImmediateExit(t *testing.T) {
	sys := openSystem(t)
	_, c := newVM(t, sys)
	c.SetImmediateExit(true)
	if !c.ImmediateExit() {
		t.Fatal("ImmediateExit() = false after SetImmediateExit(true)")
	}
	if err := c.Run(); err != unix.EINTR {
		t.Fatalf("Run with immediate_exit = %v, want EINTR", err)
	}
	c.SetImmediateExit(false)
	if c.ImmediateExit() {
		t.Fatal("ImmediateExit() = true after SetImmediateExit(false)")
	}
}

func TestGetDirtyLogWithoutLoggingIsAnError(t *testing.T) {
	sys := openSystem(t)
	vm, _ := newVM(t, sys)
	mem, err := unix.Mmap(-1, 0, 2<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	if err := vm.SetUserMemoryRegion(kvm.UserspaceMemoryRegion{Slot: 0, MemorySize: 2 << 20, UserspaceAddr: addrOf(mem)}); err != nil {
		t.Fatal(err)
	}
	bm := make([]uint64, 8)
	if err := vm.GetDirtyLog(0, bm); err == nil {
		t.Fatal("GetDirtyLog on a slot without KVM_MEM_LOG_DIRTY_PAGES succeeded")
	}
	if err := vm.SetUserMemoryRegion(kvm.UserspaceMemoryRegion{Slot: 0, Flags: kvm.KVM_MEM_LOG_DIRTY_PAGES, MemorySize: 2 << 20, UserspaceAddr: addrOf(mem)}); err != nil {
		t.Fatal(err)
	}
	if err := vm.GetDirtyLog(0, bm); err != nil {
		t.Fatalf("GetDirtyLog with logging on: %v", err)
	}
}

// A vCPU's state saved, encoded, decoded and restored into a fresh VM reads
// back the same.
func TestVCPUStateRoundTrip(t *testing.T) {
	sys := openSystem(t)
	vm, c := newVM(t, sys)
	msrIdx, err := sys.MSRIndexList()
	if err != nil {
		t.Fatal(err)
	}
	msrs, err := c.ReadableMSRs(msrIdx)
	if err != nil {
		t.Fatal(err)
	}
	if len(msrs) == 0 {
		t.Fatal("no readable MSRs")
	}
	regs := kvm.Regs{RAX: 1, RBX: 2, RCX: 3, RSP: 0x8000, RIP: 0x1234, RFLAGS: 0x202}
	if err := c.SetRegs(&regs); err != nil {
		t.Fatal(err)
	}
	var st kvm.VCPUState
	if err := c.SaveState(&st, msrs); err != nil {
		t.Fatal(err)
	}
	var vst kvm.VMState
	if err := vm.SaveState(&vst); err != nil {
		t.Fatal(err)
	}
	enc, _ := st.AppendBinary(nil)
	enc, _ = vst.AppendBinary(enc)

	var st2 kvm.VCPUState
	rest, err := st2.Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	var vst2 kvm.VMState
	if rest, err = vst2.Decode(rest); err != nil || len(rest) != 0 {
		t.Fatalf("VMState.Decode: %v, %d bytes left", err, len(rest))
	}
	again, _ := st2.AppendBinary(nil)
	again, _ = vst2.AppendBinary(again)
	if !bytes.Equal(enc, again) {
		t.Fatal("decode then encode differs from the original encoding")
	}

	vm2, c2 := newVM(t, sys)
	if err := c2.RestoreState(&st2); err != nil {
		t.Fatal(err)
	}
	if err := vm2.RestoreState(&vst2); err != nil {
		t.Fatal(err)
	}
	var got kvm.VCPUState
	if err := c2.SaveState(&got, msrs); err != nil {
		t.Fatal(err)
	}
	if got.Regs != st.Regs {
		t.Errorf("regs after restore = %+v, want %+v", got.Regs, st.Regs)
	}
	if got.Sregs != st.Sregs {
		t.Errorf("sregs after restore differ:\n got %+v\nwant %+v", got.Sregs, st.Sregs)
	}
	if !bytes.Equal(got.XSave, st.XSave) {
		t.Error("xsave after restore differs")
	}
	if got.LAPIC != st.LAPIC {
		t.Error("lapic after restore differs")
	}
	if got.MPState != st.MPState || got.Events != st.Events || got.XCRs != st.XCRs || got.DebugRegs != st.DebugRegs {
		t.Error("mp state, events, xcrs or debug regs differ after restore")
	}
	// MSRs: all equal but the TSC, which ran on between save and read-back.
	for i, e := range got.MSRs {
		if want := st.MSRs[i]; e.Index != want.Index || e.Data != want.Data && e.Index != 0x10 {
			t.Errorf("MSR %#x after restore = %#x, saved %#x", want.Index, e.Data, want.Data)
		}
	}
	var vgot kvm.VMState
	if err := vm2.SaveState(&vgot); err != nil {
		t.Fatal(err)
	}
	if vgot.PICMaster != vst.PICMaster || vgot.PICSlave != vst.PICSlave || vgot.IOAPIC != vst.IOAPIC {
		t.Error("irqchip state differs after restore")
	}
	if vgot.PIT.Channels[0].Count != vst.PIT.Channels[0].Count || vgot.PIT.Flags != vst.PIT.Flags {
		t.Error("PIT state differs after restore")
	}
	if vgot.Clock.Clock < vst.Clock.Clock {
		t.Errorf("kvmclock went back across restore: %d -> %d", vst.Clock.Clock, vgot.Clock.Clock)
	}
}

func TestDecodeRejectsTruncated(t *testing.T) {
	sys := openSystem(t)
	_, c := newVM(t, sys)
	var st kvm.VCPUState
	if err := c.SaveState(&st, nil); err != nil {
		t.Fatal(err)
	}
	enc, _ := st.AppendBinary(nil)
	for _, n := range []int{0, 1, 100, len(enc) / 2, len(enc) - 1} {
		var d kvm.VCPUState
		if _, err := d.Decode(enc[:n]); !errors.Is(err, kvm.ErrShortState) {
			t.Errorf("Decode(%d of %d bytes) = %v, want ErrShortState", n, len(enc), err)
		}
	}
}

// A VM and a vCPU another VMM made can be wrapped by their fds: the
// wrappers work on the same VM, and closing them leaves the VMM's own fds
// working. Files that are not a VM or a vCPU are refused.
func TestFromFD(t *testing.T) {
	sys := openSystem(t)
	vm, c := newVM(t, sys)
	fvm, err := kvm.VMFromFD(sys, vm.FD())
	if err != nil {
		t.Fatal(err)
	}
	if fvm.CheckExtension(kvm.KVM_CAP_USER_MEMORY) != vm.CheckExtension(kvm.KVM_CAP_USER_MEMORY) {
		t.Fatal("the wrapped VM answers differently from the VMM's")
	}
	fc, err := fvm.VCPUFromFD(c.FD(), 0)
	if err != nil {
		t.Fatal(err)
	}
	var want, got kvm.Regs
	want.RIP = 0x1234
	if err := c.SetRegs(&want); err != nil {
		t.Fatal(err)
	}
	if err := fc.GetRegs(&got); err != nil || got.RIP != want.RIP {
		t.Fatalf("wrapped vCPU reads RIP %#x (%v), the VMM set %#x", got.RIP, err, want.RIP)
	}
	if err := fc.Close(); err != nil {
		t.Fatal(err)
	}
	if err := fvm.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.GetRegs(&got); err != nil || got.RIP != want.RIP {
		t.Fatalf("the VMM's vCPU after the wrapper closed: RIP %#x, %v", got.RIP, err)
	}
	if _, err := kvm.VMFromFD(sys, c.FD()); err == nil {
		t.Fatal("a vCPU fd was taken for a VM")
	}
	if _, err := vm.VCPUFromFD(vm.FD(), 0); err == nil {
		t.Fatal("a VM fd was taken for a vCPU")
	}
	f, err := os.CreateTemp(t.TempDir(), "notkvm")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := kvm.VMFromFD(sys, int(f.Fd())); err == nil {
		t.Fatal("a regular file was taken for a VM")
	}
}
