package dirtylog

import "unsafe"

// hostAddr is the host virtual address of a slot's mapping.
func hostAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }
