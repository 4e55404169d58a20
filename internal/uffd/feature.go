package uffd

import (
	"math/bits"
	"strconv"
	"strings"
)

// Feature is a set of UFFD_FEATURE_* bits, as UFFDIO_API offers and enables
// them.
type Feature uint64

// The features this package knows by name. Values from <linux/userfaultfd.h>;
// the last three postdate the 6.1 header installed here and come from the
// kernel's later header (6.4: WP_UNPOPULATED, 6.6: POISON, 6.7: WP_ASYNC).
const (
	// FeaturePagefaultFlagWP: write-protect faults are reported (with
	// UFFD_PAGEFAULT_FLAG_WP). Open always requires it.
	FeaturePagefaultFlagWP Feature = 1 << 0
	// FeatureThreadID: a fault carries the faulting thread's id (Fault.TID).
	FeatureThreadID Feature = 1 << 8
	// FeatureExactAddress: the fault address is not masked to its page.
	// This package's Fault.Addr is always page-aligned; do not enable it.
	FeatureExactAddress Feature = 1 << 11
	// FeatureWPHugetlbfsShmem: write-protect mode works on shmem (memfd)
	// and hugetlbfs, not only anonymous memory. Open enables it when offered.
	FeatureWPHugetlbfsShmem Feature = 1 << 12
	// FeatureWPUnpopulated: protecting a never-touched anonymous page
	// protects it too (the kernel leaves a PTE marker), so its first write
	// faults. Open enables it when offered.
	FeatureWPUnpopulated Feature = 1 << 13
	// FeaturePoison: UFFDIO_POISON exists. Not used here.
	FeaturePoison Feature = 1 << 14
	// FeatureWPAsync: the kernel resolves write-protect faults itself, with
	// no message: useless for copy-before-write (nothing gets copied), so
	// Open never enables it unless asked.
	FeatureWPAsync Feature = 1 << 15
)

var featureNames = map[Feature]string{
	1 << 0:  "PAGEFAULT_FLAG_WP",
	1 << 1:  "EVENT_FORK",
	1 << 2:  "EVENT_REMAP",
	1 << 3:  "EVENT_REMOVE",
	1 << 4:  "MISSING_HUGETLBFS",
	1 << 5:  "MISSING_SHMEM",
	1 << 6:  "EVENT_UNMAP",
	1 << 7:  "SIGBUS",
	1 << 8:  "THREAD_ID",
	1 << 9:  "MINOR_HUGETLBFS",
	1 << 10: "MINOR_SHMEM",
	1 << 11: "EXACT_ADDRESS",
	1 << 12: "WP_HUGETLBFS_SHMEM",
	1 << 13: "WP_UNPOPULATED",
	1 << 14: "POISON",
	1 << 15: "WP_ASYNC",
	1 << 16: "MOVE",
}

// String names the bits the way the header does, without the UFFD_FEATURE_
// prefix, joined by "|": "WP_HUGETLBFS_SHMEM|WP_UNPOPULATED". Bits without a
// name print as bit numbers.
func (f Feature) String() string {
	if f == 0 {
		return "none"
	}
	var b strings.Builder
	for f != 0 {
		bit := Feature(1) << bits.TrailingZeros64(uint64(f))
		f &^= bit
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		if name, ok := featureNames[bit]; ok {
			b.WriteString(name)
		} else {
			b.WriteString("bit")
			b.WriteString(strconv.Itoa(bits.TrailingZeros64(uint64(bit))))
		}
	}
	return b.String()
}
