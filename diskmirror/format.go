package diskmirror

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Format versions. A decoder accepts streams of versions MinVersion to
// Version; every encoder writes Version.
const (
	Version    = 1
	MinVersion = 1
)

// Format sizes and limits, "to prevent DoS": a decoder refuses anything
// larger before it allocates.
const (
	// StreamHeaderSize is the size of the header that starts every stream.
	StreamHeaderSize = 32
	// RecordHeaderSize is the size of a write or end record's header.
	RecordHeaderSize = 32
	// MaxRecordData is the most data one write record carries. Mirror.WriteAt
	// splits a larger write into several records of the same epoch.
	MaxRecordData = 1 << 20
	// MaxStreamWrites is the most write records in one stream.
	MaxStreamWrites = 1 << 24
	// MaxImageSize is the largest image the format describes (1 PiB).
	MaxImageSize = 1 << 50
)

// Stream kinds (the kind field of the stream header). 0 is invalid, so a
// zeroed header means nothing.
const (
	kindEpoch  = 1 // an epoch's writes, applied when the epoch commits
	kindSync   = 2 // initial-sync blocks, applied once verified
	kindHashes = 3 // a hash list of an image (see sync.go)
)

// Record types.
const (
	recWrite = 1
	recEnd   = 2
)

var magic = [8]byte{'D', 'I', 'S', 'K', 'M', 'I', 'R', 'R'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrFormat is returned (wrapped, naming the problem) by every decoder for a
// stream that does not decode or breaks the format's rules: bad magic or
// version, a foreign image size, a record beyond the end of the image, a
// checksum that does not match, a truncated stream, trailing bytes. Nothing of
// such a stream is applied.
var ErrFormat = errors.New("diskmirror: bad stream")

// ErrImageSize is returned (wrapped) by NewReplica when the backup image is
// not the size the primary declares, and by the decoders when a stream
// declares another image size. Nothing is applied.
var ErrImageSize = errors.New("diskmirror: image size mismatch")

// ErrRange is returned (wrapped) by Mirror.WriteAt for a write that does not
// lie inside the image (nothing is written), and by the decoders for a record
// that does not (nothing is applied).
var ErrRange = errors.New("diskmirror: write beyond the end of the image")

// ErrEpoch is returned (wrapped) by Replica.Receive for an epoch stream out of
// order (not the epoch after the last one received), and by Commit and
// Failover for an epoch that never arrived. Nothing is applied.
var ErrEpoch = errors.New("diskmirror: epoch out of order")

func formatErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrFormat}, args...)...)
}

// streamHeader starts every stream: 32 bytes, little-endian.
//
//	0   magic      "DISKMIRR"
//	8   version    uint16
//	10  kind       uint16 (1 epoch, 2 sync, 3 hash list)
//	12  blockSize  uint32 (sync and hash list: the block size; epoch: 0)
//	16  imageSize  uint64 (the primary's image size in bytes)
//	24  epoch      uint64 (epoch: the epoch, at least 1; others: 0)
type streamHeader struct {
	Version uint16
	Kind    uint16
	Block   uint32
	Size    int64
	Epoch   uint64
}

func (h streamHeader) put(b []byte) {
	copy(b, magic[:])
	binary.LittleEndian.PutUint16(b[8:], h.Version)
	binary.LittleEndian.PutUint16(b[10:], h.Kind)
	binary.LittleEndian.PutUint32(b[12:], h.Block)
	binary.LittleEndian.PutUint64(b[16:], uint64(h.Size))
	binary.LittleEndian.PutUint64(b[24:], h.Epoch)
}

