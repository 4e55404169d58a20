package history

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/repagent/repagent/replicate"
)

// The index is a bbolt database (index.db beside the packs). Every value
// ends in a CRC32C of its key and value, so a damaged entry is found, and
// named, when it is read: bbolt checksums its own meta pages, not the
// data pages.
var (
	bucketBlobs  = []byte("blobs")  // Hash -> loc
	bucketPacks  = []byte("packs")  // pack id (u32 BE) -> synced length (u64)
	bucketPoints = []byte("points") // point id (u64 BE) -> point record
)

// DefaultPackSize is Options.PackSize's default.
const DefaultPackSize = 64 << 20

// Options configure a Store.
type Options struct {
	// PackSize is the size past which a new pack is started.
	PackSize int64
	// Log receives the store's messages; nil means slog.Default().
	Log *slog.Logger
}

// Point is a kept point: one checkpoint, restorable on its own.
type Point struct {
	ID       uint64    // the store's number for it, increasing with intake
	Epoch    uint64    // the checkpoint's epoch (epochs restart with a session)
	Time     time.Time // when the backup applied it
	Session  [16]byte  // the session that delivered it
	Digest   uint64    // the memory digest of the checkpoint (replicate.DigestMemory)
	MemSize  uint64
	DiskSize int64 // 0: no disk
	Pages    int64 // non-zero pages
	Added    int64 // bytes this point added to the packs when it was taken
	State    Hash
	StateLen uint32
	Mem      Hash // memory tree root
	Disk     Hash // disk tree root
}

const pointSize = 8 + 8 + 16 + 8 + 8 + 8 + 8 + 8 + 32 + 4 + 32 + 32

func (p *Point) encode() []byte {
	b := make([]byte, pointSize)
	o := 0
	u64 := func(v uint64) { binary.LittleEndian.PutUint64(b[o:], v); o += 8 }
	u64(p.Epoch)
	u64(uint64(p.Time.UnixNano()))
	o += copy(b[o:], p.Session[:])
	u64(p.Digest)
	u64(p.MemSize)
	u64(uint64(p.DiskSize))
	u64(uint64(p.Pages))
	u64(uint64(p.Added))
	o += copy(b[o:], p.State[:])
	binary.LittleEndian.PutUint32(b[o:], p.StateLen)
	o += 4
	o += copy(b[o:], p.Mem[:])
	copy(b[o:], p.Disk[:])
	return b
}

func decodePoint(id uint64, b []byte) Point {
	p := Point{ID: id}
	o := 0
	u64 := func() uint64 { v := binary.LittleEndian.Uint64(b[o:]); o += 8; return v }
	p.Epoch = u64()
	p.Time = time.Unix(0, int64(u64()))
	o += copy(p.Session[:], b[o:])
	p.Digest = u64()
	p.MemSize = u64()
	p.DiskSize = int64(u64())
	p.Pages = int64(u64())
	p.Added = int64(u64())
	o += copy(p.State[:], b[o:])
	p.StateLen = binary.LittleEndian.Uint32(b[o:])
	o += 4
	o += copy(p.Mem[:], b[o:])
	copy(p.Disk[:], b[o:])
	return p
}

// sealed appends the CRC32C of key and value to value.
func sealed(key, value []byte) []byte {
	c := crc32.Update(crc32.Checksum(key, castagnoli), castagnoli, value)
	return binary.LittleEndian.AppendUint32(value, c)
}

// unseal checks a value's CRC and returns it without it.
func unseal(bucket string, key, v []byte, size int) ([]byte, error) {
	if len(v) != size+4 {
		return nil, fmt.Errorf("%w: index entry %s/%x: %d bytes, %d expected", ErrCorrupt, bucket, key, len(v), size+4)
	}
	c := crc32.Update(crc32.Checksum(key, castagnoli), castagnoli, v[:size])
	if c != binary.LittleEndian.Uint32(v[size:]) {
		return nil, fmt.Errorf("%w: index entry %s/%x: checksum differs", ErrCorrupt, bucket, key)
	}
	return v[:size], nil
}

