package kvm

// Go mirrors of the x86 KVM structs in <linux/kvm.h> and
// <asm/kvm.h>. Every mirror has the kernel's layout, explicit padding, and a
// size pinned by TestStructSizes.

// Regs mirrors struct kvm_regs: the general-purpose registers.
type Regs struct {
	RAX, RBX, RCX, RDX uint64
	RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11   uint64
	R12, R13, R14, R15 uint64
	RIP, RFLAGS        uint64
}

// Segment mirrors struct kvm_segment.
type Segment struct {
	Base     uint64 // base
	Limit    uint32 // limit
	Selector uint16 // selector
	Type     uint8  // type
	Present  uint8  // present
	DPL      uint8  // dpl
	DB       uint8  // db
	S        uint8  // s
	L        uint8  // l
	G        uint8  // g
	AVL      uint8  // avl
	Unusable uint8  // unusable
	_        uint8  // padding
}

// DTable mirrors struct kvm_dtable (GDTR and IDTR).
type DTable struct {
	Base  uint64    // base
	Limit uint16    // limit
	_     [3]uint16 // padding
}

// Sregs mirrors struct kvm_sregs: segments, control registers and the
// pending-interrupt bitmap.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	APICBase               uint64    // apic_base
	InterruptBitmap        [4]uint64 // interrupt_bitmap
}

// FPU mirrors struct kvm_fpu (legacy FXSAVE view; XSAVE supersedes it in
// VCPUState).
type FPU struct {
	FPR        [8][16]uint8  // fpr
	FCW        uint16        // fcw
	FSW        uint16        // fsw
	FTWX       uint8         // ftwx
	_          uint8         // pad1
	LastOpcode uint16        // last_opcode
	LastIP     uint64        // last_ip
	LastDP     uint64        // last_dp
	XMM        [16][16]uint8 // xmm
	MXCSR      uint32        // mxcsr
	_          uint32        // pad2
}

// XCR mirrors struct kvm_xcr.
type XCR struct {
	XCR   uint32 // xcr
	_     uint32 // reserved
	Value uint64 // value
}

// XCRs mirrors struct kvm_xcrs.
type XCRs struct {
	NrXCRs uint32     // nr_xcrs
	Flags  uint32     // flags
	XCRs   [16]XCR    // xcrs (KVM_MAX_XCRS)
	_      [16]uint64 // padding
}

// MSREntry mirrors struct kvm_msr_entry.
type MSREntry struct {
	Index uint32 // index
	_     uint32 // reserved
	Data  uint64 // data
}

// msrsHeader mirrors the fixed part of struct kvm_msrs.
type msrsHeader struct {
	NMSRs uint32 // nmsrs
	_     uint32 // pad
}

// LAPICState mirrors struct kvm_lapic_state: the local APIC register page.
type LAPICState struct {
	Regs [1024]byte // regs (KVM_APIC_REG_SIZE)
}

// VCPUEvents mirrors struct kvm_vcpu_events: pending exceptions, interrupts,
// NMIs and SMIs.
type VCPUEvents struct {
	ExceptionInjected     uint8  // exception.injected
	ExceptionNr           uint8  // exception.nr
	ExceptionHasErrorCode uint8  // exception.has_error_code
	ExceptionPending      uint8  // exception.pending
	ExceptionErrorCode    uint32 // exception.error_code
	InterruptInjected     uint8  // interrupt.injected
	InterruptNr           uint8  // interrupt.nr
	InterruptSoft         uint8  // interrupt.soft
	InterruptShadow       uint8  // interrupt.shadow
	NMIInjected           uint8  // nmi.injected
	NMIPending            uint8  // nmi.pending
	NMIMasked             uint8  // nmi.masked
	_                     uint8  // nmi.pad
	SIPIVector            uint32 // sipi_vector
	Flags                 uint32 // flags (KVM_VCPUEVENT_VALID_*)
	SMISMM                uint8  // smi.smm
	SMIPending            uint8  // smi.pending
	SMIInsideNMI          uint8  // smi.smm_inside_nmi
	SMILatchedInit        uint8  // smi.latched_init
	TripleFaultPending    uint8  // triple_fault.pending
	_                     [26]uint8
	ExceptionHasPayload   uint8  // exception_has_payload
	ExceptionPayload      uint64 // exception_payload
}

// DebugRegs mirrors struct kvm_debugregs.
type DebugRegs struct {
	DB    [4]uint64 // db
	DR6   uint64    // dr6
	DR7   uint64    // dr7
	Flags uint64    // flags
	_     [9]uint64 // reserved
}

// MPState mirrors struct kvm_mp_state.
type MPState struct {
	MPState uint32 // mp_state (KVM_MP_STATE_*)
}

// CPUIDEntry2 mirrors struct kvm_cpuid_entry2.
type CPUIDEntry2 struct {
	Function uint32    // function
	Index    uint32    // index
	Flags    uint32    // flags
	EAX      uint32    // eax
	EBX      uint32    // ebx
	ECX      uint32    // ecx
	EDX      uint32    // edx
	_        [3]uint32 // padding
}

// cpuid2Header mirrors the fixed part of struct kvm_cpuid2.
type cpuid2Header struct {
	Nent uint32 // nent
	_    uint32 // padding
}

