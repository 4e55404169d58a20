package diskmirror

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"runtime"
	"sync"
)

// Initial-sync block sizes and limits.
const (
	// MinBlockSize and MaxBlockSize bound the sync's block size (a power of
	// two). A block travels as one write record, so at most MaxRecordData.
	MinBlockSize = 4 << 10
	MaxBlockSize = MaxRecordData
	// DefaultBlockSize is the block size when SyncConfig.Block is 0: 1 MiB
	// blocks make a 16-byte-per-block hash list of 16 KiB per GiB of image
	// (16 MiB for 1 TiB), at the cost of resending a whole MiB for a small
	// write made during the sync.
	DefaultBlockSize = 1 << 20
	// MaxBlocks is the most blocks an image has in a hash list (a 256 MiB
	// list). Larger images need larger blocks.
	MaxBlocks = 1 << 24
	// HashSize is the size of a block hash.
	HashSize = 16
)

// Hash is a block's hash: the first 16 bytes of the SHA-256 of its bytes. The
// guest controls what the primary's blocks hold, so the hash must resist a
// crafted collision (a CRC would not: a guest could make a block that
// matches a stale one on the backup and is then never sent); 128 bits of
// SHA-256 leave 2^64 work for a birthday collision, and with SHA-NI it hashes
// at well over 1 GB/s. An all-zero block's hash is computed once.
type Hash [HashSize]byte

func checkBlockSize(block int64) error {
	if block < MinBlockSize || block > MaxBlockSize || block&(block-1) != 0 {
		return fmt.Errorf("block size %d (want a power of two from %d to %d)", block, MinBlockSize, MaxBlockSize)
	}
	return nil
}

// numBlocks is the number of blocks of an image, the last one possibly short.
func numBlocks(size, block int64) int64 { return (size + block - 1) / block }

func checkBlocks(size, block int64) error {
	if err := checkSize(size); err != nil {
		return err
	}
	if err := checkBlockSize(block); err != nil {
		return err
	}
	if n := numBlocks(size, block); n > MaxBlocks {
		return fmt.Errorf("image of %d bytes in %d-byte blocks is %d blocks, more than %d (use larger blocks)",
			size, block, n, MaxBlocks)
	}
	return nil
}

var zeroBlock [MaxBlockSize]byte

var zeroHashes sync.Map // block length → Hash

func hashBlock(b []byte) Hash {
	if bytes.Equal(b, zeroBlock[:len(b)]) {
		if h, ok := zeroHashes.Load(len(b)); ok {
			return h.(Hash)
		}
		h := sumBlock(b)
		zeroHashes.Store(len(b), h)
		return h
	}
	return sumBlock(b)
}

func sumBlock(b []byte) Hash {
	s := sha256.Sum256(b)
	return Hash(s[:HashSize])
}

// HashImage hashes the image r of size bytes in blocks of block bytes (the
// last one possibly short), with one goroutine per CPU.
func HashImage(r io.ReaderAt, size int64, block int) ([]Hash, error) {
	bs := int64(block)
	if err := checkBlocks(size, bs); err != nil {
		return nil, fmt.Errorf("hash image: %w", err)
	}
	n := numBlocks(size, bs)
	hs := make([]Hash, n)
	workers := int64(min(runtime.GOMAXPROCS(0), 8))
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			buf := make([]byte, block)
			for i := w; i < n; i += workers {
				b := buf[:min(bs, size-i*bs)]
				if _, err := r.ReadAt(b, i*bs); err != nil {
					errs[w] = fmt.Errorf("hash image: read block %d (%d bytes at %d): %w", i, len(b), i*bs, err)
					return
				}
				hs[i] = hashBlock(b)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return hs, nil
}

// DiffBlocks returns the indexes of the blocks whose hashes differ, in
// ascending order: the blocks the primary sends in the sync's first round.
// Both lists must be of the same image in the same blocks.
func DiffBlocks(local, remote []Hash) ([]int64, error) {
	if len(local) != len(remote) {
		return nil, fmt.Errorf("diff blocks: %d local hashes, %d remote (not the same image or block size)", len(local), len(remote))
	}
	var d []int64
	for i := range local {
		if local[i] != remote[i] {
			d = append(d, int64(i))
		}
	}
	return d, nil
}

// EncodeHashes writes a hash list of an image of size bytes in blocks of
// block bytes:
//
//	stream header  kind 3, block size, image size, epoch 0
//	hashes         one 16-byte Hash per block, in block order
//	crc            uint32, CRC32C of every byte before it
func EncodeHashes(w io.Writer, hs []Hash, size int64, block int) error {
	if err := checkBlocks(size, int64(block)); err != nil {
		return fmt.Errorf("encode hashes: %w", err)
	}
	if n := numBlocks(size, int64(block)); int64(len(hs)) != n {
		return fmt.Errorf("encode hashes: %d hashes for an image of %d blocks", len(hs), n)
	}
	b := make([]byte, StreamHeaderSize, StreamHeaderSize+len(hs)*HashSize+4)
	streamHeader{Version: Version, Kind: kindHashes, Block: uint32(block), Size: size}.put(b)
	for _, h := range hs {
		b = append(b, h[:]...)
	}
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("encode hashes: %w", err)
	}
	return nil
}