func u32key(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func u64key(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// Store is a history of points in a directory: pack files and an index.
// Add, Delete, Restore and Points may be called from any goroutine; Add
// and Delete are serialised, and GC runs beside them (see GC).
type Store struct {
	dir  string
	db   *bolt.DB
	opts Options
	log  *slog.Logger

	mu      sync.Mutex // Add, Delete, the sweep of GC
	cur     *packWriter
	nextID  uint32 // next pack id
	mem     *tree  // the last point's trees, for the next Add's changed lists
	disk    *tree
	touched map[Hash]struct{} // while GC marks: every blob an Add used

	gcmu sync.Mutex // one GC at a time

	rmu   sync.Mutex
	packs map[uint32]*os.File // open for reading

	problems []string
}

// Open opens (or makes) the store in dir. It checks the packs against the
// index: a tail written after the last commit (a crash) is cut off and
// reported, a pack shorter than its index says or missing is reported
// (the points that need it are refused when restored), and a pack the
// index never named is removed.
func Open(dir string, opts Options) (*Store, error) {
	if opts.PackSize <= 0 {
		opts.PackSize = DefaultPackSize
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	db, err := bolt.Open(filepath.Join(dir, "index.db"), 0o644, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("history: open the index in %s: %w", dir, err)
	}
	s := &Store{dir: dir, db: db, opts: opts, log: opts.Log, packs: map[uint32]*os.File{}}
	if err := s.check(); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

func (s *Store) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	s.problems = append(s.problems, msg)
	s.log.Warn("history: " + msg)
}

// Problems returns what Open found wrong and repaired or could not.
func (s *Store) Problems() []string { return slices.Clone(s.problems) }

func (s *Store) check() error {
	known := map[uint32]bool{}
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketBlobs, bucketPacks, bucketPoints} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			id := binary.BigEndian.Uint32(k)
			known[id] = true
			s.nextID = max(s.nextID, id+1)
			val, err := unseal("packs", k, v, 8)
			if err != nil {
				s.problem("%v", err)
				return nil
			}
			want := int64(binary.LittleEndian.Uint64(val))
			path := packPath(s.dir, id)
			st, err := os.Stat(path)
			switch {
			case err != nil:
				s.problem("%s: %v: the points that need it cannot be restored", packName(id), err)
			case st.Size() < want:
				s.problem("%s is %d bytes, the index says %d (truncated): the points that need its end cannot be restored", packName(id), st.Size(), want)
			case st.Size() > want:
				if err := os.Truncate(path, want); err != nil {
					return fmt.Errorf("cut the torn tail of %s: %w", packName(id), err)
				}
				s.problem("%s: cut %d bytes written after the last commit (torn tail)", packName(id), st.Size()-want)
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("history: check %s: %w", s.dir, err)
	}
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("history: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, "pack-") || !strings.HasSuffix(name, ".dat") {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, "pack-"), ".dat"), 10, 32)
		if err != nil {
			continue
		}
		id := uint32(n)
		s.nextID = max(s.nextID, id+1)
		if !known[id] {
			os.Remove(filepath.Join(s.dir, name))
			s.problem("%s: removed, no point ever named it (written before a crash)", name)
		}
	}
	return nil
}

// Close closes the store.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil {
		s.cur.f.Close()
		s.cur = nil
	}
	s.rmu.Lock()
	for id, f := range s.packs {
		f.Close()
		delete(s.packs, id)
	}
	s.rmu.Unlock()
	return s.db.Close()
}

