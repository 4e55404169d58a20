package kvm

// Ioctl request numbers, in the kernel's spelling, computed the way
// <linux/kvm.h> computes them with _IO, _IOR, _IOW and _IOWR. TestIoctlNumbers
// pins every one of them to the value the kernel header produces.

const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2

	kvmio = 0xAE
)

// The _IO, _IOR, _IOW and _IOWR prefixes: direction in bits 30-31, the
// argument size in bits 16-29 (add size<<16), type 0xAE in bits 8-15, and the
// number in bits 0-7.
const (
	_IO   = iocNone<<30 | kvmio<<8
	_IOR  = iocRead<<30 | kvmio<<8
	_IOW  = iocWrite<<30 | kvmio<<8
	_IOWR = (iocRead|iocWrite)<<30 | kvmio<<8
)

// Sizes of the kernel structs the request numbers encode. Those that have a Go
// mirror are checked against unsafe.Sizeof in TestStructSizes.
const (
	sizeofRegs                  = 144
	sizeofSregs                 = 312
	sizeofFPU                   = 416
	sizeofXSave                 = 4096
	sizeofXCRs                  = 392
	sizeofMSRsHeader            = 8
	sizeofMSRList               = 4
	sizeofLAPICState            = 1024
	sizeofVCPUEvents            = 64
	sizeofDebugRegs             = 128
	sizeofMPState               = 4
	sizeofCPUID2Header          = 8
	sizeofClockData             = 48
	sizeofIRQChip               = 520
	sizeofPITState2             = 112
	sizeofPITConfig             = 64
	sizeofUserspaceMemoryRegion = 32
	sizeofDirtyLog              = 16
	sizeofClearDirtyLog         = 24
	sizeofIOEventFD             = 64
	sizeofIRQFD                 = 32
	sizeofEnableCap             = 104
	sizeofIRQLevel              = 8
	sizeofMSI                   = 32
	sizeofUint64                = 8
)

// System ioctls (on the /dev/kvm fd).
const (
	KVM_GET_API_VERSION     = _IO | 0x00
	KVM_CREATE_VM           = _IO | 0x01
	KVM_GET_MSR_INDEX_LIST  = _IOWR | sizeofMSRList<<16 | 0x02
	KVM_CHECK_EXTENSION     = _IO | 0x03
	KVM_GET_VCPU_MMAP_SIZE  = _IO | 0x04
	KVM_GET_SUPPORTED_CPUID = _IOWR | sizeofCPUID2Header<<16 | 0x05
)

// VM ioctls (on a VM fd).
const (
	KVM_CREATE_VCPU            = _IO | 0x41
	KVM_GET_DIRTY_LOG          = _IOW | sizeofDirtyLog<<16 | 0x42
	KVM_SET_USER_MEMORY_REGION = _IOW | sizeofUserspaceMemoryRegion<<16 | 0x46
	KVM_SET_TSS_ADDR           = _IO | 0x47
	KVM_SET_IDENTITY_MAP_ADDR  = _IOW | sizeofUint64<<16 | 0x48
	KVM_CREATE_IRQCHIP         = _IO | 0x60
	KVM_IRQ_LINE               = _IOW | sizeofIRQLevel<<16 | 0x61
	KVM_GET_IRQCHIP            = _IOWR | sizeofIRQChip<<16 | 0x62
	KVM_SET_IRQCHIP            = _IOR | sizeofIRQChip<<16 | 0x63
	KVM_IRQFD                  = _IOW | sizeofIRQFD<<16 | 0x76
	KVM_CREATE_PIT2            = _IOW | sizeofPITConfig<<16 | 0x77
	KVM_IOEVENTFD              = _IOW | sizeofIOEventFD<<16 | 0x79
	KVM_SET_CLOCK              = _IOW | sizeofClockData<<16 | 0x7b
	KVM_GET_CLOCK              = _IOR | sizeofClockData<<16 | 0x7c
	KVM_GET_PIT2               = _IOR | sizeofPITState2<<16 | 0x9f
	KVM_SET_PIT2               = _IOW | sizeofPITState2<<16 | 0xa0
	KVM_ENABLE_CAP             = _IOW | sizeofEnableCap<<16 | 0xa3
	KVM_SIGNAL_MSI             = _IOW | sizeofMSI<<16 | 0xa5
	KVM_CLEAR_DIRTY_LOG        = _IOWR | sizeofClearDirtyLog<<16 | 0xc0
	KVM_RESET_DIRTY_RINGS      = _IO | 0xc7
)

