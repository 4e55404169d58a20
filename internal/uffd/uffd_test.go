package uffd

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The want values were printed by a C program that includes
// <linux/userfaultfd.h> (linux-libc-dev 6.1, x86_64), except the features
// newer than that header (WP_UNPOPULATED, POISON, WP_ASYNC), which are from
// the kernel's include/uapi/linux/userfaultfd.h of 6.7 and later; this
// kernel (6.18) offers features 0x1ffff. They are kernel ABI and never
// change.
func TestABI(t *testing.T) {
	tests := []struct {
		name      string
		got, want uint64
	}{
		{"UFFDIO_API", UFFDIO_API, 0xc018aa3f},
		{"UFFDIO_REGISTER", UFFDIO_REGISTER, 0xc020aa00},
		{"UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, 0x8010aa01},
		{"UFFDIO_WAKE", UFFDIO_WAKE, 0x8010aa02},
		{"UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, 0xc018aa06},
		{"USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW, 0xaa00},
		{"UFFD_API", UFFD_API, 0xaa},
		{"_UFFDIO_REGISTER", _UFFDIO_REGISTER, 0x0},
		{"_UFFDIO_UNREGISTER", _UFFDIO_UNREGISTER, 0x1},
		{"_UFFDIO_WAKE", _UFFDIO_WAKE, 0x2},
		{"_UFFDIO_WRITEPROTECT", _UFFDIO_WRITEPROTECT, 0x6},
		{"_UFFDIO_API", _UFFDIO_API, 0x3f},
		{"UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT, 0x12},
		{"UFFD_PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE, 0x1},
		{"UFFD_PAGEFAULT_FLAG_WP", UFFD_PAGEFAULT_FLAG_WP, 0x2},
		{"UFFD_PAGEFAULT_FLAG_MINOR", UFFD_PAGEFAULT_FLAG_MINOR, 0x4},
		{"UFFDIO_REGISTER_MODE_MISSING", UFFDIO_REGISTER_MODE_MISSING, 0x1},
		{"UFFDIO_REGISTER_MODE_WP", UFFDIO_REGISTER_MODE_WP, 0x2},
		{"UFFDIO_REGISTER_MODE_MINOR", UFFDIO_REGISTER_MODE_MINOR, 0x4},
		{"UFFDIO_WRITEPROTECT_MODE_WP", UFFDIO_WRITEPROTECT_MODE_WP, 0x1},
		{"UFFDIO_WRITEPROTECT_MODE_DONTWAKE", UFFDIO_WRITEPROTECT_MODE_DONTWAKE, 0x2},
		{"UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY, 0x1},
		{"UFFD_FEATURE_PAGEFAULT_FLAG_WP", uint64(FeaturePagefaultFlagWP), 0x1},
		{"UFFD_FEATURE_THREAD_ID", uint64(FeatureThreadID), 0x100},
		{"UFFD_FEATURE_EXACT_ADDRESS", uint64(FeatureExactAddress), 0x800},
		{"UFFD_FEATURE_WP_HUGETLBFS_SHMEM", uint64(FeatureWPHugetlbfsShmem), 0x1000},
		{"UFFD_FEATURE_WP_UNPOPULATED", uint64(FeatureWPUnpopulated), 1 << 13},
		{"UFFD_FEATURE_POISON", uint64(FeaturePoison), 1 << 14},
		{"UFFD_FEATURE_WP_ASYNC", uint64(FeatureWPAsync), 1 << 15},
		{"__NR_userfaultfd", unix.SYS_USERFAULTFD, 0x143},
		{"O_CLOEXEC", unix.O_CLOEXEC, 0x80000},
		{"O_NONBLOCK", unix.O_NONBLOCK, 0x800},
		// struct layouts: sizeof and offsetof.
		{"sizeof(struct uffd_msg)", sizeofMsg, 0x20},
		{"offsetof(uffd_msg, arg.pagefault.flags)", msgOffFlags, 0x8},
		{"offsetof(uffd_msg, arg.pagefault.address)", msgOffAddr, 0x10},
		{"offsetof(uffd_msg, arg.pagefault.feat.ptid)", msgOffPtid, 0x18},
		{"sizeof(struct uffdio_api)", uint64(unsafe.Sizeof(uffdioAPI{})), 0x18},
		{"sizeof(struct uffdio_range)", uint64(unsafe.Sizeof(uffdioRange{})), 0x10},
		{"sizeof(struct uffdio_register)", uint64(unsafe.Sizeof(uffdioRegister{})), 0x20},
		{"sizeof(struct uffdio_writeprotect)", uint64(unsafe.Sizeof(uffdioWriteProtect{})), 0x18},
		{"sizeofAPI", sizeofAPI, 0x18},
		{"sizeofRange", sizeofRange, 0x10},
		{"sizeofRegister", sizeofRegister, 0x20},
		{"sizeofWriteProtect", sizeofWriteProtect, 0x18},
		{"offsetof(uffdio_register, mode)", uint64(unsafe.Offsetof(uffdioRegister{}.Mode)), 0x10},
		{"offsetof(uffdio_register, ioctls)", uint64(unsafe.Offsetof(uffdioRegister{}.Ioctls)), 0x18},
		{"offsetof(uffdio_writeprotect, mode)", uint64(unsafe.Offsetof(uffdioWriteProtect{}.Mode)), 0x10},
		{"offsetof(uffdio_api, ioctls)", uint64(unsafe.Offsetof(uffdioAPI{}.Ioctls)), 0x10},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
	}
}

func TestFeatureString(t *testing.T) {
	for f, want := range map[Feature]string{
		0:                                        "none",
		FeatureWPUnpopulated:                     "WP_UNPOPULATED",
		FeatureWPHugetlbfsShmem | FeatureWPAsync: "WP_HUGETLBFS_SHMEM|WP_ASYNC",
		FeaturePagefaultFlagWP | 1<<40:           "PAGEFAULT_FLAG_WP|bit40",
		FeatureThreadID | FeatureExactAddress | 1<<16: "THREAD_ID|EXACT_ADDRESS|MOVE",
	} {
		if got := f.String(); got != want {
			t.Errorf("Feature(%#x).String() = %q, want %q", uint64(f), got, want)
		}
	}
}