// Capture is a checkpoint to keep as a point. Memory (and Disk) must not
// change during Add.
type Capture struct {
	Epoch   uint64
	Time    time.Time
	Session [16]byte
	Digest  uint64 // the checkpoint's memory digest
	State   []byte
	// Memory is guest memory, regions back to back (the replica).
	Memory []byte
	// MemChanged lists the pages written since the previous Add (any
	// order); nil means unknown: every page is hashed.
	MemChanged []int64
	// Disk, when set, is the disk image at the checkpoint, DiskSize bytes.
	Disk     io.ReaderAt
	DiskSize int64
	// DiskChanged lists the 4 KiB blocks written since the previous Add;
	// nil means unknown.
	DiskChanged []int64
}

// adder is one Add's writes: the blobs it put, not yet in the index.
type adder struct {
	s       *Store
	tx      *bolt.Tx // read-only, for the dedup lookups
	pending map[Hash]loc
	added   int64
}

func (a *adder) put(h Hash, data []byte) error {
	if h == zeroHash {
		return nil
	}
	if a.s.touched != nil {
		a.s.touched[h] = struct{}{}
	}
	if _, ok := a.pending[h]; ok {
		return nil
	}
	if a.tx.Bucket(bucketBlobs).Get(h[:]) != nil {
		return nil
	}
	l, err := a.s.cur.append(h, data)
	if err != nil {
		return err
	}
	a.pending[h] = l
	a.added += l.size()
	return nil
}

// Add keeps c as a new point and returns it. Everything it needs is
// written to a pack and synced before the index names the point, in one
// transaction: a crash at any moment leaves every listed point whole.
func (s *Store) Add(c *Capture) (Point, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(c.Memory)%leafSize != 0 || len(c.Memory) == 0 {
		return Point{}, fmt.Errorf("history: memory of %d bytes is not a whole number of pages", len(c.Memory))
	}
	if err := s.openPack(); err != nil {
		return Point{}, err
	}
	tx, err := s.db.Begin(false)
	if err != nil {
		return Point{}, fmt.Errorf("history: %w", err)
	}
	a := &adder{s: s, tx: tx, pending: map[Hash]loc{}}
	p, err := s.add(a, c)
	tx.Rollback()
	if err != nil {
		s.mem, s.disk = nil, nil // the next Add hashes everything
		return Point{}, err
	}
	if err := s.cur.sync(); err != nil {
		s.mem, s.disk = nil, nil
		return Point{}, err
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		blobs := tx.Bucket(bucketBlobs)
		v := make([]byte, locSize)
		for h, l := range a.pending {
			l.put(v)
			if err := blobs.Put(h[:], sealed(h[:], slices.Clone(v))); err != nil {
				return err
			}
		}
		k := u32key(s.cur.id)
		if err := tx.Bucket(bucketPacks).Put(k, sealed(k, binary.LittleEndian.AppendUint64(nil, uint64(s.cur.size)))); err != nil {
			return err
		}
		pts := tx.Bucket(bucketPoints)
		id, err := pts.NextSequence()
		if err != nil {
			return err
		}
		p.ID = id
		key := u64key(id)
		return pts.Put(key, sealed(key, p.encode()))
	})
	if err != nil {
		s.mem, s.disk = nil, nil
		return Point{}, fmt.Errorf("history: commit point of epoch %d: %w", c.Epoch, err)
	}
	if s.cur.size >= s.opts.PackSize {
		s.cur.f.Close()
		s.cur = nil
	}
	return p, nil
}

func (s *Store) openPack() error {
	if s.cur != nil {
		return nil
	}
	w, err := createPack(s.dir, s.nextID)
	if err != nil {
		return err
	}
	// The index names the pack (at length 0) before any point uses it, so
	// a crash leaves it known, its tail cut at the next Open.
	k := u32key(w.id)
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPacks).Put(k, sealed(k, binary.LittleEndian.AppendUint64(nil, 0)))
	}); err != nil {
		w.f.Close()
		os.Remove(w.f.Name())
		return fmt.Errorf("history: %w", err)
	}
	s.nextID++
	s.cur = w
	return nil
}

