package replicate

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"
	"unicode/utf8"
)

// Protocol versions. A backup accepts a primary whose version range
// [MinVersion, Version] overlaps its own and speaks the highest common one.
// Version 2 added the disk (hello's disk fields, the disk messages); a
// version-1 peer is refused with a message naming both ranges.
const (
	Version    = 2
	MinVersion = 2
)

// Wire limits, "to prevent DoS": a decoder refuses anything larger before it
// allocates.
const (
	HeaderSize    = 16
	MaxPayload    = 8 << 20 // any one message
	MaxBatchPages = 512     // pages in one Pages message
	MaxRegions    = 64
	MaxVCPUs      = 1024
	maxReason     = 1024
	maxVMM        = 256
	pageEntrySize = 16
)

var magic = [8]byte{'R', 'E', 'P', 'A', 'G', 'E', 'N', 'T'}

// ErrProtocol is returned (wrapped, naming the problem) for anything on the
// wire that does not decode or breaks the protocol's rules: the side that
// sees it drops the session and keeps its last good checkpoint.
var ErrProtocol = errors.New("replication protocol error")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}

// MsgType is a message's type. 0 is invalid, so a zeroed header means nothing.
type MsgType uint16

const (
	_             MsgType = iota
	MsgHello              // P→B: magic, versions, VM shape, timing
	MsgWelcome            // B→P: the version chosen
	MsgReject             // either way: the session is refused or ended, with a reason
	MsgPages              // P→B: a batch of pages of the epoch in the header
	MsgState              // P→B: the machine state of the epoch in the header
	MsgEnd                // P→B: end of epoch: page count, checksum, memory digest
	MsgAck                // B→P: the epoch in the header is safe on the backup
	MsgHeartbeat          // either way: still alive
	MsgBye                // P→B: the primary stops on purpose; do not fail over
	MsgDiskHashes         // B→P: part of the backup image's hash list, for the disk sync
	MsgDiskSync           // P→B: a disk sync stream: blocks applied at once
	MsgDisk               // P→B: part of the disk writes of the checkpoint epoch in the header
	msgTypes
)

var msgNames = [...]string{"invalid", "hello", "welcome", "reject", "pages", "state", "end", "ack", "heartbeat", "bye",
	"disk-hashes", "disk-sync", "disk"}

func (t MsgType) String() string {
	if t < msgTypes {
		return msgNames[t]
	}
	return fmt.Sprintf("type(%d)", uint16(t))
}

// Header starts every message: 16 bytes, little-endian.
//
//	0  type    uint16
//	2  flags   uint16 (0; reserved)
//	4  length  uint32 (payload bytes that follow)
//	8  epoch   uint64
type Header struct {
	Type   MsgType
	Flags  uint16
	Length uint32
	Epoch  uint64
}

func (h Header) put(b []byte) {
	binary.LittleEndian.PutUint16(b[0:], uint16(h.Type))
	binary.LittleEndian.PutUint16(b[2:], h.Flags)
	binary.LittleEndian.PutUint32(b[4:], h.Length)
	binary.LittleEndian.PutUint64(b[8:], h.Epoch)
}

// parseHeader decodes and checks a header.
func parseHeader(b []byte) (Header, error) {
	if len(b) != HeaderSize {
		return Header{}, protoErr("header: %d bytes, want %d", len(b), HeaderSize)
	}
	h := Header{
		Type:   MsgType(binary.LittleEndian.Uint16(b[0:])),
		Flags:  binary.LittleEndian.Uint16(b[2:]),
		Length: binary.LittleEndian.Uint32(b[4:]),
		Epoch:  binary.LittleEndian.Uint64(b[8:]),
	}
	if h.Type == 0 || h.Type >= msgTypes {
		return Header{}, protoErr("unknown message type %d", uint16(h.Type))
	}
	if h.Flags != 0 {
		return Header{}, protoErr("%v message with unknown flags %#x", h.Type, h.Flags)
	}
	if h.Length > MaxPayload {
		return Header{}, protoErr("%v message of %d bytes exceeds the %d-byte limit", h.Type, h.Length, MaxPayload)
	}
	return h, nil
}