// vCPU ioctls (on a vCPU fd). KVM_ENABLE_CAP and KVM_CHECK_EXTENSION also work
// on VM fds; the same numbers are used.
const (
	KVM_RUN             = _IO | 0x80
	KVM_GET_REGS        = _IOR | sizeofRegs<<16 | 0x81
	KVM_SET_REGS        = _IOW | sizeofRegs<<16 | 0x82
	KVM_GET_SREGS       = _IOR | sizeofSregs<<16 | 0x83
	KVM_SET_SREGS       = _IOW | sizeofSregs<<16 | 0x84
	KVM_GET_MSRS        = _IOWR | sizeofMSRsHeader<<16 | 0x88
	KVM_SET_MSRS        = _IOW | sizeofMSRsHeader<<16 | 0x89
	KVM_GET_FPU         = _IOR | sizeofFPU<<16 | 0x8c
	KVM_SET_FPU         = _IOW | sizeofFPU<<16 | 0x8d
	KVM_GET_LAPIC       = _IOR | sizeofLAPICState<<16 | 0x8e
	KVM_SET_LAPIC       = _IOW | sizeofLAPICState<<16 | 0x8f
	KVM_SET_CPUID2      = _IOW | sizeofCPUID2Header<<16 | 0x90
	KVM_GET_CPUID2      = _IOWR | sizeofCPUID2Header<<16 | 0x91
	KVM_GET_MP_STATE    = _IOR | sizeofMPState<<16 | 0x98
	KVM_SET_MP_STATE    = _IOW | sizeofMPState<<16 | 0x99
	KVM_GET_VCPU_EVENTS = _IOR | sizeofVCPUEvents<<16 | 0x9f
	KVM_SET_VCPU_EVENTS = _IOW | sizeofVCPUEvents<<16 | 0xa0
	KVM_GET_DEBUGREGS   = _IOR | sizeofDebugRegs<<16 | 0xa1
	KVM_SET_DEBUGREGS   = _IOW | sizeofDebugRegs<<16 | 0xa2
	KVM_SET_TSC_KHZ     = _IO | 0xa2
	KVM_GET_TSC_KHZ     = _IO | 0xa3
	KVM_GET_XSAVE       = _IOR | sizeofXSave<<16 | 0xa4
	KVM_SET_XSAVE       = _IOW | sizeofXSave<<16 | 0xa5
	KVM_GET_XCRS        = _IOR | sizeofXCRs<<16 | 0xa6
	KVM_SET_XCRS        = _IOW | sizeofXCRs<<16 | 0xa7
	KVM_KVMCLOCK_CTRL   = _IO | 0xad
	KVM_GET_XSAVE2      = _IOR | sizeofXSave<<16 | 0xcf
)

// The API version this package speaks; KVM has returned 12 since Linux 2.6.22.
const APIVersion = 12

// Capabilities (KVM_CAP_*) this package checks for.
const (
	KVM_CAP_IRQCHIP                   = 0
	KVM_CAP_USER_MEMORY               = 3
	KVM_CAP_SET_TSS_ADDR              = 4
	KVM_CAP_EXT_CPUID                 = 7
	KVM_CAP_NR_VCPUS                  = 9
	KVM_CAP_MP_STATE                  = 14
	KVM_CAP_SYNC_MMU                  = 16
	KVM_CAP_IRQFD                     = 32
	KVM_CAP_PIT2                      = 33
	KVM_CAP_SET_IDENTITY_MAP_ADDR     = 37
	KVM_CAP_ADJUST_CLOCK              = 39
	KVM_CAP_VCPU_EVENTS               = 41
	KVM_CAP_DEBUGREGS                 = 50
	KVM_CAP_XCRS                      = 56
	KVM_CAP_TSC_CONTROL               = 60
	KVM_CAP_GET_TSC_KHZ               = 61
	KVM_CAP_MAX_VCPUS                 = 66
	KVM_CAP_IOEVENTFD                 = 36
	KVM_CAP_READONLY_MEM              = 81
	KVM_CAP_IMMEDIATE_EXIT            = 136
	KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
	KVM_CAP_DIRTY_LOG_RING            = 192
	KVM_CAP_SREGS2                    = 200
	KVM_CAP_XSAVE2                    = 208
	KVM_CAP_DIRTY_LOG_RING_ACQ_REL    = 223
)

// Exit reasons (kvm_run.exit_reason).
const (
	KVM_EXIT_UNKNOWN         = 0
	KVM_EXIT_EXCEPTION       = 1
	KVM_EXIT_IO              = 2
	KVM_EXIT_HLT             = 5
	KVM_EXIT_MMIO            = 6
	KVM_EXIT_SHUTDOWN        = 8
	KVM_EXIT_FAIL_ENTRY      = 9
	KVM_EXIT_INTR            = 10
	KVM_EXIT_INTERNAL_ERROR  = 17
	KVM_EXIT_SYSTEM_EVENT    = 24
	KVM_EXIT_DIRTY_RING_FULL = 31
)

// Flags and constants from <linux/kvm.h>.
const (
	// KVM_MEM_LOG_DIRTY_PAGES turns dirty logging on for a memory slot.
	KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
	// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: KVM_GET_DIRTY_LOG no longer
	// re-protects; KVM_CLEAR_DIRTY_LOG does.
	KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
	// KVM_DIRTY_LOG_INITIALLY_SET: a slot starts with every page dirty.
	KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
	// KVM_DIRTY_GFN_F_DIRTY marks a dirty-ring entry the kernel published.
	KVM_DIRTY_GFN_F_DIRTY = 1 << 0
	// KVM_DIRTY_GFN_F_RESET marks a dirty-ring entry userspace harvested.
	KVM_DIRTY_GFN_F_RESET = 1 << 1
	// KVM_DIRTY_LOG_PAGE_OFFSET is the page offset of the dirty ring in a
	// vCPU fd's mapping.
	KVM_DIRTY_LOG_PAGE_OFFSET = 64

	KVM_EXIT_IO_IN  = 0
	KVM_EXIT_IO_OUT = 1

	KVM_IRQCHIP_PIC_MASTER = 0
	KVM_IRQCHIP_PIC_SLAVE  = 1
	KVM_IRQCHIP_IOAPIC     = 2

	KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
	KVM_IOEVENTFD_FLAG_PIO       = 1 << 1
	KVM_IOEVENTFD_FLAG_DEASSIGN  = 1 << 2

	KVM_MP_STATE_RUNNABLE = 0
)