// HashListSize is the length in bytes of the hash list EncodeHashes makes for
// an image of size bytes in blocks of block bytes (a transport that carries
// it in pieces knows when it has all of it), or -1 if size or block is
// invalid.
func HashListSize(size int64, block int) int64 {
	if checkBlocks(size, int64(block)) != nil {
		return -1
	}
	return StreamHeaderSize + numBlocks(size, int64(block))*HashSize + 4
}

// DecodeHashes reads a hash list for an image of size bytes and returns the
// hashes and the block size. On error it returns no hashes, only the error
// (wrapping ErrFormat and naming the problem).
func DecodeHashes(r io.Reader, size int64) ([]Hash, int, error) {
	var hb [StreamHeaderSize]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return nil, 0, readErr("hash list header", err)
	}
	h, err := parseStreamHeader(hb[:], kindHashes, size)
	if err != nil {
		return nil, 0, err
	}
	if err := checkBlocks(size, int64(h.Block)); err != nil {
		return nil, 0, formatErr("hash list: %v", err)
	}
	n := numBlocks(size, int64(h.Block))
	crc := crc32.Update(0, castagnoli, hb[:])
	hs := make([]Hash, 0, min(n, 1<<16))
	var buf [4096 * HashSize]byte
	for rem := n; rem > 0; {
		k := min(rem, int64(len(buf)/HashSize))
		b := buf[:k*HashSize]
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, 0, readErr(fmt.Sprintf("hash list of %d blocks", n), err)
		}
		crc = crc32.Update(crc, castagnoli, b)
		for i := range k {
			hs = append(hs, Hash(b[i*HashSize:]))
		}
		rem -= k
	}
	var cb [4]byte
	if _, err := io.ReadFull(r, cb[:]); err != nil {
		return nil, 0, readErr("hash list checksum", err)
	}
	if c := binary.LittleEndian.Uint32(cb[:]); c != crc {
		return nil, 0, formatErr("hash list checksum %#08x, the list's is %#08x", c, crc)
	}
	var one [1]byte
	if k, err := io.ReadFull(r, one[:]); k > 0 {
		return nil, 0, formatErr("trailing bytes after the hash list")
	} else if err != io.EOF {
		return nil, 0, fmt.Errorf("read after the hash list: %w", err)
	}
	return hs, int(h.Block), nil
}

// tracker records the blocks written during the initial sync.
type tracker struct {
	block int64
	bits  []uint64
	count int
}

func newTracker(size, block int64) *tracker {
	return &tracker{block: block, bits: make([]uint64, (numBlocks(size, block)+63)/64)}
}

func (t *tracker) mark(off, n int64) {
	for b := off / t.block; b <= (off+n-1)/t.block; b++ {
		if w, m := &t.bits[b/64], uint64(1)<<(b%64); *w&m == 0 {
			*w |= m
			t.count++
		}
	}
}

