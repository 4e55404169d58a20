package replicate

import (
	"fmt"
	"sync/atomic"

	"github.com/pierrec/lz4/v4"
)

// Compression says when the engine compresses a page with LZ4.
type Compression int

const (
	// CompressAuto tries LZ4 where it has been paying: each region of guest
	// memory (2 MiB) is sampled, and while the pages sampled there do not
	// shrink below compressKeep of their size the region's pages go raw,
	// with a fresh sample every so often (at most every compressMaxSkip
	// pages). Compressible memory compresses as with CompressAlways;
	// incompressible memory costs an LZ4 attempt on one page in 64.
	CompressAuto Compression = iota
	// CompressAlways tries LZ4 on every page that is not zero.
	CompressAlways
	// CompressNever sends every page that is not zero raw.
	CompressNever
)

var compressionNames = []string{CompressAuto: "auto", CompressAlways: "always", CompressNever: "never"}

func (c Compression) String() string {
	if int(c) >= 0 && int(c) < len(compressionNames) {
		return compressionNames[c]
	}
	return fmt.Sprintf("compression(%d)", int(c))
}

// ParseCompression parses auto, always or never (the CLI's --compress).
func ParseCompression(s string) (Compression, error) {
	for c, n := range compressionNames {
		if n == s {
			return Compression(c), nil
		}
	}
	return 0, fmt.Errorf("unknown compression %q (want auto, always or never)", s)
}

const (
	// compressKeep is the most an LZ4 page may take and still be sent
	// compressed: 97% of a page. Past it, the bytes saved do not pay for
	// the backup's decompression, and the region is deemed incompressible.
	compressKeep = PageSize * 97 / 100
	// compressRegionShift makes a region of 512 pages (2 MiB).
	compressRegionShift = 9
	// compressMaxSkip bounds how many pages of an incompressible region go
	// raw before the next sample, so a region whose contents change is
	// noticed within that many of its pages.
	compressMaxSkip = 64
)

// compressPolicy decides, page by page, whether to try LZ4. Workers consult
// and update it concurrently; its counters are advisory (a lost update only
// moves a sample), so they need no lock.
type compressPolicy struct {
	mode Compression
	// Per region: pages to send raw before the next sample, and the distance
	// between samples (doubling while samples fail, up to compressMaxSkip).
	skip, step []atomic.Uint32
}

func newCompressPolicy(mode Compression, pages uint64) *compressPolicy {
	c := &compressPolicy{mode: mode}
	if mode == CompressAuto {
		regions := (pages + 1<<compressRegionShift - 1) >> compressRegionShift
		c.skip = make([]atomic.Uint32, regions)
		c.step = make([]atomic.Uint32, regions)
	}
	return c
}

// try reports whether to attempt LZ4 on replica page idx.
func (c *compressPolicy) try(idx uint64) bool {
	switch c.mode {
	case CompressAlways:
		return true
	case CompressNever:
		return false
	}
	s := &c.skip[idx>>compressRegionShift]
	if n := s.Load(); n > 0 {
		s.Store(n - 1)
		return false
	}
	return true
}

// result records the outcome of an attempt on page idx.
func (c *compressPolicy) result(idx uint64, paid bool) {
	if c.mode != CompressAuto {
		return
	}
	r := idx >> compressRegionShift
	if paid {
		c.step[r].Store(0)
		c.skip[r].Store(0)
		return
	}
	step := min(2*c.step[r].Load()+1, compressMaxSkip)
	c.step[r].Store(step)
	c.skip[r].Store(step)
}

// compressPage tries LZ4 on src into dst (at least compressKeep bytes) and
// returns the compressed length, or 0 if the page does not shrink to
// compressKeep bytes.
func compressPage(c *lz4.Compressor, src, dst []byte) int {
	n, err := c.CompressBlock(src, dst[:compressKeep])
	if err != nil || n <= 0 || n > compressKeep {
		return 0
	}
	return n
}
