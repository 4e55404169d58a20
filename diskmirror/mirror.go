package diskmirror

import (
	"fmt"
	"io"
	"sync"
)

// Config configures a Mirror.
type Config struct {
	// MemoryLimit bounds the memory held for the records of all epochs not
	// yet committed, together. Past it, an epoch's records go to a spill file
	// in SpillDir; nothing is dropped. 0 means DefaultMemoryLimit.
	MemoryLimit int64
	// SpillDir is where spill files are made (and unlinked at once); "" means
	// os.TempDir().
	SpillDir string
}

func (c Config) memoryLimit() int64 {
	if c.MemoryLimit <= 0 {
		return DefaultMemoryLimit
	}
	return c.MemoryLimit
}

// Mirror is the primary side: it sits on the VMM's disk write path. Each
// write goes to the local image at once and is logged, encoded as a write
// record, under the epoch that is open; a transport takes a closed epoch's
// records with Epoch and ships them to the backup's Replica. It implements
// replicate.OutputGate: the engine opens epochs in its pause and commits
// them when the backup acknowledges.
//
// Concurrency: WriteAt, WriteAtFUA and ReadAt may be called from any
// goroutine; writes are serialized so that the order of the log is the order
// of the writes on the local image. Open is called with the VMM's device
// quiesced (the engine's pause); Commit may run concurrently with Open and
// with writes; Discard and Release run alone. Epoch, Stats and the sync
// methods may be called from any goroutine.
type Mirror struct {
	disk Disk
	size int64
	dir  string
	mem  budget

	// wmu serializes writes with each other and with the switch of the open
	// epoch and of the sync state.
	wmu   sync.Mutex
	cur   *epochLog // the open epoch; nil when not protecting
	track *tracker  // blocks written during the initial sync; nil otherwise
	resid *residual // blocks left at the end of the sync; nil otherwise

	// mu guards logs and each log's closed flag.
	mu   sync.Mutex
	logs []*epochLog // ascending epochs, the open one last
}

// epochLog is the encoded records of one epoch.
type epochLog struct {
	n      uint64
	sp     spool
	enc    encoder
	closed bool  // the end record is written; the log does not change again
	err    error // a write the log could not keep: the epoch cannot be shipped
	sum    Summary
}

func (l *epochLog) log(off int64, p []byte) error {
	for len(p) > 0 {
		k := min(len(p), MaxRecordData)
		if err := l.enc.write(off, p[:k]); err != nil {
			return err
		}
		off += int64(k)
		p = p[k:]
	}
	return nil
}

// NewMirror returns a Mirror over the local image d. It holds no epoch until
// Open: writes pass through unlogged.
func NewMirror(d Disk, cfg Config) (*Mirror, error) {
	size, err := DiskSize(d)
	if err != nil {
		return nil, fmt.Errorf("new mirror: %w", err)
	}
	if err := checkSize(size); err != nil {
		return nil, fmt.Errorf("new mirror: %w", err)
	}
	return &Mirror{disk: d, size: size, dir: cfg.SpillDir, mem: budget{limit: cfg.memoryLimit()}}, nil
}

// Size is the image size in bytes; a Replica must be made for the same size.
func (m *Mirror) Size() int64 { return m.size }

// ReadAt reads the local image.
func (m *Mirror) ReadAt(p []byte, off int64) (int, error) { return m.disk.ReadAt(p, off) }

// WriteAt writes p at off to the local image and logs it under the open
// epoch (and marks its blocks dirty during the initial sync). A write that
// does not lie inside the image is refused (ErrRange) and nothing is written.
// If the log cannot keep the write (its spill file fails), the write is on the
// local image but WriteAt returns an error, and so does Epoch for that epoch:
// a write is never dropped silently.
func (m *Mirror) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > m.size || int64(len(p)) > m.size-off {
		return 0, fmt.Errorf("write %d bytes at %d: %w (%d bytes)", len(p), off, ErrRange, m.size)
	}
	m.wmu.Lock()
	defer m.wmu.Unlock()
	if m.resid != nil && len(p) > 0 {
		if err := m.resid.capture(m.disk, m.size, off, int64(len(p))); err != nil {
			return 0, fmt.Errorf("write %d bytes at %d: %w", len(p), off, err)
		}
	}
	n, err := m.disk.WriteAt(p, off)
	if n > 0 {
		if m.track != nil {
			m.track.mark(off, int64(n))
		}
		if l := m.cur; l != nil && l.err == nil {
			if lerr := l.log(off, p[:n]); lerr != nil {
				l.err = fmt.Errorf("log write of %d bytes at %d in epoch %d: %w", n, off, l.n, lerr)
				return n, l.err
			}
		}
	}
	if err != nil {
		return n, fmt.Errorf("write local image: %w", err)
	}
	return n, nil
}

// Sync makes the local image durable: the guest's flush request.
func (m *Mirror) Sync() error {
	if err := m.disk.Sync(); err != nil {
		return fmt.Errorf("sync local image: %w", err)
	}
	return nil
}

