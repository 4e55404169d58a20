package kvm

import (
	"testing"
	"unsafe"
)

// The want values were printed by a C program that includes <linux/kvm.h>
// (linux-libc-dev 6.1, x86_64). They are kernel ABI and never change.

func TestIoctlNumbers(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"KVM_GET_API_VERSION", KVM_GET_API_VERSION, 0xae00},
		{"KVM_CREATE_VM", KVM_CREATE_VM, 0xae01},
		{"KVM_GET_MSR_INDEX_LIST", KVM_GET_MSR_INDEX_LIST, 0xc004ae02},
		{"KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, 0xae03},
		{"KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE, 0xae04},
		{"KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID, 0xc008ae05},
		{"KVM_CREATE_VCPU", KVM_CREATE_VCPU, 0xae41},
		{"KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, 0x4010ae42},
		{"KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, 0x4020ae46},
		{"KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, 0xae47},
		{"KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR, 0x4008ae48},
		{"KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP, 0xae60},
		{"KVM_CREATE_PIT2", KVM_CREATE_PIT2, 0x4040ae77},
		{"KVM_GET_IRQCHIP", KVM_GET_IRQCHIP, 0xc208ae62},
		{"KVM_SET_IRQCHIP", KVM_SET_IRQCHIP, 0x8208ae63},
		{"KVM_GET_CLOCK", KVM_GET_CLOCK, 0x8030ae7c},
		{"KVM_SET_CLOCK", KVM_SET_CLOCK, 0x4030ae7b},
		{"KVM_GET_PIT2", KVM_GET_PIT2, 0x8070ae9f},
		{"KVM_SET_PIT2", KVM_SET_PIT2, 0x4070aea0},
		{"KVM_IOEVENTFD", KVM_IOEVENTFD, 0x4040ae79},
		{"KVM_IRQFD", KVM_IRQFD, 0x4020ae76},
		{"KVM_ENABLE_CAP", KVM_ENABLE_CAP, 0x4068aea3},
		{"KVM_CLEAR_DIRTY_LOG", KVM_CLEAR_DIRTY_LOG, 0xc018aec0},
		{"KVM_RESET_DIRTY_RINGS", KVM_RESET_DIRTY_RINGS, 0xaec7},
		{"KVM_IRQ_LINE", KVM_IRQ_LINE, 0x4008ae61},
		{"KVM_SIGNAL_MSI", KVM_SIGNAL_MSI, 0x4020aea5},
		{"KVM_RUN", KVM_RUN, 0xae80},
		{"KVM_GET_REGS", KVM_GET_REGS, 0x8090ae81},
		{"KVM_SET_REGS", KVM_SET_REGS, 0x4090ae82},
		{"KVM_GET_SREGS", KVM_GET_SREGS, 0x8138ae83},
		{"KVM_SET_SREGS", KVM_SET_SREGS, 0x4138ae84},
		{"KVM_GET_FPU", KVM_GET_FPU, 0x81a0ae8c},
		{"KVM_SET_FPU", KVM_SET_FPU, 0x41a0ae8d},
		{"KVM_GET_XSAVE", KVM_GET_XSAVE, 0x9000aea4},
		{"KVM_SET_XSAVE", KVM_SET_XSAVE, 0x5000aea5},
		{"KVM_GET_XSAVE2", KVM_GET_XSAVE2, 0x9000aecf},
		{"KVM_GET_XCRS", KVM_GET_XCRS, 0x8188aea6},
		{"KVM_SET_XCRS", KVM_SET_XCRS, 0x4188aea7},
		{"KVM_GET_MSRS", KVM_GET_MSRS, 0xc008ae88},
		{"KVM_SET_MSRS", KVM_SET_MSRS, 0x4008ae89},
		{"KVM_GET_LAPIC", KVM_GET_LAPIC, 0x8400ae8e},
		{"KVM_SET_LAPIC", KVM_SET_LAPIC, 0x4400ae8f},
		{"KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, 0x8040ae9f},
		{"KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, 0x4040aea0},
		{"KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, 0x8080aea1},
		{"KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS, 0x4080aea2},
		{"KVM_GET_MP_STATE", KVM_GET_MP_STATE, 0x8004ae98},
		{"KVM_SET_MP_STATE", KVM_SET_MP_STATE, 0x4004ae99},
		{"KVM_GET_CPUID2", KVM_GET_CPUID2, 0xc008ae91},
		{"KVM_SET_CPUID2", KVM_SET_CPUID2, 0x4008ae90},
		{"KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ, 0xaea3},
		{"KVM_SET_TSC_KHZ", KVM_SET_TSC_KHZ, 0xaea2},
		{"KVM_KVMCLOCK_CTRL", KVM_KVMCLOCK_CTRL, 0xaead},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x (from <linux/kvm.h>)", tt.name, tt.got, tt.want)
		}
	}
}

func TestStructSizes(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"struct kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"struct kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"struct kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"struct kvm_dtable", unsafe.Sizeof(DTable{}), 16},
		{"struct kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"struct kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"struct kvm_xcr", unsafe.Sizeof(XCR{}), 16},
		{"struct kvm_msr_entry", unsafe.Sizeof(MSREntry{}), 16},
		{"struct kvm_msrs", unsafe.Sizeof(msrsHeader{}), 8},
		{"struct kvm_lapic_state", unsafe.Sizeof(LAPICState{}), 1024},
		{"struct kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"struct kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"struct kvm_mp_state", unsafe.Sizeof(MPState{}), 4},
		{"struct kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry2{}), 40},
		{"struct kvm_cpuid2", unsafe.Sizeof(cpuid2Header{}), 8},
		{"struct kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"struct kvm_irqchip", unsafe.Sizeof(IRQChip{}), 520},
		{"struct kvm_pit_state2", unsafe.Sizeof(PITState2{}), 112},
		{"struct kvm_pit_channel_state", unsafe.Sizeof(PITChannelState{}), 24},
		{"struct kvm_userspace_memory_region", unsafe.Sizeof(UserspaceMemoryRegion{}), 32},
		{"struct kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16},
		{"struct kvm_clear_dirty_log", unsafe.Sizeof(clearDirtyLog{}), 24},
		{"struct kvm_ioeventfd", unsafe.Sizeof(IOEventFD{}), 64},
		{"struct kvm_irqfd", unsafe.Sizeof(IRQFD{}), 32},
		{"struct kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
		{"struct kvm_dirty_gfn", unsafe.Sizeof(DirtyGFN{}), 16},
		{"struct kvm_run up to kvm_valid_regs", unsafe.Sizeof(runHeader{}), 288},
		{"struct kvm_pit_config", unsafe.Sizeof(pitConfig{}), 64},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("sizeof(%s) = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
}