// take returns the marked blocks in ascending order and clears them.
func (t *tracker) take() []int64 {
	d := make([]int64, 0, t.count)
	for i, w := range t.bits {
		for w != 0 {
			d = append(d, int64(i*64+bits.TrailingZeros64(w)))
			w &= w - 1
		}
		t.bits[i] = 0
	}
	t.count = 0
	return d
}

// residual is the blocks still dirty when the sync ended (at Open): they must
// reach the backup as they were at that cut, not as later epochs left them.
// A write to one not yet sent first saves its old contents (copy before
// write) in a spool that shares the Mirror's memory budget and spills past
// it, so a large residual costs disk, not memory.
type residual struct {
	block   int64
	blocks  []int64
	pending map[int64]bool
	saved   map[int64]int64 // block → offset of its old contents in sp
	sp      spool
}

func newResidual(block int64, blocks []int64, mem *budget, dir string) *residual {
	r := &residual{block: block, blocks: blocks, pending: make(map[int64]bool, len(blocks)),
		saved: make(map[int64]int64), sp: spool{b: mem, dir: dir}}
	for _, b := range blocks {
		r.pending[b] = true
	}
	return r
}

// blockLen is the length of block b of an image of size bytes.
func (r *residual) blockLen(size, b int64) int64 { return min(r.block, size-b*r.block) }

// capture saves the contents of the pending blocks a write of n bytes at off
// is about to change. The caller holds Mirror.wmu.
func (r *residual) capture(d Disk, size, off, n int64) error {
	for b := off / r.block; b <= (off+n-1)/r.block; b++ {
		if _, ok := r.saved[b]; !r.pending[b] || ok {
			continue
		}
		buf := make([]byte, r.blockLen(size, b))
		if _, err := d.ReadAt(buf, b*r.block); err != nil {
			return fmt.Errorf("save residual block %d before a write: %w", b, err)
		}
		at := r.sp.size()
		if _, err := r.sp.Write(buf); err != nil {
			return fmt.Errorf("save residual block %d before a write: %w", b, err)
		}
		r.saved[b] = at
	}
	return nil
}

// SyncConfig configures the initial sync on the primary.
type SyncConfig struct {
	// Threshold ends the pre-copy rounds when at most this many blocks are
	// dirty; they are sent after the first Open (SendResidual). 0 means 16.
	// (Rounds that stop shrinking leave more: the residual's saved blocks
	// share the Mirror's memory budget and spill past it.)
	Threshold int
	// MaxRounds bounds the rounds after the first; 0 means 30. The rounds
	// also end when the dirty set stops shrinking.
	MaxRounds int
	// Batch bounds the block data of one sync stream (the Replica verifies a
	// whole stream before it applies it); 0 means 4 MiB. A stream holds at
	// least one block.
	Batch int64
}

func (c SyncConfig) withDefaults() SyncConfig {
	if c.Threshold <= 0 {
		c.Threshold = 16
	}
	if c.MaxRounds <= 0 {
		c.MaxRounds = 30
	}
	if c.Batch <= 0 {
		c.Batch = 4 << 20
	}
	return c
}

// SyncStats reports an initial sync on the primary.
type SyncStats struct {
	// Blocks is the number of blocks of the image; Identical, how many the
	// backup already held when the sync started (not sent in round 0).
	Blocks, Identical int
	// Rounds is the number of rounds sent (round 0 included).
	Rounds int
	// Sent is the blocks sent in every round; Bytes, their data; Encoded,
	// the sync streams' bytes; Streams, how many streams.
	Sent    int
	Bytes   int64
	Encoded int64
	Streams int
	// Residual is the blocks left dirty for SendResidual.
	Residual int
}

// StartSync starts tracking, in blocks of block bytes, the blocks written
// from now on: the initial sync's dirty set. It must come before the first
// Open (the first Open ends it). Precopy calls it.
func (m *Mirror) StartSync(block int) error {
	if err := checkBlocks(m.size, int64(block)); err != nil {
		return fmt.Errorf("start sync: %w", err)
	}
	m.wmu.Lock()
	defer m.wmu.Unlock()
	if m.cur != nil {
		return fmt.Errorf("start sync: epoch %d is open (the sync comes before the first epoch; Release first)", m.cur.n)
	}
	if m.resid != nil {
		m.resid.sp.free()
	}
	m.track, m.resid = newTracker(m.size, int64(block)), nil
	return nil
}