func (s *Store) add(a *adder, c *Capture) (Point, error) {
	p := Point{Epoch: c.Epoch, Time: c.Time, Session: c.Session, Digest: c.Digest, MemSize: uint64(len(c.Memory)), DiskSize: c.DiskSize}
	p.State = hashOf(c.State)
	p.StateLen = uint32(len(c.State))
	if err := a.put(p.State, c.State); err != nil {
		return p, err
	}
	pages := int64(len(c.Memory) / leafSize)
	changed := c.MemChanged
	if s.mem == nil || s.mem.leaves != pages {
		s.mem, changed = newTree(pages), nil
	}
	leaf := func(i int64) []byte { return c.Memory[i*leafSize : (i+1)*leafSize] }
	var err error
	if p.Mem, err = s.update(a, s.mem, changed, leaf); err != nil {
		return p, err
	}
	for _, h := range s.mem.levels[0] {
		if h != zeroHash {
			p.Pages++
		}
	}
	if c.Disk != nil {
		blocks := (c.DiskSize + leafSize - 1) / leafSize
		changed := c.DiskChanged
		if s.disk == nil || s.disk.leaves != blocks {
			s.disk, changed = newTree(blocks), nil
		}
		buf := make([]byte, leafSize)
		var rerr error
		leaf := func(i int64) []byte {
			n := min(leafSize, c.DiskSize-i*leafSize)
			if _, err := c.Disk.ReadAt(buf[:n], i*leafSize); err != nil && rerr == nil {
				rerr = fmt.Errorf("history: read the disk at %d: %w", i*leafSize, err)
			}
			return buf[:n]
		}
		if p.Disk, err = s.update(a, s.disk, changed, leaf); err != nil {
			return p, err
		}
		if rerr != nil {
			return p, rerr
		}
	} else {
		s.disk = nil
	}
	p.Added = a.added
	return p, nil
}

// update rehashes the changed leaves of t (all when changed is nil), puts
// the new ones and the nodes above them, and returns the root.
func (s *Store) update(a *adder, t *tree, changed []int64, leaf func(int64) []byte) (Hash, error) {
	set := func(i int64) error {
		b := leaf(i)
		h := zeroHash
		if !allZero(b) {
			h = hashOf(b)
			if err := a.put(h, b); err != nil {
				return err
			}
		}
		t.levels[0][i] = h
		return nil
	}
	if changed == nil {
		for i := range t.leaves {
			if err := set(i); err != nil {
				return Hash{}, err
			}
		}
	} else {
		changed = slices.Clone(changed)
		slices.Sort(changed)
		changed = slices.Compact(changed)
		for _, i := range changed {
			if i < 0 || i >= t.leaves {
				return Hash{}, fmt.Errorf("history: changed leaf %d outside 0..%d", i, t.leaves-1)
			}
			if err := set(i); err != nil {
				return Hash{}, err
			}
		}
	}
	if err := t.rehash(changed, a.put); err != nil {
		return Hash{}, err
	}
	return t.root(), nil
}

// Points lists the points, oldest first. A point whose index entry is
// damaged is left out and reported in the error (the others are listed).
func (s *Store) Points() ([]Point, error) {
	var pts []Point
	var errs []error
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPoints).ForEach(func(k, v []byte) error {
			val, err := unseal("points", k, v, pointSize)
			if err != nil {
				errs = append(errs, err)
				return nil
			}
			pts = append(pts, decodePoint(binary.BigEndian.Uint64(k), val))
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	return pts, errors.Join(errs...)
}

// Point returns the point with id.
func (s *Store) Point(id uint64) (Point, error) {
	var p Point
	err := s.db.View(func(tx *bolt.Tx) error {
		k := u64key(id)
		v := tx.Bucket(bucketPoints).Get(k)
		if v == nil {
			return fmt.Errorf("history: no point %d", id)
		}
		val, err := unseal("points", k, v, pointSize)
		if err != nil {
			return err
		}
		p = decodePoint(id, val)
		return nil
	})
	return p, err
}

// Delete removes point id. It never touches another point's data: what
// only it used is reclaimed by GC.
func (s *Store) Delete(ids ...uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, id := range ids {
			if err := tx.Bucket(bucketPoints).Delete(u64key(id)); err != nil {
				return err
			}
		}
		return nil
	})
}