// Region is one guest memory region as the wire carries it.
type Region struct {
	Slot uint32
	GPA  uint64
	Size uint64
}

// Shape is what must match for a replica to be a copy of a VM: its memory
// layout and vCPUs.
type Shape struct {
	MemSize uint64 // sum of the regions' sizes
	VCPUs   uint32
	Regions []Region
}

// Pages is the number of pages of the replica.
func (s Shape) Pages() uint64 { return s.MemSize / PageSize }

// Equal reports whether s and o describe the same VM.
func (s Shape) Equal(o Shape) bool {
	if s.MemSize != o.MemSize || s.VCPUs != o.VCPUs || len(s.Regions) != len(o.Regions) {
		return false
	}
	for i := range s.Regions {
		if s.Regions[i] != o.Regions[i] {
			return false
		}
	}
	return true
}

func (s Shape) String() string {
	return fmt.Sprintf("%d vCPUs, %d MiB in %d regions", s.VCPUs, s.MemSize>>20, len(s.Regions))
}

// check validates a shape's internal consistency.
func (s Shape) check() error {
	if s.VCPUs == 0 || s.VCPUs > MaxVCPUs {
		return protoErr("shape: %d vCPUs (want 1 to %d)", s.VCPUs, MaxVCPUs)
	}
	if len(s.Regions) == 0 || len(s.Regions) > MaxRegions {
		return protoErr("shape: %d memory regions (want 1 to %d)", len(s.Regions), MaxRegions)
	}
	var sum uint64
	for i, r := range s.Regions {
		if r.Size == 0 || r.GPA%PageSize != 0 || r.Size%PageSize != 0 || r.GPA+r.Size < r.GPA {
			return protoErr("shape: region %d (GPA %#x, %d bytes) is empty, unaligned or wraps", i, r.GPA, r.Size)
		}
		for _, o := range s.Regions[:i] {
			if r.GPA < o.GPA+o.Size && o.GPA < r.GPA+r.Size {
				return protoErr("shape: region %d (GPA %#x) overlaps another", i, r.GPA)
			}
		}
		sum += r.Size
		if sum < r.Size {
			return protoErr("shape: region sizes overflow")
		}
	}
	if sum != s.MemSize {
		return protoErr("shape: regions hold %d bytes, memory size says %d", sum, s.MemSize)
	}
	return nil
}

// Hello opens a session (P→B).
//
//	0   magic      "REPAGENT"
//	8   version    uint32 (highest spoken)
//	12  minVersion uint32 (lowest spoken)
//	16  pageSize   uint32 (4096)
//	20  vcpus      uint32
//	24  memSize    uint64
//	32  interval   int64 ns
//	40  heartbeat  int64 ns (the primary's heartbeat period)
//	48  nRegions   uint32
//	52  vmmLen     uint32
//	56  diskSize   uint64 (bytes of the mirrored disk image; 0: no disk)
//	64  diskBlock  uint32 (the disk sync's block size; 0 without a disk)
//	68  pad        uint32
//	72  regions    nRegions × {slot uint32, pad uint32, gpa uint64, size uint64}
//	..  vmm        vmmLen bytes, UTF-8 (who the primary is, for messages)
type Hello struct {
	Version, MinVersion uint32
	Shape               Shape
	Interval            time.Duration
	Heartbeat           time.Duration
	DiskSize            int64
	DiskBlock           uint32
	VMM                 string
}

const helloFixed = 72

