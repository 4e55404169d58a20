package hostsys

import (
	"os"
	"unsafe"
)

// pageAligned returns the whole pages of b: madvise wants a page-aligned
// start.
func pageAligned(b []byte) []byte {
	ps := os.Getpagesize()
	if off := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) % uintptr(ps)); off != 0 {
		if len(b) < ps-off {
			return nil
		}
		b = b[ps-off:]
	}
	return b[:len(b)/ps*ps]
}