// reader reads blobs; one per goroutine.
type reader struct {
	s       *Store
	tx      *bolt.Tx
	scratch []byte
}

func (s *Store) pack(id uint32) (*os.File, error) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	if f := s.packs[id]; f != nil {
		return f, nil
	}
	f, err := os.Open(packPath(s.dir, id))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	s.packs[id] = f
	return f, nil
}

func (r *reader) loc(h Hash) (loc, error) {
	v := r.tx.Bucket(bucketBlobs).Get(h[:])
	if v == nil {
		return loc{}, fmt.Errorf("%w: blob %s is not in the index", ErrCorrupt, h)
	}
	val, err := unseal("blobs", h[:], v, locSize)
	if err != nil {
		return loc{}, err
	}
	return getLoc(val), nil
}

// get reads blob h into dst, which must be its size.
func (r *reader) get(h Hash, dst []byte) error {
	l, err := r.loc(h)
	if err != nil {
		return err
	}
	f, err := r.s.pack(l.pack)
	if err != nil {
		return err
	}
	return readBlob(f, l, h, dst, &r.scratch)
}

// Restored is a point read back.
type Restored struct {
	Point Point
	State []byte
}

// Restore reads point id: its memory into mem (zero-filled, MemSize
// bytes: only non-zero pages are written) and its disk into disk (when
// the point has one and disk is set: a zero-filled image of DiskSize
// bytes; only non-zero blocks are written). Every blob is checked as it is
// read, and the memory is digested and compared with the digest recorded
// for the point's epoch: an error names what failed, and then mem and
// disk hold nothing to run.
func (s *Store) Restore(id uint64, mem []byte, disk io.WriterAt) (*Restored, error) {
	p, err := s.Point(id)
	if err != nil {
		return nil, err
	}
	if uint64(len(mem)) != p.MemSize {
		return nil, fmt.Errorf("history: point %d has %d bytes of memory, %d given", id, p.MemSize, len(mem))
	}
	tx, err := s.db.Begin(false)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	defer tx.Rollback()
	r := &reader{s: s, tx: tx}
	fail := func(err error) (*Restored, error) {
		return nil, fmt.Errorf("history: restore point %d (epoch %d): %w", id, p.Epoch, err)
	}
	state := make([]byte, p.StateLen)
	if err := r.get(p.State, state); err != nil {
		return fail(err)
	}
	pages := int64(p.MemSize / leafSize)
	err = walk(p.Mem, pages, r.get, func(i int64, h Hash) error {
		return r.get(h, mem[i*leafSize:(i+1)*leafSize])
	})
	if err != nil {
		return fail(err)
	}
	if p.DiskSize > 0 && disk != nil {
		blocks := (p.DiskSize + leafSize - 1) / leafSize
		buf := make([]byte, leafSize)
		err = walk(p.Disk, blocks, r.get, func(i int64, h Hash) error {
			n := min(leafSize, p.DiskSize-i*leafSize)
			if err := r.get(h, buf[:n]); err != nil {
				return err
			}
			_, err := disk.WriteAt(buf[:n], i*leafSize)
			return err
		})
		if err != nil {
			return fail(err)
		}
	}
	d, err := replicate.DigestMemory(bytes.NewReader(mem), p.MemSize)
	if err != nil {
		return fail(err)
	}
	if d != p.Digest {
		return fail(fmt.Errorf("%w: memory digests to %s, the checkpoint's digest is %s", ErrCorrupt, replicate.FormatDigest(d), replicate.FormatDigest(p.Digest)))
	}
	return &Restored{Point: p, State: state}, nil
}