func appendHello(dst []byte, h Hello) []byte {
	dst = append(dst, magic[:]...)
	dst = binary.LittleEndian.AppendUint32(dst, h.Version)
	dst = binary.LittleEndian.AppendUint32(dst, h.MinVersion)
	dst = binary.LittleEndian.AppendUint32(dst, PageSize)
	dst = binary.LittleEndian.AppendUint32(dst, h.Shape.VCPUs)
	dst = binary.LittleEndian.AppendUint64(dst, h.Shape.MemSize)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(h.Interval))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(h.Heartbeat))
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(h.Shape.Regions)))
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(h.VMM)))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(h.DiskSize))
	dst = binary.LittleEndian.AppendUint32(dst, h.DiskBlock)
	dst = binary.LittleEndian.AppendUint32(dst, 0)
	for _, r := range h.Shape.Regions {
		dst = binary.LittleEndian.AppendUint32(dst, r.Slot)
		dst = binary.LittleEndian.AppendUint32(dst, 0)
		dst = binary.LittleEndian.AppendUint64(dst, r.GPA)
		dst = binary.LittleEndian.AppendUint64(dst, r.Size)
	}
	return append(dst, h.VMM...)
}

// helloVersioned is the part of Hello every version shares: the magic and the
// version range. The rest of the layout depends on the version.
const helloVersioned = 16

// decodeHello decodes a Hello payload. It checks the magic and the version
// range first (so that a primary of another version hears about versions,
// not about a layout it does not use), then the page size and the shape;
// choosing the version is the caller's (negotiate).
func decodeHello(b []byte) (Hello, error) {
	var h Hello
	if len(b) < helloVersioned {
		return Hello{}, protoErr("hello: %d bytes, want at least %d", len(b), helloFixed)
	}
	if [8]byte(b[:8]) != magic {
		return Hello{}, protoErr("hello: bad magic %q (not a repagent primary)", b[:8])
	}
	le := binary.LittleEndian
	h.Version, h.MinVersion = le.Uint32(b[8:]), le.Uint32(b[12:])
	if h.MinVersion > h.Version {
		return Hello{}, protoErr("hello: version range %d..%d is empty", h.MinVersion, h.Version)
	}
	if _, err := negotiate(h); err != nil {
		return Hello{}, err
	}
	if len(b) < helloFixed {
		return Hello{}, protoErr("hello: %d bytes, want at least %d", len(b), helloFixed)
	}
	if ps := le.Uint32(b[16:]); ps != PageSize {
		return Hello{}, protoErr("hello: page size %d, want %d", ps, PageSize)
	}
	h.Shape.VCPUs, h.Shape.MemSize = le.Uint32(b[20:]), le.Uint64(b[24:])
	h.Interval, h.Heartbeat = time.Duration(le.Uint64(b[32:])), time.Duration(le.Uint64(b[40:]))
	n, vl := le.Uint32(b[48:]), le.Uint32(b[52:])
	if n == 0 || n > MaxRegions {
		return Hello{}, protoErr("hello: %d memory regions (want 1 to %d)", n, MaxRegions)
	}
	if vl > maxVMM {
		return Hello{}, protoErr("hello: VMM name of %d bytes (limit %d)", vl, maxVMM)
	}
	if want := helloFixed + int(n)*24 + int(vl); len(b) != want {
		return Hello{}, protoErr("hello: %d bytes, want %d for %d regions", len(b), want, n)
	}
	h.DiskSize, h.DiskBlock = int64(le.Uint64(b[56:])), le.Uint32(b[64:])
	if le.Uint32(b[68:]) != 0 {
		return Hello{}, protoErr("hello: nonzero padding after the disk block size")
	}
	if h.DiskSize < 0 || (h.DiskSize == 0) != (h.DiskBlock == 0) {
		return Hello{}, protoErr("hello: disk of %d bytes in %d-byte sync blocks (both 0 without a disk)", h.DiskSize, h.DiskBlock)
	}
	if h.Interval < MinInterval || h.Interval > MaxInterval || h.Heartbeat < time.Millisecond || h.Heartbeat > MaxInterval {
		return Hello{}, protoErr("hello: interval %v (want %v to %v) or heartbeat %v (want 1ms to %v) out of range",
			h.Interval, MinInterval, MaxInterval, h.Heartbeat, MaxInterval)
	}
	p := b[helloFixed:]
	h.Shape.Regions = make([]Region, n)
	for i := range h.Shape.Regions {
		if le.Uint32(p[4:]) != 0 {
			return Hello{}, protoErr("hello: region %d has nonzero padding", i)
		}
		h.Shape.Regions[i] = Region{Slot: le.Uint32(p), GPA: le.Uint64(p[8:]), Size: le.Uint64(p[16:])}
		p = p[24:]
	}
	if !utf8.Valid(p) {
		return Hello{}, protoErr("hello: VMM name is not UTF-8")
	}
	h.VMM = string(p)
	if err := h.Shape.check(); err != nil {
		return Hello{}, err
	}
	return h, nil
}

