package replicate

import (
	"hash/crc32"
	"io"
)

// The memory digest identifies the contents of all of guest memory in 64
// bits, and can be updated per page: it is the sum, mod 2^64, over every page
// i of the replica (regions back to back) of mix(i, CRC32C(page i)). Changing
// page i from a to b adds mix(i, b) - mix(i, a). Both sides keep a table of
// page CRCs, so an epoch costs O(its pages), not O(memory). A bit flip in any
// page changes the page's CRC and so, with overwhelming likelihood, the digest.

// pageCRC is the CRC32C of one page.
func pageCRC(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// zeroCRC is the CRC of a zero page.
var zeroCRC = pageCRC(make([]byte, PageSize))

// mix is a bijective 64-bit finaliser (splitmix64) of a page's index and CRC.
func mix(index uint64, crc uint32) uint64 {
	x := index<<32 | uint64(crc)
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// digestTable is the per-page CRC table behind a memory digest.
type digestTable struct {
	crcs   []uint32
	digest uint64
}

// newDigestTable returns the table of a memory of pages zero pages.
func newDigestTable(pages uint64) *digestTable {
	t := &digestTable{crcs: make([]uint32, pages)}
	for i := range t.crcs {
		t.crcs[i] = zeroCRC
		t.digest += mix(uint64(i), zeroCRC)
	}
	return t
}

// delta is what setting page i to crc adds to the digest.
func (t *digestTable) delta(i uint64, crc uint32) uint64 {
	return mix(i, crc) - mix(i, t.crcs[i])
}

// set records page i's new CRC.
func (t *digestTable) set(i uint64, crc uint32) {
	t.digest += t.delta(i, crc)
	t.crcs[i] = crc
}

// DigestMemory computes the memory digest of size bytes read from r from
// offset 0: the regions back to back, as the replica holds them. It is how a
// backup verifies its replica before resuming it, and how tests compare.
func DigestMemory(r io.ReaderAt, size uint64) (uint64, error) {
	buf := make([]byte, 1<<20)
	var d uint64
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		n := min(uint64(len(buf)), size-off)
		if _, err := r.ReadAt(buf[:n], int64(off)); err != nil {
			return 0, err
		}
		for p := uint64(0); p < n; p += PageSize {
			d += mix((off+p)/PageSize, pageCRC(buf[p:p+PageSize]))
		}
	}
	return d, nil
}

// digestSlots computes the memory digest of mapped regions, back to back.
// With crcs (one entry per page) it also records each page's CRC there.
func digestSlots(regions [][]byte, crcs []uint32) uint64 {
	var d, i uint64
	for _, r := range regions {
		for p := 0; p+PageSize <= len(r); p += PageSize {
			c := pageCRC(r[p : p+PageSize])
			if crcs != nil {
				crcs[i] = c
			}
			d += mix(i, c)
			i++
		}
	}
	return d
}

// diffPages returns the indices of up to max pages whose CRC differs between
// a and b (as long as each other), and how many differ in all.
func diffPages(a, b []uint32, max int) (first []uint64, n int) {
	for i := range a {
		if a[i] != b[i] {
			if len(first) < max {
				first = append(first, uint64(i))
			}
			n++
		}
	}
	return first, n
}
