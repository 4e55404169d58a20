package history

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"

	"github.com/pierrec/lz4/v4"
)

// Pack files hold the store's data: blobs (a page, a disk block, a tree
// node, a machine state), each once, appended and never rewritten in place.
//
//	offset 0    magic "RPBL", enc u8 (0 raw, 1 LZ4), 3 reserved bytes,
//	            raw length u32, stored length u32, hash [32] (SHA-256 of
//	            the raw bytes)
//	offset 48   the stored bytes
//	then        CRC32C u32 of the 48 header bytes and the stored bytes
//
// A pack is named pack-NNNNNN.dat. The index (the store's bbolt database)
// records for each pack the length that was synced before the index named
// anything in it: bytes past it are a torn tail from a crash, and a pack
// shorter than it was damaged.
const (
	blobMagic  = "RPBL"
	blobHeader = 48
	blobTrail  = 4

	encRaw = 0
	encLZ4 = 1
)

// Hash is a blob's address: the SHA-256 of its content. The zero Hash is
// the zero page (and the all-zero tree node): it takes no space.
type Hash [32]byte

// zeroHash is the hash of a zero page or of a subtree of zero pages.
var zeroHash Hash

func (h Hash) String() string { return hex.EncodeToString(h[:8]) }

func hashOf(b []byte) Hash { return sha256.Sum256(b) }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is returned (wrapped, with what and where) for stored data that
// does not check: a blob whose checksum or hash differs, a pack shorter than
// its index says, an index entry whose checksum differs.
var ErrCorrupt = errors.New("history: corrupt store")

// loc is where a blob lies.
type loc struct {
	pack   uint32
	off    uint64
	stored uint32 // stored bytes (after the header)
	raw    uint32
	enc    uint8
}

const locSize = 4 + 8 + 4 + 4 + 1

func (l loc) put(b []byte) {
	binary.LittleEndian.PutUint32(b[0:], l.pack)
	binary.LittleEndian.PutUint64(b[4:], l.off)
	binary.LittleEndian.PutUint32(b[12:], l.stored)
	binary.LittleEndian.PutUint32(b[16:], l.raw)
	b[20] = l.enc
}

func getLoc(b []byte) loc {
	return loc{
		pack:   binary.LittleEndian.Uint32(b[0:]),
		off:    binary.LittleEndian.Uint64(b[4:]),
		stored: binary.LittleEndian.Uint32(b[12:]),
		raw:    binary.LittleEndian.Uint32(b[16:]),
		enc:    b[20],
	}
}

// size is the blob's whole record in its pack.
func (l loc) size() int64 { return blobHeader + int64(l.stored) + blobTrail }

func packName(id uint32) string { return fmt.Sprintf("pack-%06d.dat", id) }

func packPath(dir string, id uint32) string { return filepath.Join(dir, packName(id)) }

// packWriter appends blobs to one pack.
type packWriter struct {
	id   uint32
	f    *os.File
	size int64 // bytes written
	comp lz4.Compressor
	buf  []byte
}

func createPack(dir string, id uint32) (*packWriter, error) {
	f, err := os.OpenFile(packPath(dir, id), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("history: new pack: %w", err)
	}
	return &packWriter{id: id, f: f}, nil
}

// append writes one blob and returns where it lies. The blob is LZ4
// compressed when that saves an eighth or more.
func (w *packWriter) append(h Hash, data []byte) (loc, error) {
	need := blobHeader + lz4.CompressBlockBound(len(data)) + blobTrail
	if cap(w.buf) < need {
		w.buf = make([]byte, need)
	}
	rec := w.buf[:need]
	enc, stored := uint8(encRaw), len(data)
	if n, err := w.comp.CompressBlock(data, rec[blobHeader:need-blobTrail]); err == nil && n > 0 && n <= len(data)-len(data)/8 {
		enc, stored = encLZ4, n
	} else {
		copy(rec[blobHeader:], data)
	}
	rec = rec[:blobHeader+stored+blobTrail]
	copy(rec, blobMagic)
	rec[4], rec[5], rec[6], rec[7] = enc, 0, 0, 0
	binary.LittleEndian.PutUint32(rec[8:], uint32(len(data)))
	binary.LittleEndian.PutUint32(rec[12:], uint32(stored))
	copy(rec[16:48], h[:])
	binary.LittleEndian.PutUint32(rec[blobHeader+stored:], crc32.Checksum(rec[:blobHeader+stored], castagnoli))
	if _, err := w.f.WriteAt(rec, w.size); err != nil {
		return loc{}, fmt.Errorf("history: write %s: %w", packName(w.id), err)
	}
	l := loc{pack: w.id, off: uint64(w.size), stored: uint32(stored), raw: uint32(len(data)), enc: enc}
	w.size += int64(len(rec))
	return l, nil
}

func (w *packWriter) sync() error {
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("history: sync %s: %w", packName(w.id), err)
	}
	return nil
}

// readBlob reads the blob at l from f (pack id l.pack) into dst (of
// l.raw bytes) and checks its checksum and its hash against h. *scratch
// holds the record; it grows as needed and is kept for the next read.
func readBlob(f *os.File, l loc, h Hash, dst []byte, scratch *[]byte) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s offset %d: blob %s: %s", ErrCorrupt, packName(l.pack), l.off, h, fmt.Sprintf(format, args...))
	}
	if len(dst) != int(l.raw) {
		return bad("is %d bytes, %d expected", l.raw, len(dst))
	}
	if int64(cap(*scratch)) < l.size() {
		*scratch = make([]byte, l.size())
	}
	rec := (*scratch)[:l.size()]
	if n, err := f.ReadAt(rec, int64(l.off)); n != len(rec) {
		return bad("%d of its %d bytes are there (truncated pack?): %v", n, len(rec), err)
	}
	stored := rec[blobHeader : blobHeader+l.stored]
	switch {
	case string(rec[:4]) != blobMagic:
		return bad("no blob header there")
	case crc32.Checksum(rec[:blobHeader+l.stored], castagnoli) != binary.LittleEndian.Uint32(rec[blobHeader+l.stored:]):
		return bad("checksum differs")
	case rec[4] != l.enc || binary.LittleEndian.Uint32(rec[8:]) != l.raw || binary.LittleEndian.Uint32(rec[12:]) != l.stored || Hash(rec[16:48]) != h:
		return bad("the record is another blob than the index says")
	}
	switch l.enc {
	case encRaw:
		copy(dst, stored)
	case encLZ4:
		n, err := lz4.UncompressBlock(stored, dst)
		if err != nil || n != len(dst) {
			return bad("does not decompress (%d bytes, %v)", n, err)
		}
	default:
		return bad("unknown encoding %d", l.enc)
	}
	if hashOf(dst) != h {
		return bad("content does not hash to its address")
	}
	return nil
}