// negotiate picks the version both sides speak.
func negotiate(h Hello) (uint32, error) {
	v := min(h.Version, Version)
	if v < h.MinVersion || v < MinVersion {
		return 0, protoErr("protocol version: primary speaks %d..%d, this backup %d..%d", h.MinVersion, h.Version, MinVersion, Version)
	}
	return v, nil
}

// Welcome accepts a session (B→P): version uint32, pad uint32.
func appendWelcome(dst []byte, version uint32) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, version)
	return binary.LittleEndian.AppendUint32(dst, 0)
}

func decodeWelcome(b []byte) (uint32, error) {
	if len(b) != 8 {
		return 0, protoErr("welcome: %d bytes, want 8", len(b))
	}
	if binary.LittleEndian.Uint32(b[4:]) != 0 {
		return 0, protoErr("welcome: nonzero padding")
	}
	v := binary.LittleEndian.Uint32(b)
	if v < MinVersion || v > Version {
		return 0, protoErr("welcome: backup chose version %d, this primary speaks %d..%d", v, MinVersion, Version)
	}
	return v, nil
}

// Reject carries a reason: UTF-8 text of at most 1024 bytes.
func appendReject(dst []byte, reason string) []byte {
	if len(reason) > maxReason {
		reason = reason[:maxReason]
		for !utf8.ValidString(reason) {
			reason = reason[:len(reason)-1]
		}
	}
	return append(dst, reason...)
}

func decodeReject(b []byte) (string, error) {
	if len(b) > maxReason || !utf8.Valid(b) {
		return "", protoErr("reject: reason is not UTF-8 text of at most %d bytes", maxReason)
	}
	return string(b), nil
}

// Page encodings in a Pages message.
const (
	encRaw  = 1 // 4096 bytes as they are
	encLZ4  = 2 // an LZ4 block that decompresses to 4096 bytes
	encZero = 3 // a page of zeros; no data
)

// Pages carries up to MaxBatchPages pages:
//
//	0  count uint32
//	4  pad   uint32
//	8  count × entry:
//	     gpa uint64 (page-aligned), enc uint16, pad uint16, len uint32, data [len]
//
// raw has len 4096, lz4 1..4095, zero 0.
type pageEntry struct {
	GPA  uint64
	Enc  uint16
	Data []byte // aliases the payload
}

// appendPageEntry appends one entry to a Pages payload under construction.
func appendPageEntry(dst []byte, gpa uint64, enc uint16, data []byte) []byte {
	dst = binary.LittleEndian.AppendUint64(dst, gpa)
	dst = binary.LittleEndian.AppendUint16(dst, enc)
	dst = binary.LittleEndian.AppendUint16(dst, 0)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(data)))
	return append(dst, data...)
}

// pagesHeader starts a Pages payload; setPagesCount fills the count in.
func pagesHeader(dst []byte) []byte { return append(dst, 0, 0, 0, 0, 0, 0, 0, 0) }

func setPagesCount(payload []byte, n int) { binary.LittleEndian.PutUint32(payload, uint32(n)) }