// Dirty is the number of blocks written since the sync started or since the
// last TakeDirty; 0 when no sync is running.
func (m *Mirror) Dirty() int {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	if m.track == nil {
		return 0
	}
	return m.track.count
}

// TakeDirty returns the blocks written since the sync started or since the
// last TakeDirty, ascending, and clears them; nil when no sync is running.
func (m *Mirror) TakeDirty() []int64 {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	if m.track == nil {
		return nil
	}
	return m.track.take()
}

// SendBlocks reads the given blocks from the local image while the guest
// runs and passes them to send as sync streams of at most batch bytes of
// data each (at least one block). A block written while it is read is torn,
// but the write marked it dirty, so a later round sends it again. send must
// not keep the slice.
func (m *Mirror) SendBlocks(blocks []int64, block int, batch int64, send func(stream []byte) error) (SyncStats, error) {
	bs := int64(block)
	if err := checkBlocks(m.size, bs); err != nil {
		return SyncStats{}, fmt.Errorf("send blocks: %w", err)
	}
	buf := make([]byte, block)
	return m.sendStreams(blocks, bs, batch, send, func(b int64) ([]byte, error) {
		data := buf[:min(bs, m.size-b*bs)]
		if _, err := m.disk.ReadAt(data, b*bs); err != nil {
			return nil, fmt.Errorf("send blocks: read block %d: %w", b, err)
		}
		return data, nil
	})
}

// sendStreams encodes blocks, read with get, into sync streams for send.
func (m *Mirror) sendStreams(blocks []int64, bs, batch int64, send func([]byte) error, get func(b int64) ([]byte, error)) (SyncStats, error) {
	var st SyncStats
	var out bytes.Buffer
	var enc encoder
	for len(blocks) > 0 {
		out.Reset()
		if err := enc.start(&out, streamHeader{Kind: kindSync, Block: uint32(bs), Size: m.size}); err != nil {
			return st, err
		}
		for len(blocks) > 0 && (enc.writes == 0 || enc.bytes+bs <= batch) {
			b := blocks[0]
			if b < 0 || b >= numBlocks(m.size, bs) {
				return st, fmt.Errorf("send blocks: block %d is outside the image's %d blocks", b, numBlocks(m.size, bs))
			}
			data, err := get(b)
			if err != nil {
				return st, err
			}
			if err := enc.write(b*bs, data); err != nil {
				return st, err
			}
			blocks = blocks[1:]
		}
		if err := enc.end(); err != nil {
			return st, err
		}
		if err := send(out.Bytes()); err != nil {
			return st, fmt.Errorf("send sync stream: %w", err)
		}
		s := enc.summary()
		st.Sent += s.Writes
		st.Bytes += s.Bytes
		st.Encoded += s.Encoded
		st.Streams++
	}
	return st, nil
}

// Precopy runs the initial sync's rounds while the guest runs, given the
// backup's hash list (Replica.Hashes, carried by EncodeHashes and
// DecodeHashes) and its block size. It starts tracking writes, hashes the
// local image, sends the blocks whose hashes differ (round 0), then the
// blocks written during each round in the next, until at most
// cfg.Threshold are dirty, the set stops shrinking, or cfg.MaxRounds. The
// blocks still dirty stay tracked: the engine's first Open ends the sync,
// and the transport then calls SendResidual before it ships any epoch.
func (m *Mirror) Precopy(remote []Hash, block int, cfg SyncConfig, send func(stream []byte) error) (SyncStats, error) {
	cfg = cfg.withDefaults()
	if err := m.StartSync(block); err != nil {
		return SyncStats{}, fmt.Errorf("precopy: %w", err)
	}
	local, err := HashImage(m.disk, m.size, block)
	if err != nil {
		return SyncStats{}, fmt.Errorf("precopy: %w", err)
	}
	plan, err := DiffBlocks(local, remote)
	if err != nil {
		return SyncStats{}, fmt.Errorf("precopy: %w", err)
	}
	st := SyncStats{Blocks: len(local), Identical: len(local) - len(plan)}
	err = m.rounds(plan, block, cfg, send, &st)
	return st, err
}

