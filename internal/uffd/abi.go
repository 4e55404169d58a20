package uffd

// The kernel ABI: ioctl request numbers, flags and struct layouts, in the
// kernel's spelling, from <linux/userfaultfd.h>. golang.org/x/sys/unix has
// SYS_USERFAULTFD but none of these. TestABI pins every value to the header.

// The _IOR and _IOWR prefixes for the ioctl type 0xAA: direction in bits
// 30-31 (1 write, 2 read), the argument size in bits 16-29 (add size<<16),
// the type in bits 8-15 and the number in bits 0-7.
const (
	uffdio = 0xAA

	_IO   = 0<<30 | uffdio<<8
	_IOR  = 2<<30 | uffdio<<8
	_IOWR = 3<<30 | uffdio<<8
)

// Sizes of the structs the request numbers encode; TestABI checks them
// against unsafe.Sizeof of the Go mirrors below.
const (
	sizeofAPI          = 24
	sizeofRange        = 16
	sizeofRegister     = 32
	sizeofWriteProtect = 24
	sizeofMsg          = 32
)

// The ioctl numbers (the _UFFDIO_* values), also the bit positions of the
// ioctls bitmask that UFFDIO_API and UFFDIO_REGISTER return.
const (
	_UFFDIO_REGISTER     = 0x00
	_UFFDIO_UNREGISTER   = 0x01
	_UFFDIO_WAKE         = 0x02
	_UFFDIO_WRITEPROTECT = 0x06
	_UFFDIO_API          = 0x3F
)

// Ioctl requests. UNREGISTER and WAKE are _IOR though the kernel reads
// their argument: a historical slip the header keeps.
const (
	UFFDIO_API          = _IOWR | sizeofAPI<<16 | _UFFDIO_API
	UFFDIO_REGISTER     = _IOWR | sizeofRegister<<16 | _UFFDIO_REGISTER
	UFFDIO_UNREGISTER   = _IOR | sizeofRange<<16 | _UFFDIO_UNREGISTER
	UFFDIO_WAKE         = _IOR | sizeofRange<<16 | _UFFDIO_WAKE
	UFFDIO_WRITEPROTECT = _IOWR | sizeofWriteProtect<<16 | _UFFDIO_WRITEPROTECT

	// USERFAULTFD_IOC_NEW makes a userfaultfd from /dev/userfaultfd (not
	// used: the syscall works for root; pinned for whoever needs it).
	USERFAULTFD_IOC_NEW = _IO | 0x00
)

const (
	// UFFD_API is the only API version.
	UFFD_API = 0xAA

	// UFFD_USER_MODE_ONLY is a userfaultfd(2) flag this package never
	// passes: see Open.
	UFFD_USER_MODE_ONLY = 1

	UFFDIO_REGISTER_MODE_MISSING = 1 << 0
	UFFDIO_REGISTER_MODE_WP      = 1 << 1
	UFFDIO_REGISTER_MODE_MINOR   = 1 << 2

	UFFDIO_WRITEPROTECT_MODE_WP       = 1 << 0
	UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

	UFFD_EVENT_PAGEFAULT = 0x12

	UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
	UFFD_PAGEFAULT_FLAG_WP    = 1 << 1
	UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2
)

// Offsets in struct uffd_msg (32 bytes, packed): the event byte, then for a
// page fault the flags, the address and the faulting thread's id.
const (
	msgOffEvent = 0
	msgOffFlags = 8
	msgOffAddr  = 16
	msgOffPtid  = 24
)

// uffdioAPI is struct uffdio_api.
type uffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// uffdioRange is struct uffdio_range.
type uffdioRange struct {
	Start uint64
	Len   uint64
}

// uffdioRegister is struct uffdio_register; Ioctls is written by the kernel.
type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

// uffdioWriteProtect is struct uffdio_writeprotect.
type uffdioWriteProtect struct {
	Range uffdioRange
	Mode  uint64
}
