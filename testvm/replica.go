package testvm

import "os"

// NewMemFile returns a new memfd of size bytes, zero-filled: the memory a
// backup keeps its replica in, and hands to Restore on failover.
func NewMemFile(size uint64) (*os.File, error) { return newMemFile(size) }
