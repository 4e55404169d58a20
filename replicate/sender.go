package replicate

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pierrec/lz4/v4"

	"github.com/repagent/repagent/internal/cpuclock"
	"github.com/repagent/repagent/internal/faultpoint"
	"github.com/repagent/repagent/internal/hostsys"
)

// The primary's data path, page by page: the pause copies a dirty page into
// staging (capture.go); a compression worker reads it once from there for
// its CRC (zero pages are found by a compare that stops at the first nonzero
// word), tries LZ4 only where the compression policy says it pays, and
// writes the page's entry; the sender writes the batch's header and entries
// and, in the same vectored write, the page data straight from staging (raw
// pages) or from the worker's buffer (LZ4 output). The epoch's checksum
// covers the entries, whose CRCs cover the data, so no byte of a page is read
// for a CRC twice and none is copied into a message.

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

// prefault makes every page of the arena resident, so that copies into it
// do not fault. It returns a function that does the work (to run on its own
// goroutine) and whether that may run beside allocations: with
// MADV_POPULATE_WRITE (Linux 5.14) the kernel populates the pages without
// writing them; without it, a byte is written per page, and the work must
// be done before the first alloc.
func (a *arena) prefault() (work func(), concurrent bool) {
	if hostsys.CanPopulate(a.buf) {
		return func() { hostsys.Populate(a.buf) }, true
	}
	return func() {
		for i := 0; i < len(a.buf); i += PageSize {
			a.buf[i] = 0
		}
	}, false
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

// offset is the byte offset in buf of page k of an allocation at start.
func (a *arena) offset(start, k uint64) int { return int((start + k) % a.size * PageSize) }

// page returns page k of an allocation starting at start.
func (a *arena) page(start, k uint64) []byte {
	i := a.offset(start, k)
	return a.buf[i : i+PageSize : i+PageSize]
}

// seg is a piece of a batch's page data: bytes of staging (staged) or of the
// batch's own buffer.
type seg struct {
	staged bool
	off, n int
}

// batch is up to MaxBatchPages pages of a job, built by a worker into one
// Pages message: head is its header, count and entries; the data follows in
// segs, written from where it lies (in version 2, each page's after its
// entry: see buffers).
type batch struct {
	p        *Primary
	job      *epochJob
	from, to int
	version  uint32 // the session's protocol version
	head     []byte // header, count, pad, entries
	data     []byte // LZ4 output and private copies of live pages
	segs     []seg  // the data in order
	bufs     net.Buffers
	idx      []uint64 // replica page index of each page
	crc      []uint32 // and its CRC
	zeros    int
	lz4      int           // pages sent compressed
	size     int           // bytes of data
	cpu      time.Duration // the worker's CPU time building it
	done     chan struct{}
}

// batchData is a batch's data buffer: room for every page of a live batch.
const batchData = MaxBatchPages * PageSize

var batchPool = sync.Pool{New: func() any {
	return &batch{done: make(chan struct{}, 1), head: make([]byte, 0, HeaderSize+pagesMeta(MaxBatchPages)),
		data: make([]byte, 0, batchData), idx: make([]uint64, 0, MaxBatchPages), crc: make([]uint32, 0, MaxBatchPages)}
}}

func getBatch(p *Primary, job *epochJob, from, to int) *batch {
	b := batchPool.Get().(*batch)
	b.p, b.job, b.from, b.to, b.version = p, job, from, to, p.version
	return b
}

func putBatch(b *batch) {
	b.p, b.job = nil, nil
	clear(b.bufs)
	b.bufs = b.bufs[:0]
	batchPool.Put(b)
}

var zeroPage = make([]byte, PageSize)

// worker is a compression goroutine's own buffers.
type worker struct {
	c   lz4.Compressor
	out [PageSize]byte // LZ4 output, before it is kept
}

// compressWorker builds batches, each one's CPU time metered.
func (p *Primary) compressWorker() {
	var w worker
	var m cpuclock.Meter
	for b := range p.work {
		m.Start()
		b.build(&w, &p.hold, &m)
		b.cpu = m.Take()
		b.done <- struct{}{}
	}
}

// build encodes the batch's pages: for each, its CRC (from the staged copy,
// or from a private copy of a live page, which the guest may change under
// it), and zero, LZ4 or raw encoding as the compression policy says.
func (b *batch) build(w *worker, hold *workerHold, m *cpuclock.Meter) {
	j, p := b.job, b.p
	n := b.to - b.from
	b.head = b.head[:HeaderSize+pagesMeta(n)]
	meta := b.head[HeaderSize:]
	b.data, b.segs, b.idx, b.crc = b.data[:0], b.segs[:0], b.idx[:0], b.crc[:0]
	b.zeros, b.lz4, b.size = 0, 0, 0
	for k := b.from; k < b.to; k++ {
		hold.wait(m)
		gpa := j.gpas[k]
		idx, _ := p.lay.index(gpa)
		hole := j.holes != nil && j.holes[idx/64]&(1<<(idx%64)) != 0
		var src []byte
		s := seg{staged: j.staged}
		switch {
		case hole: // never written: zero, and not to be read (see MemoryBacking)
		case j.staged:
			s.off = p.stage.offset(j.start, uint64(k))
			src = p.stage.buf[s.off : s.off+PageSize]
		default:
			s.off = len(b.data)
			b.data = append(b.data, p.lay.page(gpa)...)
			src = b.data[s.off:]
		}
		enc, crc, l := uint16(encRaw), zeroCRC, PageSize
		switch {
		case hole || bytes.Equal(src, zeroPage):
			enc, l = encZero, 0
			b.zeros++
			if !j.staged && !hole {
				b.data = b.data[:s.off]
			}
		default:
			crc = pageCRC(src)
			if !p.policy.try(idx) {
				break
			}
			m := compressPage(&w.c, src, w.out[:])
			p.policy.result(idx, m > 0)
			if m == 0 {
				break
			}
			enc, l = encLZ4, m
			b.lz4++
			if !j.staged {
				b.data = b.data[:s.off] // the private copy is done with
			}
			s = seg{off: len(b.data)}
			b.data = append(b.data, w.out[:m]...)
		}
		putPageEntry(b.version, meta, k-b.from, gpa, crc, enc, l)
		b.idx = append(b.idx, idx)
		b.crc = append(b.crc, crc)
		if l > 0 {
			s.n = l
			b.addSeg(s)
		}
		b.size += l
	}
	putPagesCount(meta, n)
	Header{Type: MsgPages, Length: uint32(pagesMeta(n) + b.size), Epoch: j.epoch}.put(b.head)
}

// addSeg appends s to the batch's data, merging it with the last piece when
// they are adjacent (a run of raw pages in staging is one piece; not in
// version 2, where each page's entry comes between).
func (b *batch) addSeg(s seg) {
	if k := len(b.segs) - 1; k >= 0 && b.version != 2 && b.segs[k].staged == s.staged && b.segs[k].off+b.segs[k].n == s.off {
		b.segs[k].n += s.n
		return
	}
	b.segs = append(b.segs, s)
}

// buffers lists the batch's message for a vectored write: head, then the
// data pieces where they lie. In version 2 each entry is followed by its
// page's data: the header and count, then each entry of head and its piece.
func (b *batch) buffers() *net.Buffers {
	if b.version == 2 {
		b.bufs = append(b.bufs[:0], b.head[:HeaderSize+pagesFixed])
		j := 0
		for k := range b.to - b.from {
			e := b.head[HeaderSize+pagesMeta(k) : HeaderSize+pagesMeta(k+1)]
			b.bufs = append(b.bufs, e)
			if entryLen(2, e) > 0 {
				b.bufs = append(b.bufs, b.segData(b.segs[j]))
				j++
			}
		}
		return &b.bufs
	}
	b.bufs = append(b.bufs[:0], b.head)
	for _, s := range b.segs {
		b.bufs = append(b.bufs, b.segData(s))
	}
	return &b.bufs
}

// segData is the bytes of a piece of the batch's data.
func (b *batch) segData(s seg) []byte {
	if s.staged {
		return b.p.stage.buf[s.off : s.off+s.n]
	}
	return b.data[s.off : s.off+s.n]
}

// checksum adds the batch's message to an epoch's checksum: its header,
// count and entries (version 3: the entries' CRCs cover the data), or all of
// it (version 2).
func (b *batch) checksum(crc uint32) uint32 {
	if b.version != 2 {
		return crc32.Update(crc, castagnoli, b.head)
	}
	for _, piece := range *b.buffers() {
		crc = crc32.Update(crc, castagnoli, piece)
	}
	return crc
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

// wait returns at once unless the hold is set; then it waits until it is
// not, with m (if any) stopped meanwhile.
func (h *workerHold) wait(m *cpuclock.Meter) {
	if h == nil || !h.on.Load() {
		return
	}
	if m != nil {
		m.Stop()
		defer m.Start()
	}
	h.mu.Lock()
	for h.on.Load() {
		h.cond.Wait()
	}
	h.mu.Unlock()
}

// sendLoop sends jobs in order, one at a time.
func (p *Primary) sendLoop() {
	for job := range p.jobs {
		if job.lazy != nil {
			<-job.lazy.done // copied behind the guest (it never waits on the session)
		}
		if p.sess.state() == sessRunning {
			err := error(nil)
			if job.lazy != nil {
				err = job.lazy.err
			}
			if err == nil {
				err = p.send(job)
			}
			if err != nil {
				var le *linkError
				if !errors.As(err, &le) {
					p.abort(err) // an audit mismatch: the link is fine
				}
				p.fail(err)
			}
		}
		if job.staged {
			p.stage.free(uint64(len(job.gpas)))
		}
		if job.auditCRCs != nil {
			select {
			case p.auditCRCs <- job.auditCRCs:
			default:
			}
			job.auditCRCs = nil
		}
		if job.done != nil {
			close(job.done)
		}
		close(job.sent)
		if job.kind == kindPrecopy {
			<-p.inflight // a checkpoint's token goes with its ack
		} else {
			p.putGPAList(job.gpas)
		}
	}
}

// send compresses a job's pages in parallel and writes them in order, then
// (for a checkpoint) the stream's part and the state, then the end record.
func (p *Primary) send(job *epochJob) error {
	// The sending's CPU time: all but its waits for workers, and the device
	// stream (the engine's CPU figures are the memory path's).
	var m cpuclock.Meter
	m.Start()
	defer func() { m.Stop(); job.cpu.Add(int64(m.Total())) }()
	st := job.stats
	hdrEpoch := job.epoch
	crc := uint32(0)
	var wire uint64
	nb := (len(job.gpas) + MaxBatchPages - 1) / MaxBatchPages
	depth := cap(p.work)
	window := make([]*batch, 0, depth)
	next := 0
	dispatch := func() {
		from := next * MaxBatchPages
		b := getBatch(p, job, from, min(from+MaxBatchPages, len(job.gpas)))
		window = append(window, b)
		p.work <- b
		next++
	}
	defer func() {
		// On an error, let the workers finish what they hold.
		for _, b := range window {
			<-b.done
			putBatch(b)
		}
	}()
	for i := 0; i < nb; i++ {
		for next < nb && len(window) < depth {
			dispatch()
		}
		b := window[0]
		// Shift, not reslice: window keeps its capacity, so a long epoch's
		// dispatches never reallocate it.
		window = window[:copy(window, window[1:])]
		select {
		case <-b.done:
		default:
			m.Stop()
			<-b.done
			m.Start()
		}
		err := p.writeBatch(b)
		crc = b.checksum(crc)
		wire += uint64(len(b.head) + b.size)
		job.cpu.Add(int64(b.cpu))
		for k, idx := range b.idx {
			p.digest.set(idx, b.crc[k])
			if p.sentIn != nil {
				p.sentIn[idx] = uint32(job.epoch)
			}
		}
		st.ZeroPages += b.zeros
		st.LZ4Pages += b.lz4
		putBatch(b)
		if err != nil {
			return wrapSend(err, "send epoch %d", hdrEpoch)
		}
		if i == 0 && job.kind == kindPrecopy {
			p.hook(faultpoint.Sync, uint64(job.round))
		}
		if i == nb/2 && job.kind == kindCheckpoint {
			p.hook(faultpoint.Send, job.epoch)
		}
	}
	if job.kind == kindCheckpoint {
		if nb == 0 {
			p.hook(faultpoint.Send, job.epoch) // no pages: half sent is nothing sent
		}
		if p.cfg.Stream != nil {
			m.Stop()
			n, err := p.sendStream(job.epoch, st, &crc)
			m.Start()
			wire += n
			if err != nil {
				return err
			}
		}
		hb, err := p.writeFrame(MsgState, hdrEpoch, job.state)
		if err != nil {
			return wrapSend(err, "send epoch %d state", hdrEpoch)
		}
		crc = crc32.Update(crc32.Update(crc, castagnoli, hb[:]), castagnoli, job.state)
		wire += HeaderSize + uint64(len(job.state))
		st.StateBytes = uint64(len(job.state))
	}
	if job.audited && job.audit != p.digest.digest {
		return p.auditError(job)
	}
	st.Digest, st.Audited = p.digest.digest, job.audited
	st.RawBytes = uint64(len(job.gpas)) * PageSize
	end := End{Pages: uint64(len(job.gpas)), Digest: p.digest.digest, Checksum: crc, Kind: job.kind, Round: job.round}
	p.endMsg = encodeMsg(p.endMsg[:0], MsgEnd, hdrEpoch, appendEnd(p.endPay[:0], end))
	msg := p.endMsg
	st.WireBytes = wire + uint64(len(msg))
	// Counted now: the ack may be handled before the end record's write
	// returns (that small write goes uncounted).
	m.Stop()
	job.cpu.Add(int64(m.Take()))
	if job.kind == kindCheckpoint {
		st.Transfer = time.Since(st.Start.Add(st.Pause))
		if job.live {
			st.Transfer = 0
		}
		p.amu.Lock()
		p.sent = append(p.sent, pendingEpoch{st, job.ready, &job.cpu})
		p.amu.Unlock()
		// Before the write: its ack may be handled before the write returns,
		// and finish must never see an ack newer than lastSent.
		p.lastSent.Store(job.epoch)
	}
	if err := p.writeMsg(msg); err != nil {
		return wrapSend(err, "send end of epoch %d", hdrEpoch)
	}
	if job.kind == kindCheckpoint {
		p.hook(faultpoint.Sent, job.epoch)
	}
	return nil
}

// wrapSend adds what was being sent to a send error; a linkError stays one
// (errors.As).
func wrapSend(err error, format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, err)...)
}

// writeBatch writes a built batch: header and entries, then the data from
// where it lies, in one vectored write.
func (p *Primary) writeBatch(b *batch) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if err := p.conn.writeBuffers(b.buffers()); err != nil {
		return &linkError{err}
	}
	return nil
}