// parseStreamHeader decodes a stream header and checks it against the kind
// and image size the reader expects.
func parseStreamHeader(b []byte, kind uint16, size int64) (streamHeader, error) {
	le := binary.LittleEndian
	if [8]byte(b[:8]) != magic {
		return streamHeader{}, formatErr("bad magic %q (not a diskmirror stream)", b[:8])
	}
	h := streamHeader{
		Version: le.Uint16(b[8:]),
		Kind:    le.Uint16(b[10:]),
		Block:   le.Uint32(b[12:]),
		Size:    int64(le.Uint64(b[16:])),
		Epoch:   le.Uint64(b[24:]),
	}
	if h.Version < MinVersion || h.Version > Version {
		return streamHeader{}, formatErr("version %d (this side reads %d to %d)", h.Version, MinVersion, Version)
	}
	if h.Kind != kind {
		return streamHeader{}, formatErr("%s stream where %s stream expected", kindName(h.Kind), kindName(kind))
	}
	if le.Uint64(b[16:]) != uint64(size) {
		return streamHeader{}, fmt.Errorf("%w: %w: stream is for a %d-byte image, this image has %d bytes",
			ErrFormat, ErrImageSize, le.Uint64(b[16:]), size)
	}
	switch kind {
	case kindEpoch:
		if h.Block != 0 {
			return streamHeader{}, formatErr("epoch stream with block size %d (want 0)", h.Block)
		}
		if h.Epoch == 0 {
			return streamHeader{}, formatErr("epoch stream for epoch 0 (epochs start at 1)")
		}
	default:
		if err := checkBlockSize(int64(h.Block)); err != nil {
			return streamHeader{}, formatErr("%s stream: %v", kindName(kind), err)
		}
		if h.Epoch != 0 {
			return streamHeader{}, formatErr("%s stream with epoch %d (want 0)", kindName(kind), h.Epoch)
		}
	}
	return h, nil
}

func kindName(k uint16) string {
	switch k {
	case kindEpoch:
		return "epoch"
	case kindSync:
		return "sync"
	case kindHashes:
		return "hash-list"
	}
	return fmt.Sprintf("kind-%d", k)
}

// A record header: 32 bytes, little-endian.
//
//	0   type      uint16 (1 write, 2 end)
//	2   flags     uint16 (0; reserved)
//	4   length    uint32 (write: data bytes that follow, 1 to MaxRecordData;
//	                      end: number of write records in the stream)
//	8   epoch     uint64 (the stream's epoch; 0 in a sync stream)
//	16  offset    uint64 (write: byte offset in the image;
//	                      end: sum of the write records' lengths)
//	24  crc       uint32 (write: CRC32C of the data;
//	                      end: CRC32C of every byte of the stream before
//	                      this header, stream header included)
//	28  reserved  uint32 (0)
func putRecord(b []byte, typ uint16, length uint32, epoch, offset uint64, crc uint32) {
	le := binary.LittleEndian
	le.PutUint16(b[0:], typ)
	le.PutUint16(b[2:], 0)
	le.PutUint32(b[4:], length)
	le.PutUint64(b[8:], epoch)
	le.PutUint64(b[16:], offset)
	le.PutUint32(b[24:], crc)
	le.PutUint32(b[28:], 0)
}

// Summary describes a complete, verified epoch or sync stream.
type Summary struct {
	// Epoch is the stream's epoch (0 for a sync stream).
	Epoch uint64
	// Writes is the number of write records.
	Writes int
	// Bytes is the data they carry.
	Bytes int64
	// Encoded is the stream's length in bytes.
	Encoded int64
}

// encoder writes one epoch or sync stream. It keeps the running checksum the
// end record carries.
type encoder struct {
	w      io.Writer
	h      streamHeader
	crc    uint32
	writes int
	bytes  int64
	n      int64
	buf    [RecordHeaderSize]byte
}

func (e *encoder) emit(b []byte) error {
	e.crc = crc32.Update(e.crc, castagnoli, b)
	n, err := e.w.Write(b)
	e.n += int64(n)
	return err
}

// start writes the stream header.
func (e *encoder) start(w io.Writer, h streamHeader) error {
	*e = encoder{w: w, h: h}
	e.h.Version = Version
	var b [StreamHeaderSize]byte
	e.h.put(b[:])
	return e.emit(b[:])
}