// WriteAtFUA is a write with forced unit access: WriteAt, then Sync. (The
// backup makes every epoch durable when it commits, so the flag needs no
// record of its own.)
func (m *Mirror) WriteAtFUA(p []byte, off int64) (int, error) {
	n, err := m.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, m.Sync()
}

// Open starts epoch n: writes from now on belong to n. It closes the epoch
// before (n-1, its end record written), and ends the initial sync if one is
// running (see StartSync): the blocks still dirty become the residual the
// transport sends with SendResidual. Epochs open in order: after epoch k,
// only k+1.
func (m *Mirror) Open(n uint64) error {
	if n == 0 {
		return fmt.Errorf("open epoch 0: epochs start at 1")
	}
	m.wmu.Lock()
	defer m.wmu.Unlock()
	if m.cur != nil && n != m.cur.n+1 {
		return fmt.Errorf("open epoch %d: epoch %d is open, the next is %d", n, m.cur.n, m.cur.n+1)
	}
	l := &epochLog{n: n, sp: spool{b: &m.mem, dir: m.dir}}
	if err := l.enc.start(&l.sp, streamHeader{Kind: kindEpoch, Size: m.size, Epoch: n}); err != nil {
		l.sp.free()
		return fmt.Errorf("open epoch %d: %w", n, err)
	}
	m.mu.Lock()
	if c := m.cur; c != nil {
		if c.err == nil {
			if err := c.enc.end(); err != nil {
				c.err = fmt.Errorf("end epoch %d: %w", c.n, err)
			}
		}
		c.sum = c.enc.summary()
		c.closed = true
	}
	m.logs = append(m.logs, l)
	m.mu.Unlock()
	m.cur = l
	if m.track != nil {
		m.resid = newResidual(m.track.block, m.track.take(), &m.mem, m.dir)
		m.track = nil
	}
	return nil
}

// Epoch returns epoch n's encoded stream (stream header, write records in the
// order of the writes, end record: see the package doc) once n is closed (the
// next epoch is open), with its summary. Each call returns a new reader of the
// same bytes; a reader stays valid until n is committed or discarded. It is
// an error if n is still open, is not held (never opened, committed,
// discarded or released), or lost a write.
func (m *Mirror) Epoch(n uint64) (io.Reader, Summary, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, l := range m.logs {
		if l.n != n {
			continue
		}
		if !l.closed {
			return nil, Summary{}, fmt.Errorf("epoch %d: still open (its records are taken after the next epoch opens)", n)
		}
		if l.err != nil {
			return nil, Summary{}, fmt.Errorf("epoch %d: %w", n, l.err)
		}
		return l.sp.reader(), l.sum, nil
	}
	return nil, Summary{}, fmt.Errorf("epoch %d: not held (never opened, or already committed, discarded or released)", n)
}

// Commit frees the records of every epoch up to and including n: the backup
// acknowledged n, so they are safe there. Committing an epoch that is still
// open is an error, and frees nothing.
func (m *Mirror) Commit(n uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	i := 0
	for ; i < len(m.logs) && m.logs[i].n <= n; i++ {
		if !m.logs[i].closed {
			return fmt.Errorf("commit epoch %d: epoch %d is still open", n, m.logs[i].n)
		}
	}
	for _, l := range m.logs[:i] {
		l.sp.free()
	}
	m.logs = append(m.logs[:0], m.logs[i:]...)
	return nil
}

// Discard drops the records of every epoch after n, the open one included:
// they will never be committed. Writes are no longer logged (Release
// follows, or a new Open).
func (m *Mirror) Discard(n uint64) error {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	keep := m.logs[:0]
	for _, l := range m.logs {
		if l.n > n {
			l.sp.free()
			continue
		}
		keep = append(keep, l)
	}
	clear(m.logs[len(keep):])
	m.logs = keep
	if m.cur != nil && m.cur.n > n {
		m.cur = nil
	}
	if m.resid != nil {
		m.resid.sp.free()
	}
	m.track, m.resid = nil, nil
	return nil
}

// Release stops protecting: every epoch's records are freed, the sync state
// is dropped, and writes from now on go to the local image only: Discard of
// every epoch after 0, which is all of them (epochs start at 1).
func (m *Mirror) Release() error { return m.Discard(0) }

// MirrorStats is a snapshot of what a Mirror holds.
type MirrorStats struct {
	// Epochs is the number of epochs held (open or not yet committed).
	Epochs int
	// Held is the encoded bytes of their records.
	Held int64
	// Memory is the part of Held in memory (at most Config.MemoryLimit).
	Memory int64
	// Spilled is the part of Held in spill files.
	Spilled int64
}

// Stats reports what m holds. The open epoch's figures may be in motion.
func (m *Mirror) Stats() MirrorStats {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	s := MirrorStats{Epochs: len(m.logs), Memory: m.mem.inUse()}
	for _, l := range m.logs {
		s.Held += l.sp.size()
		s.Spilled += l.sp.spilled()
	}
	return s
}
