package replicate

import (
	"bytes"
	"sync"
	"sync/atomic"

	"github.com/pierrec/lz4/v4"
)

// arena is the staging for captured pages: a ring of page slots. Epochs
// allocate at the head during their pause and free at the tail once sent, in
// the same order, so a ring is all the bookkeeping needed. Its size is the
// bound on staged memory (P6).
type arena struct {
	mu         sync.Mutex
	buf        []byte
	size       uint64 // pages
	head, used uint64
	freed      chan struct{}
}

func newArena(pages uint64) *arena {
	return &arena{buf: make([]byte, pages*PageSize), size: pages, freed: make(chan struct{}, 1)}
}

// prefault writes to every page of the arena, so that copies into it do not
// fault. Call it before the first alloc.
func (a *arena) prefault() {
	for i := 0; i < len(a.buf); i += PageSize {
		a.buf[i] = 0
	}
}

// has reports whether n pages are free now.
func (a *arena) has(n uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.size-a.used >= n
}

// wait blocks until n pages are free (n <= size), and reports true, or until
// lost is closed, and reports false.
func (a *arena) wait(n uint64, lost <-chan struct{}) bool {
	for !a.has(n) {
		select {
		case <-a.freed:
		case <-lost:
			return false
		}
	}
	return true
}

// alloc takes n pages at the head; the caller waited for them.
func (a *arena) alloc(n uint64) uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	start := a.head
	a.head = (a.head + n) % a.size
	a.used += n
	return start
}

// free returns the n oldest pages.
func (a *arena) free(n uint64) {
	a.mu.Lock()
	a.used -= n
	a.mu.Unlock()
	select {
	case a.freed <- struct{}{}:
	default:
	}
}

// page returns page k of an allocation starting at start.
func (a *arena) page(start, k uint64) []byte {
	i := (start + k) % a.size * PageSize
	return a.buf[i : i+PageSize : i+PageSize]
}

// batch is up to MaxBatchPages pages of a job, compressed by a worker into
// one Pages message.
type batch struct {
	p        *Primary
	job      *epochJob
	from, to int
	msg      []byte   // header and payload
	idx      []uint64 // replica page index of each page
	crc      []uint32 // and its CRC
	zeros    int
	done     chan struct{}
}

var batchPool = sync.Pool{New: func() any { return &batch{done: make(chan struct{}, 1)} }}

func getBatch(p *Primary, job *epochJob, from, to int) *batch {
	b := batchPool.Get().(*batch)
	b.p, b.job, b.from, b.to, b.zeros = p, job, from, to, 0
	return b
}

func putBatch(b *batch) {
	b.p, b.job = nil, nil
	batchPool.Put(b)
}

var zeroPage = make([]byte, PageSize)

// compressWorker builds batches: for each page, a private copy (live pages
// may change under it), its CRC, and zero, LZ4 or raw encoding, whichever is
// smallest.
func (p *Primary) compressWorker() {
	var c lz4.Compressor
	page := make([]byte, PageSize)
	dst := make([]byte, lz4.CompressBlockBound(PageSize))
	for b := range p.work {
		b.build(&c, page, dst, &p.hold)
		b.done <- struct{}{}
	}
}

func (b *batch) build(c *lz4.Compressor, page, dst []byte, hold *workerHold) {
	j := b.job
	b.msg = pagesHeader(append(b.msg[:0], make([]byte, HeaderSize)...))
	b.idx, b.crc = b.idx[:0], b.crc[:0]
	for k := b.from; k < b.to; k++ {
		hold.wait()
		src := b.p.data(j, k)
		if !j.staged {
			copy(page, src)
			src = page
		}
		gpa := j.gpas[k]
		idx, _ := b.p.lay.index(gpa)
		b.idx = append(b.idx, idx)
		if bytes.Equal(src, zeroPage) {
			b.zeros++
			b.crc = append(b.crc, zeroCRC)
			b.msg = appendPageEntry(b.msg, gpa, encZero, nil)
			continue
		}
		b.crc = append(b.crc, pageCRC(src))
		if n, err := c.CompressBlock(src, dst); err == nil && n > 0 && n < PageSize {
			b.msg = appendPageEntry(b.msg, gpa, encLZ4, dst[:n])
		} else {
			b.msg = appendPageEntry(b.msg, gpa, encRaw, src)
		}
	}
	setPagesCount(b.msg[HeaderSize:], b.to-b.from)
	Header{Type: MsgPages, Length: uint32(len(b.msg) - HeaderSize), Epoch: j.epoch}.put(b.msg)
}

// workerHold makes the compression workers wait, between pages, while it is
// set: during a pause, when the pause needs the CPUs more than the pipeline.
type workerHold struct {
	on   atomic.Bool
	mu   sync.Mutex
	cond *sync.Cond
}

func (h *workerHold) set(on bool) {
	h.mu.Lock()
	if h.cond == nil {
		h.cond = sync.NewCond(&h.mu)
	}
	h.on.Store(on)
	h.mu.Unlock()
	if !on {
		h.cond.Broadcast()
	}
}

// wait returns at once unless the hold is set; then it waits until it is not.
func (h *workerHold) wait() {
	if h == nil || !h.on.Load() {
		return
	}
	h.mu.Lock()
	for h.on.Load() {
		h.cond.Wait()
	}
	h.mu.Unlock()
}