// decodePages calls f for each entry of a Pages payload, after checking the
// whole payload, so f never sees part of a malformed batch.
func decodePages(b []byte, f func(pageEntry) error) error {
	n, err := checkPages(b)
	if err != nil {
		return err
	}
	p := b[8:]
	for range n {
		e, rest := nextPage(p)
		if err := f(e); err != nil {
			return err
		}
		p = rest
	}
	return nil
}

func nextPage(p []byte) (pageEntry, []byte) {
	l := binary.LittleEndian.Uint32(p[12:])
	e := pageEntry{GPA: binary.LittleEndian.Uint64(p), Enc: binary.LittleEndian.Uint16(p[8:]), Data: p[pageEntrySize : pageEntrySize+l]}
	return e, p[pageEntrySize+l:]
}

func checkPages(b []byte) (int, error) {
	if len(b) < 8 {
		return 0, protoErr("pages: %d bytes, too short", len(b))
	}
	n := binary.LittleEndian.Uint32(b)
	if n == 0 || n > MaxBatchPages {
		return 0, protoErr("pages: count %d (want 1 to %d)", n, MaxBatchPages)
	}
	if binary.LittleEndian.Uint32(b[4:]) != 0 {
		return 0, protoErr("pages: nonzero padding after the count")
	}
	p := b[8:]
	for i := range n {
		if len(p) < pageEntrySize {
			return 0, protoErr("pages: entry %d truncated", i)
		}
		gpa := binary.LittleEndian.Uint64(p)
		enc := binary.LittleEndian.Uint16(p[8:])
		l := binary.LittleEndian.Uint32(p[12:])
		if gpa%PageSize != 0 {
			return 0, protoErr("pages: entry %d: GPA %#x not page-aligned", i, gpa)
		}
		if binary.LittleEndian.Uint16(p[10:]) != 0 {
			return 0, protoErr("pages: entry %d (GPA %#x): nonzero padding", i, gpa)
		}
		switch {
		case enc == encRaw && l == PageSize, enc == encLZ4 && l > 0 && l < PageSize, enc == encZero && l == 0:
		default:
			return 0, protoErr("pages: entry %d (GPA %#x): encoding %d with %d bytes", i, gpa, enc, l)
		}
		if uint64(len(p)-pageEntrySize) < uint64(l) {
			return 0, protoErr("pages: entry %d (GPA %#x) truncated", i, gpa)
		}
		p = p[pageEntrySize+int(l):]
	}
	if len(p) != 0 {
		return 0, protoErr("pages: %d bytes after the last entry", len(p))
	}
	return int(n), nil
}

// End closes an epoch (P→B):
//
//	0  pages    uint64 (pages sent in the epoch)
//	8  digest   uint64 (memory digest once the epoch is applied)
//	16 checksum uint32 (CRC32C of every Pages, DiskSync, Disk and State message of a checkpoint, headers included, in order;
//	                   of the Pages messages of a pre-copy round)
//	20 kind     uint32 (1 pre-copy round, 2 checkpoint)
//	24 round    uint32 (pre-copy round; 0 for a checkpoint)
//	28 pad      uint32
//
// A checkpoint epoch carries exactly one State message; a pre-copy round none.
type End struct {
	Pages    uint64
	Digest   uint64
	Checksum uint32
	Kind     uint32
	Round    uint32
}

const (
	kindPrecopy    = 1
	kindCheckpoint = 2
	endSize        = 32
)

func appendEnd(dst []byte, e End) []byte {
	dst = binary.LittleEndian.AppendUint64(dst, e.Pages)
	dst = binary.LittleEndian.AppendUint64(dst, e.Digest)
	dst = binary.LittleEndian.AppendUint32(dst, e.Checksum)
	dst = binary.LittleEndian.AppendUint32(dst, e.Kind)
	dst = binary.LittleEndian.AppendUint32(dst, e.Round)
	return binary.LittleEndian.AppendUint32(dst, 0)
}