// ClockData mirrors struct kvm_clock_data: the kvmclock value.
type ClockData struct {
	Clock    uint64    // clock
	Flags    uint32    // flags
	_        uint32    // pad0
	Realtime uint64    // realtime
	HostTSC  uint64    // host_tsc
	_        [4]uint32 // pad
}

// IRQChip mirrors struct kvm_irqchip: one of the in-kernel PICs or the IOAPIC.
type IRQChip struct {
	ChipID uint32    // chip_id (KVM_IRQCHIP_*)
	_      uint32    // pad
	Chip   [512]byte // chip (union of kvm_pic_state and kvm_ioapic_state)
}

// PITChannelState mirrors struct kvm_pit_channel_state.
type PITChannelState struct {
	Count         uint32 // count
	LatchedCount  uint16 // latched_count
	CountLatched  uint8  // count_latched
	StatusLatched uint8  // status_latched
	Status        uint8  // status
	ReadState     uint8  // read_state
	WriteState    uint8  // write_state
	WriteLatch    uint8  // write_latch
	RWMode        uint8  // rw_mode
	Mode          uint8  // mode
	BCD           uint8  // bcd
	Gate          uint8  // gate
	CountLoadTime int64  // count_load_time
}

// PITState2 mirrors struct kvm_pit_state2.
type PITState2 struct {
	Channels [3]PITChannelState // channels
	Flags    uint32             // flags
	_        [9]uint32          // reserved
}

// pitConfig mirrors struct kvm_pit_config.
type pitConfig struct {
	Flags uint32     // flags
	_     [15]uint32 // pad
}

// UserspaceMemoryRegion mirrors struct kvm_userspace_memory_region.
type UserspaceMemoryRegion struct {
	Slot          uint32 // slot
	Flags         uint32 // flags (KVM_MEM_*)
	GuestPhysAddr uint64 // guest_phys_addr
	MemorySize    uint64 // memory_size, bytes
	UserspaceAddr uint64 // userspace_addr
}

// dirtyLog mirrors struct kvm_dirty_log.
type dirtyLog struct {
	Slot        uint32 // slot
	_           uint32 // padding1
	DirtyBitmap uint64 // dirty_bitmap (user pointer)
}

// clearDirtyLog mirrors struct kvm_clear_dirty_log.
type clearDirtyLog struct {
	Slot        uint32 // slot
	NumPages    uint32 // num_pages
	FirstPage   uint64 // first_page
	DirtyBitmap uint64 // dirty_bitmap (user pointer)
}

// IOEventFD mirrors struct kvm_ioeventfd.
type IOEventFD struct {
	Datamatch uint64    // datamatch
	Addr      uint64    // addr
	Len       uint32    // len
	FD        int32     // fd
	Flags     uint32    // flags (KVM_IOEVENTFD_FLAG_*)
	_         [36]uint8 // pad
}

// IRQFD mirrors struct kvm_irqfd.
type IRQFD struct {
	FD         uint32    // fd
	GSI        uint32    // gsi
	Flags      uint32    // flags
	ResampleFD uint32    // resamplefd
	_          [16]uint8 // pad
}

// enableCap mirrors struct kvm_enable_cap.
type enableCap struct {
	Cap   uint32    // cap
	Flags uint32    // flags
	Args  [4]uint64 // args
	_     [64]uint8 // pad
}

// DirtyGFN mirrors struct kvm_dirty_gfn: one dirty-ring entry.
type DirtyGFN struct {
	Flags  uint32 // flags (KVM_DIRTY_GFN_F_*)
	Slot   uint32 // slot: as_id << 16 | slot id
	Offset uint64 // offset: page number within the slot
}

// runHeader mirrors the fixed head of struct kvm_run up to the exit union.
type runHeader struct {
	RequestInterruptWindow     uint8    // request_interrupt_window
	ImmediateExit              uint8    // immediate_exit
	_                          [6]uint8 // padding1
	ExitReason                 uint32   // exit_reason
	ReadyForInterruptInjection uint8    // ready_for_interrupt_injection
	IFFlag                     uint8    // if_flag
	Flags                      uint16   // flags
	CR8                        uint64   // cr8
	APICBase                   uint64   // apic_base
	Exit                       [256]byte
}

// runIO mirrors kvm_run's io exit member.
type runIO struct {
	Direction  uint8  // direction (KVM_EXIT_IO_IN/OUT)
	Size       uint8  // size: 1, 2 or 4
	Port       uint16 // port
	Count      uint32 // count
	DataOffset uint64 // data_offset, from the start of kvm_run
}

// runMMIO mirrors kvm_run's mmio exit member.
type runMMIO struct {
	PhysAddr uint64   // phys_addr
	Data     [8]uint8 // data
	Len      uint32   // len
	IsWrite  uint8    // is_write
}

// runFailEntry mirrors kvm_run's fail_entry exit member.
type runFailEntry struct {
	HardwareEntryFailureReason uint64 // hardware_entry_failure_reason
	CPU                        uint32 // cpu
}

// runInternal mirrors kvm_run's internal exit member.
type runInternal struct {
	Suberror uint32     // suberror
	NData    uint32     // ndata
	Data     [16]uint64 // data
}

// runSystemEvent mirrors kvm_run's system_event exit member.
type runSystemEvent struct {
	Type  uint32     // type (KVM_SYSTEM_EVENT_*)
	NData uint32     // ndata
	Data  [16]uint64 // data
}