// write writes one write record; the caller keeps data within the image and
// within MaxRecordData.
func (e *encoder) write(off int64, data []byte) error {
	putRecord(e.buf[:], recWrite, uint32(len(data)), e.h.Epoch, uint64(off), crc32.Checksum(data, castagnoli))
	if err := e.emit(e.buf[:]); err != nil {
		return err
	}
	if err := e.emit(data); err != nil {
		return err
	}
	e.writes++
	e.bytes += int64(len(data))
	return nil
}

// end writes the end record.
func (e *encoder) end() error {
	putRecord(e.buf[:], recEnd, uint32(e.writes), e.h.Epoch, uint64(e.bytes), e.crc)
	n, err := e.w.Write(e.buf[:])
	e.n += int64(n)
	return err
}

func (e *encoder) summary() Summary {
	return Summary{Epoch: e.h.Epoch, Writes: e.writes, Bytes: e.bytes, Encoded: e.n}
}

// decoder reads and verifies epoch and sync streams. It owns one buffer,
// reused for every record, that grows to the longest record seen (at most
// MaxRecordData).
type decoder struct {
	buf []byte
}

// read reads one stream of the given kind for an image of size bytes from r,
// checks every byte, and passes each write to sink (if not nil) in stream
// order. If epoch is not 0, the stream must be that epoch's. Records of a
// stream that later fails may already have reached sink: callers that must
// not act on a partial stream stage what sink sees (Replica does). raw, if
// not nil, receives every byte read, in order.
func (d *decoder) read(r io.Reader, kind uint16, size int64, epoch uint64, raw io.Writer,
	sink func(off int64, data []byte) error) (Summary, error) {
	var hb [StreamHeaderSize]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return Summary{}, readErr("stream header", err)
	}
	h, err := parseStreamHeader(hb[:], kind, size)
	if err != nil {
		return Summary{}, err
	}
	if epoch != 0 && h.Epoch != epoch {
		return Summary{}, fmt.Errorf("%w: %w: stream of epoch %d where epoch %d is expected", ErrFormat, ErrEpoch, h.Epoch, epoch)
	}
	crc := crc32.Update(0, castagnoli, hb[:])
	s := Summary{Epoch: h.Epoch, Encoded: StreamHeaderSize}
	if raw != nil {
		if _, err := raw.Write(hb[:]); err != nil {
			return Summary{}, err
		}
	}
	le := binary.LittleEndian
	var rb [RecordHeaderSize]byte
	for {
		if _, err := io.ReadFull(r, rb[:]); err != nil {
			return Summary{}, readErr(fmt.Sprintf("record %d header", s.Writes), err)
		}
		typ, flags, length := le.Uint16(rb[0:]), le.Uint16(rb[2:]), le.Uint32(rb[4:])
		rEpoch, off, rcrc, reserved := le.Uint64(rb[8:]), le.Uint64(rb[16:]), le.Uint32(rb[24:]), le.Uint32(rb[28:])
		if flags != 0 || reserved != 0 {
			return Summary{}, formatErr("record %d: nonzero flags %#x or reserved field %#x", s.Writes, flags, reserved)
		}
		if rEpoch != h.Epoch {
			return Summary{}, formatErr("record %d: epoch %d in a stream of epoch %d", s.Writes, rEpoch, h.Epoch)
		}
		if raw != nil {
			if _, err := raw.Write(rb[:]); err != nil {
				return Summary{}, err
			}
		}
		s.Encoded += RecordHeaderSize
		switch typ {
		case recEnd:
			if int(length) != s.Writes || off != uint64(s.Bytes) {
				return Summary{}, formatErr("end record counts %d writes of %d bytes, the stream holds %d of %d",
					length, off, s.Writes, s.Bytes)
			}
			if rcrc != crc {
				return Summary{}, formatErr("end record checksum %#08x, the stream's is %#08x", rcrc, crc)
			}
			// The end record is the last byte of the stream.
			var one [1]byte
			if n, err := io.ReadFull(r, one[:]); n > 0 {
				return Summary{}, formatErr("trailing bytes after the end record")
			} else if err != io.EOF {
				return Summary{}, fmt.Errorf("read after the end record: %w", err)
			}
			return s, nil
		case recWrite:
		default:
			return Summary{}, formatErr("record %d: unknown type %d", s.Writes, typ)
		}
		crc = crc32.Update(crc, castagnoli, rb[:])
		if s.Writes >= MaxStreamWrites {
			return Summary{}, formatErr("more than %d write records", MaxStreamWrites)
		}
		if length == 0 || length > MaxRecordData {
			return Summary{}, formatErr("record %d: length %d (want 1 to %d)", s.Writes, length, MaxRecordData)
		}
		if off > uint64(size) || uint64(length) > uint64(size)-off {
			return Summary{}, fmt.Errorf("%w: %w: record %d writes %d bytes at %d, the image has %d bytes",
				ErrFormat, ErrRange, s.Writes, length, off, size)
		}
		if kind == kindSync {
			b := uint64(h.Block)
			if off%b != 0 || uint64(length) != min(b, uint64(size)-off) {
				return Summary{}, formatErr("record %d: %d bytes at %d is not one whole %d-byte block", s.Writes, length, off, b)
			}
		}
		if len(d.buf) < int(length) {
			d.buf = make([]byte, max(int(length), min(2*len(d.buf), MaxRecordData)))
		}
		data := d.buf[:length]
		if _, err := io.ReadFull(r, data); err != nil {
			return Summary{}, readErr(fmt.Sprintf("record %d data", s.Writes), err)
		}
		if c := crc32.Checksum(data, castagnoli); c != rcrc {
			return Summary{}, formatErr("record %d (%d bytes at %d): data checksum %#08x, record says %#08x",
				s.Writes, length, off, c, rcrc)
		}
		crc = crc32.Update(crc, castagnoli, data)
		if raw != nil {
			if _, err := raw.Write(data); err != nil {
				return Summary{}, err
			}
		}
		if sink != nil {
			if err := sink(int64(off), data); err != nil {
				return Summary{}, err
			}
		}
		s.Writes++
		s.Bytes += int64(length)
		s.Encoded += int64(length)
	}
}