// CatchUp runs more rounds of a sync that Precopy started: it sends the
// blocks written since (or since the last round), then those written during
// each round, until at most cfg.Threshold are dirty, the set stops
// shrinking, or cfg.MaxRounds. A transport that does other long work between
// Precopy and the first Open (the engine syncs memory) calls it last, so that
// the residual is what the guest wrote during one short round. With nothing
// dirty it sends nothing.
func (m *Mirror) CatchUp(block int, cfg SyncConfig, send func(stream []byte) error) (SyncStats, error) {
	cfg = cfg.withDefaults()
	m.wmu.Lock()
	tracking := m.track != nil && m.track.block == int64(block)
	m.wmu.Unlock()
	if !tracking {
		return SyncStats{}, fmt.Errorf("catch up: no sync in %d-byte blocks is running (Precopy starts one)", block)
	}
	var st SyncStats
	if m.Dirty() <= cfg.Threshold {
		st.Residual = m.Dirty()
		return st, nil
	}
	err := m.rounds(m.TakeDirty(), block, cfg, send, &st)
	return st, err
}

// rounds sends plan, then the blocks dirtied during each round, until at most
// cfg.Threshold are dirty, the set stops shrinking, or cfg.MaxRounds.
func (m *Mirror) rounds(plan []int64, block int, cfg SyncConfig, send func(stream []byte) error, st *SyncStats) error {
	for round := 0; ; round++ {
		rs, err := m.SendBlocks(plan, block, cfg.Batch, send)
		st.add(rs)
		if err != nil {
			return fmt.Errorf("sync round %d: %w", st.Rounds, err)
		}
		st.Rounds++
		d := m.Dirty()
		if d <= cfg.Threshold || (round > 0 && d >= len(plan)) || round >= cfg.MaxRounds {
			st.Residual = d
			return nil
		}
		plan = m.TakeDirty()
	}
}

func (s *SyncStats) add(o SyncStats) {
	s.Sent += o.Sent
	s.Bytes += o.Bytes
	s.Encoded += o.Encoded
	s.Streams += o.Streams
}

// SendResidual sends, as sync streams, the blocks that were still dirty when
// the first Open ended the sync, with their contents at that Open (a block
// written since was saved before the write). The transport must deliver
// these streams to the Replica (ApplySync) before the first epoch's stream.
// Without a residual (no sync ran, or it was sent) it sends nothing.
func (m *Mirror) SendResidual(batch int64, send func(stream []byte) error) (SyncStats, error) {
	if batch <= 0 {
		batch = SyncConfig{}.withDefaults().Batch
	}
	m.wmu.Lock()
	r := m.resid
	m.wmu.Unlock()
	if r == nil {
		return SyncStats{}, nil
	}
	buf := make([]byte, r.block)
	st, err := m.sendStreams(r.blocks, r.block, batch, send, func(b int64) ([]byte, error) {
		m.wmu.Lock()
		defer m.wmu.Unlock()
		data := buf[:r.blockLen(m.size, b)]
		if at, ok := r.saved[b]; ok {
			if err := r.sp.readAt(data, at); err != nil {
				return nil, fmt.Errorf("send residual: read the saved block %d: %w", b, err)
			}
		} else if _, err := m.disk.ReadAt(data, b*r.block); err != nil {
			return nil, fmt.Errorf("send residual: read block %d: %w", b, err)
		}
		delete(r.pending, b)
		delete(r.saved, b)
		return data, nil
	})
	if err != nil {
		return st, err
	}
	st.Rounds = 1
	m.wmu.Lock()
	if m.resid == r {
		m.resid = nil
		r.sp.free()
	}
	m.wmu.Unlock()
	return st, nil
}