func decodeEnd(b []byte) (End, error) {
	if len(b) != endSize {
		return End{}, protoErr("end: %d bytes, want %d", len(b), endSize)
	}
	le := binary.LittleEndian
	e := End{Pages: le.Uint64(b), Digest: le.Uint64(b[8:]), Checksum: le.Uint32(b[16:]), Kind: le.Uint32(b[20:]), Round: le.Uint32(b[24:])}
	if e.Kind != kindPrecopy && e.Kind != kindCheckpoint {
		return End{}, protoErr("end: unknown epoch kind %d", e.Kind)
	}
	if le.Uint32(b[28:]) != 0 {
		return End{}, protoErr("end: nonzero padding")
	}
	if e.Kind == kindCheckpoint && e.Round != 0 {
		return End{}, protoErr("end: checkpoint with pre-copy round %d", e.Round)
	}
	return e, nil
}

// Ack acknowledges the epoch in its header (B→P): digest uint64, the
// backup's memory digest with that epoch applied, for the primary to check.
func appendAck(dst []byte, digest uint64) []byte {
	return binary.LittleEndian.AppendUint64(dst, digest)
}

func decodeAck(b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, protoErr("ack: %d bytes, want 8", len(b))
	}
	return binary.LittleEndian.Uint64(b), nil
}

// Heartbeat (either way): sent int64 (sender's clock, ns), epoch uint64 (the
// latest epoch the sender finished: sent by a primary, acknowledged by a backup).
type Heartbeat struct {
	Sent  int64
	Epoch uint64
}

func appendHeartbeat(dst []byte, h Heartbeat) []byte {
	dst = binary.LittleEndian.AppendUint64(dst, uint64(h.Sent))
	return binary.LittleEndian.AppendUint64(dst, h.Epoch)
}

func decodeHeartbeat(b []byte) (Heartbeat, error) {
	if len(b) != 16 {
		return Heartbeat{}, protoErr("heartbeat: %d bytes, want 16", len(b))
	}
	return Heartbeat{Sent: int64(binary.LittleEndian.Uint64(b)), Epoch: binary.LittleEndian.Uint64(b[8:])}, nil
}

// castagnoli is the CRC32C table for epoch checksums and page digests.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// msgReader reads framed messages. The payload it returns is valid until the
// next ReadMsg.
type msgReader struct {
	r   *bufio.Reader
	hdr [HeaderSize]byte
	buf []byte
}

func newMsgReader(r io.Reader) *msgReader {
	return &msgReader{r: bufio.NewReaderSize(r, 256<<10)}
}

// ReadMsg reads one message. A stream that ends inside a message returns
// io.ErrUnexpectedEOF; one that ends between messages, io.EOF.
func (m *msgReader) ReadMsg() (Header, []byte, error) {
	if _, err := io.ReadFull(m.r, m.hdr[:]); err != nil {
		return Header{}, nil, err
	}
	h, err := parseHeader(m.hdr[:])
	if err != nil {
		return Header{}, nil, err
	}
	if cap(m.buf) < int(h.Length) {
		m.buf = make([]byte, h.Length, max(int(h.Length), 2*cap(m.buf)))
	}
	m.buf = m.buf[:h.Length]
	if _, err := io.ReadFull(m.r, m.buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Header{}, nil, err
	}
	return h, m.buf, nil
}

// rawHeader returns the bytes of the last header read, for checksums.
func (m *msgReader) rawHeader() []byte { return m.hdr[:] }

// encodeMsg appends a whole message (header and payload) to dst.
func encodeMsg(dst []byte, t MsgType, epoch uint64, payload []byte) []byte {
	var hb [HeaderSize]byte
	Header{Type: t, Length: uint32(len(payload)), Epoch: epoch}.put(hb[:])
	return append(append(dst, hb[:]...), payload...)
}