// readErr names a read that stopped: the end of the stream is a format error
// (truncated), anything else is the reader's.
func readErr(what string, err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return formatErr("stream truncated in %s", what)
	}
	return fmt.Errorf("read %s: %w", what, err)
}

// Write is one write of a decoded stream.
type Write struct {
	// Offset is the byte offset in the image.
	Offset int64
	// Data is what was written there.
	Data []byte
}

// Stream is a decoded epoch or sync stream.
type Stream struct {
	// Summary describes the stream.
	Summary Summary
	// Writes are the stream's writes in the order they were made.
	Writes []Write
}

// DecodeEpoch decodes and verifies a complete epoch stream for an image of
// size bytes. On error it returns no stream, only the error (wrapping
// ErrFormat and naming the problem). Replica.Receive verifies the same way
// without holding the writes in memory.
func DecodeEpoch(b []byte, size int64) (*Stream, error) {
	return decodeAll(b, kindEpoch, size)
}

// DecodeSync decodes and verifies a complete sync stream for an image of size
// bytes, like DecodeEpoch.
func DecodeSync(b []byte, size int64) (*Stream, error) {
	return decodeAll(b, kindSync, size)
}

func decodeAll(b []byte, kind uint16, size int64) (*Stream, error) {
	var d decoder
	var ws []Write
	s, err := d.read(bytes.NewReader(b), kind, size, 0, nil, func(off int64, data []byte) error {
		ws = append(ws, Write{Offset: off, Data: append([]byte(nil), data...)})
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.Writes = len(ws)
	return &Stream{Summary: s, Writes: ws}, nil
}
