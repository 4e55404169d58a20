package replicate

// The wire protocol: the session, the backup receiver's states, and every
// message's bytes. This file is the one place the format is defined; the
// sender (sender.go) and the receiver (backup.go) call its encoders and
// decoders, and switch on the session's version only through them.
//
// # Framing
//
// One TCP connection per session. Every message starts with a 16-byte
// little-endian header: type uint16, flags uint16 (0), payload length uint32
// (at most MaxPayload), epoch uint64. Type 0 is invalid, so a zeroed header
// means nothing. The payloads (each is laid out byte by byte at its type
// below):
//
//	hello       P→B  "REPAGENT", versions max and min, page size, vCPUs,
//	                 memory size, interval, heartbeat period, stream size and
//	                 sync block size (0 without a stream), regions, VMM name
//	welcome     B→P  the version chosen (the highest both speak); the
//	                 session's ID, which the backup chooses (version 4)
//	reject      both the reason a session is refused or ended, as text
//	pages       P→B  up to MaxBatchPages pages: a count, then an entry per
//	                 page (GPA, CRC32C of its 4 KiB, encoding raw, lz4 or
//	                 zero, data length), then the pages' data back to back
//	                 (version 2: each entry, without CRC, followed by its data)
//	state       P→B  the machine state of a checkpoint epoch
//	end         P→B  pages in the epoch, memory digest, CRC32C over the
//	                 epoch's messages in order: headers and page entries of
//	                 pages messages (their data is covered by the entries'
//	                 CRCs; version 2: pages messages whole), stream and
//	                 state messages whole; kind (pre-copy round or
//	                 checkpoint), round
//	ack         B→P  the epoch in the header is safe; the backup's digest and
//	                 its engine CPU time so far (version 2: the digest)
//	heartbeat   both the sender's clock, its latest epoch, and a progress
//	                 count that moves while its engine works (bytes read and
//	                 pages applied, on the backup; version 2: no progress)
//	bye         P→B  the primary stops on purpose: do not fail over
//	stream-reply B→P part of the sink's reply to hello (a disk's hash list)
//	stream-sync  P→B one sync message of the stream, applied at once
//	stream       P→B part of the epoch's stream part (≤ 1 MiB)
//	handover    P→B  (version 4) no payload: the epoch in the header,
//	                 acknowledged, is the session's last: resume it now
//	resumed     B→P  (version 4) no payload: the VM of the handover's epoch
//	                 runs on the backup (the primary may stop)
//
// # A session
//
// Pre-copy rounds travel as epoch 0; checkpoints are epochs 1, 2, 3, ...
// (doc.go's "Streams" shows a session with a disk's stream):
//
//	primary                                   backup
//	   |---- hello (v2..4, shape) -------------->|  check magic, version, shape
//	   |<--- welcome (v4, session ID) -----------|  fresh replica memory
//	   |---- pages(0) ... end(0, round 0) ------>|  applied as they come: no
//	   |---- pages(0) ... end(0, round 1) ------>|  checkpoint exists yet
//	   |       (pause 1: harvest, save, stage)   |
//	   |---- pages(1) ... state(1) end(1) ------>|  each page's CRC checked
//	   |       (pause 2, once 1 is sent)         |  as it arrives; applied
//	   |---- pages(2) ...                        |  at once for epoch 1 (no
//	   |                                         |  checkpoint exists yet),
//	   |                                         |  staged after; at end:
//	   |                                         |  checksum, page count,
//	   |                                         |  digest; then
//	   |<--- ack(1, digest) ---------------------|  ack, then apply to replica
//	   |  gates commit 1                         |
//	   |---- ... state(2) end(2) --------------->|
//	   |<--- heartbeat --------------------------|  (both ways, every period)
//	   |<--- ack(2, digest) ---------------------|
//	   X  primary dies                           |
//	                                             |  EOF, reset or timeout:
//	                                             |  drop the partial epoch,
//	                                             |  resume the replica
//
// A planned migration (Primary.Handover) ends a session instead with:
//
//	   |  (final pause N: the VM stays paused)   |
//	   |---- pages(N) ... state(N) end(N) ------>|
//	   |<--- ack(N, digest) ---------------------|
//	   |---- handover(N) ----------------------->|  resume checkpoint N
//	   |<--- resumed(N) -------------------------|  (the VM runs here)
//	   |  the primary stops its VM               |
//
// # The backup's receiver
//
// The backup's session is in one of these states (recvState, session.go):
//
//	awaitHello  nothing yet: only a hello is legal
//	syncRound   the initial sync (epoch 0), inside a pre-copy round or between two
//	ckptData    checkpoint N before its state: its pages, its stream part
//	ckptState   checkpoint N after its state, until its end record
//	closed      the session ended (bye, reject, a protocol error, the primary lost)
//
// and accepts, from the primary (✓: legal; →: the state it moves to; a
// condition in brackets is checked beside the state):
//
//	message      awaitHello   syncRound                ckptData                  ckptState
//	hello        ✓ → syncRound
//	pages                     ✓                        ✓                         ✓ (a reorder fails the checksum)
//	stream-sync               ✓ [between rounds]       ✓ [epoch 1: the residual]
//	stream                                             ✓ [epoch ≥ 2]
//	state                                              ✓ → ckptState
//	end                       ✓ → syncRound (round+1)  ✓ [refused: no state]     ✓ → ckptData (N+1)
//	heartbeat                 ✓                        ✓                         ✓
//	bye                       ✓ [between rounds] →     ✓ [nothing of N yet] →
//	                            closed                   closed
//	handover                                           ✓ [v4, N-1 acked, nothing
//	                                                     of N yet] → closed
//	reject                    ✓ → closed               ✓ → closed                ✓ → closed
//
// A data message (pages, stream-sync, stream, state, end) must carry the
// epoch in progress: 0 in syncRound, N in a checkpoint. The first data
// message of epoch 1 in syncRound, between rounds, moves it to ckptData (1):
// the sync is over. Any other message, or a legal one that fails its
// condition, is a protocol error naming the message and the state: the
// backup sends reject, moves to closed, and keeps its last good checkpoint;
// it never applies part of an epoch (save a stream's sync messages, see
// doc.go's "Streams"). So is a message that does not decode, exceeds a
// limit, repeats a page within an epoch, names a page outside memory, or
// fails its checksum or digest.
//
// The primary's reader is simpler: after the welcome (and a stream's reply)
// it takes acks, heartbeats and a reject, in any order; an ack must name the
// oldest epoch sent and not acknowledged; resumed only after its handover.
//
// # Staging
//
// Staging adds no framing of its own: the header's length frames each
// payload, and a payload's entries locate its pages. On the primary,
// staging (sender.go's arena) is a ring of 4 KiB page slots, one per page
// captured, freed in order once an epoch is sent; a batch is its header,
// count and entries in one buffer (batch.head), then its data as pieces
// (seg) of staging or of the batch's LZ4 buffer, written with one vectored
// write: in version 3 a run of raw pages adjacent in staging is one piece,
// in version 2 each entry goes out between its page's pieces. On the
// backup, a checkpoint's Pages payloads are read from the socket whole into
// the receive arena (recvarena.go: chunks of 2 × MaxPayload, so a payload
// never straddles two), and its LZ4 pages are decoded into the same arena
// beside them; a pageRec names each page's 4 KiB by chunk and offset (a
// raw page where it lies in its payload, an LZ4 page where it was decoded;
// none for a zero page) until the end record verifies and the page is
// copied into the replica. Pre-copy rounds and checkpoint 1 are applied
// message by message, the arena reset after each.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"time"
	"unicode/utf8"
)

// Protocol versions. A backup accepts a primary whose version range
// [MinVersion, Version] overlaps its own and speaks the highest common one;
// the primary speaks the version the backup's welcome names. Both sides
// speak the current version and the two before it:
//
//   - Version 4 (current) is version 3 plus a welcome that carries a
//     16-byte session ID (SessionID) the backup chooses at random, so that
//     both sides (and the fencing that records which backup session is a
//     VM's standby) can name the session. Every other message is as in
//     version 3.
//   - Version 3 (previous) puts each page's CRC32C in its entry and the
//     pages' data after all the entries; the end record's checksum covers
//     a Pages message's header and entries, not its data (the entries' CRCs
//     do). The ack carries the backup's engine CPU time, heartbeats a
//     progress count. Its welcome has no session ID.
//   - Version 2 (still spoken) carries each page's data right after its entry,
//     with no CRC: the backup computes each page's CRC itself, and the end
//     checksum covers whole Pages messages. The ack is the digest alone, a
//     heartbeat has no progress (so a busy v2 peer on a full link shows
//     none). It added the device stream (hello's stream fields, the stream
//     messages), which version 3 keeps as it was.
//   - Version 1 had no stream; it is no longer spoken, and a peer of it is
//     refused with a message naming both ranges.
//
// The rest (header, hello, reject, state, end, bye, the stream messages) is
// the same in versions 2, 3 and 4, and so is the welcome in versions 2 and
// 3. The encoders and decoders switch on version 2 alone (== 2, != 2), save
// the welcome's, which switches on version 4: versions 3 and 4 differ in
// nothing else, and what a comment says of version 3 (of anything but the
// welcome) holds for version 4.
const (
	Version    = 4
	MinVersion = 2
)

// SessionID names one replication session. The backup chooses it at random
// (crypto/rand) for each session and sends it in the version-4 welcome; it
// is zero in sessions of versions 2 and 3, whose welcome has none. Fencing
// records it to tell the backup session that holds a VM's current replica
// from one holding a stale one.
type SessionID [16]byte

// String is the ID as 32 lower-case hex digits.
func (id SessionID) String() string { return hex.EncodeToString(id[:]) }

// IsZero reports whether id is the zero ID: no session named (versions 2
// and 3, or before the welcome).
func (id SessionID) IsZero() bool { return id == SessionID{} }

// newSessionID draws a session ID from crypto/rand (never zero).
func newSessionID() SessionID {
	var id SessionID
	for id.IsZero() {
		rand.Read(id[:]) // never fails (crypto/rand.Read's contract since Go 1.24)
	}
	return id
}

// versions is a range of protocol versions a side speaks: [MinVersion,
// Version] unless a test narrows it (export_test.go) to play an older peer.
type versions struct{ lo, hi uint32 }

// orDefault is v, or the versions this build speaks if v is unset.
func (v versions) orDefault() versions {
	if v == (versions{}) {
		return versions{MinVersion, Version}
	}
	return v
}

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

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}

// MsgType is a message's type. 0 is invalid, so a zeroed header means nothing.
type MsgType uint16

const (
	_              MsgType = iota
	MsgHello               // P→B: magic, versions, VM shape, timing
	MsgWelcome             // B→P: the version chosen; the session ID (version 4)
	MsgReject              // either way: the session is refused or ended, with a reason
	MsgPages               // P→B: a batch of pages of the epoch in the header
	MsgState               // P→B: the machine state of the epoch in the header
	MsgEnd                 // P→B: end of epoch: page count, checksum, memory digest
	MsgAck                 // B→P: the epoch in the header is safe on the backup
	MsgHeartbeat           // either way: still alive
	MsgBye                 // P→B: the primary stops on purpose; do not fail over
	MsgStreamReply         // B→P: part of the backup sink's reply to hello (a disk image's hash list)
	MsgStreamSync          // P→B: a stream sync message (disk blocks), applied at once
	MsgStreamEpoch         // P→B: part of the stream of the checkpoint epoch in the header (disk writes)
	MsgHandover            // P→B (version 4): the epoch in the header, acknowledged, is the last: resume the VM now (a planned migration)
	MsgResumed             // B→P (version 4): the VM of the handover's epoch runs here
	msgTypes
)

var msgNames = [...]string{"invalid", "hello", "welcome", "reject", "pages", "state", "end", "ack", "heartbeat", "bye",
	"stream-reply", "stream-sync", "stream", "handover", "resumed"}

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
//	56  streamSize  uint64 (bytes of the device stream, a mirrored disk; 0: none)
//	64  streamBlock uint32 (the stream sync's block size; 0 without a stream)
//	68  pad        uint32
//	72  regions    nRegions × {slot uint32, pad uint32, gpa uint64, size uint64}
//	..  vmm        vmmLen bytes, UTF-8 (who the primary is, for messages)
type Hello struct {
	Version, MinVersion uint32
	Shape               Shape
	Interval            time.Duration
	Heartbeat           time.Duration
	Stream              StreamInfo
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
	dst = binary.LittleEndian.AppendUint64(dst, uint64(h.Stream.Size))
	dst = binary.LittleEndian.AppendUint32(dst, h.Stream.Block)
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

// decodeHello decodes a Hello payload for a backup that speaks ours, and
// returns the version the session speaks (the highest both speak). It checks
// the magic and the version range first (so that a primary of another
// version hears about versions, not about a layout it does not use), then
// the page size and the shape. The layout is the same in every version
// spoken.
func decodeHello(b []byte, ours versions) (Hello, uint32, error) {
	var h Hello
	if len(b) < helloVersioned {
		return Hello{}, 0, protoErr("hello: %d bytes, want at least %d", len(b), helloFixed)
	}
	if [8]byte(b[:8]) != magic {
		return Hello{}, 0, protoErr("hello: bad magic %q (not a repagent primary)", b[:8])
	}
	le := binary.LittleEndian
	h.Version, h.MinVersion = le.Uint32(b[8:]), le.Uint32(b[12:])
	if h.MinVersion > h.Version {
		return Hello{}, 0, protoErr("hello: version range %d..%d is empty", h.MinVersion, h.Version)
	}
	v, err := negotiate(h, ours)
	if err != nil {
		return Hello{}, 0, err
	}
	if len(b) < helloFixed {
		return Hello{}, 0, protoErr("hello: %d bytes, want at least %d", len(b), helloFixed)
	}
	if ps := le.Uint32(b[16:]); ps != PageSize {
		return Hello{}, 0, protoErr("hello: page size %d, want %d", ps, PageSize)
	}
	h.Shape.VCPUs, h.Shape.MemSize = le.Uint32(b[20:]), le.Uint64(b[24:])
	h.Interval, h.Heartbeat = time.Duration(le.Uint64(b[32:])), time.Duration(le.Uint64(b[40:]))
	n, vl := le.Uint32(b[48:]), le.Uint32(b[52:])
	if n == 0 || n > MaxRegions {
		return Hello{}, 0, protoErr("hello: %d memory regions (want 1 to %d)", n, MaxRegions)
	}
	if vl > maxVMM {
		return Hello{}, 0, protoErr("hello: VMM name of %d bytes (limit %d)", vl, maxVMM)
	}
	if want := helloFixed + int(n)*24 + int(vl); len(b) != want {
		return Hello{}, 0, protoErr("hello: %d bytes, want %d for %d regions", len(b), want, n)
	}
	h.Stream = StreamInfo{Size: int64(le.Uint64(b[56:])), Block: le.Uint32(b[64:])}
	if le.Uint32(b[68:]) != 0 {
		return Hello{}, 0, protoErr("hello: nonzero padding after the stream block size")
	}
	if s := h.Stream; s.Size < 0 || (s.Size == 0) != (s.Block == 0) {
		return Hello{}, 0, protoErr("hello: stream of %d bytes in %d-byte sync blocks (both 0 without a stream)", s.Size, s.Block)
	}
	if h.Interval < MinInterval || h.Interval > MaxInterval || h.Heartbeat < time.Millisecond || h.Heartbeat > MaxInterval {
		return Hello{}, 0, protoErr("hello: interval %v (want %v to %v) or heartbeat %v (want 1ms to %v) out of range",
			h.Interval, MinInterval, MaxInterval, h.Heartbeat, MaxInterval)
	}
	p := b[helloFixed:]
	h.Shape.Regions = make([]Region, n)
	for i := range h.Shape.Regions {
		if le.Uint32(p[4:]) != 0 {
			return Hello{}, 0, protoErr("hello: region %d has nonzero padding", i)
		}
		h.Shape.Regions[i] = Region{Slot: le.Uint32(p), GPA: le.Uint64(p[8:]), Size: le.Uint64(p[16:])}
		p = p[24:]
	}
	if !utf8.Valid(p) {
		return Hello{}, 0, protoErr("hello: VMM name is not UTF-8")
	}
	h.VMM = string(p)
	if err := h.Shape.check(); err != nil {
		return Hello{}, 0, err
	}
	return h, v, nil
}

// negotiate picks the highest version both the primary of h and a backup
// speaking ours speak.
func negotiate(h Hello, ours versions) (uint32, error) {
	v := min(h.Version, ours.hi)
	if v < h.MinVersion || v < ours.lo {
		return 0, protoErr("protocol version: primary speaks %d..%d, this backup %d..%d", h.MinVersion, h.Version, ours.lo, ours.hi)
	}
	return v, nil
}

// Welcome accepts a session (B→P). Versions 2 and 3:
//
//	0  version uint32 (the one chosen)
//	4  pad     uint32
//
// Version 4 adds the session's ID, chosen by the backup:
//
//	8  session [16]byte (nonzero)
//
// A welcome of version 2 or 3 ignores session.
func appendWelcome(dst []byte, version uint32, session SessionID) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, version)
	dst = binary.LittleEndian.AppendUint32(dst, 0)
	if version >= 4 {
		dst = append(dst, session[:]...)
	}
	return dst
}

const (
	welcomeV3 = 8  // a welcome's bytes in versions 2 and 3
	welcomeV4 = 24 // and in version 4
)

// decodeWelcome decodes a welcome for a primary that offered ours: the
// version the backup chose, which the layout depends on, and the session's
// ID (zero in versions 2 and 3).
func decodeWelcome(b []byte, ours versions) (uint32, SessionID, error) {
	if len(b) < welcomeV3 {
		return 0, SessionID{}, protoErr("welcome: %d bytes, want at least %d", len(b), welcomeV3)
	}
	v := binary.LittleEndian.Uint32(b)
	if v < ours.lo || v > ours.hi {
		return 0, SessionID{}, protoErr("welcome: backup chose version %d, this primary speaks %d..%d", v, ours.lo, ours.hi)
	}
	want := welcomeV3
	if v >= 4 {
		want = welcomeV4
	}
	if len(b) != want {
		return 0, SessionID{}, protoErr("welcome: %d bytes, want %d for version %d", len(b), want, v)
	}
	if binary.LittleEndian.Uint32(b[4:]) != 0 {
		return 0, SessionID{}, protoErr("welcome: nonzero padding")
	}
	var id SessionID
	if v >= 4 {
		id = SessionID(b[8:welcomeV4])
		if id.IsZero() {
			return 0, SessionID{}, protoErr("welcome: version %d with a zero session ID", v)
		}
	}
	return v, id, nil
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

// Pages carries up to MaxBatchPages pages. In version 3 their entries come
// first and their data after:
//
//	0          count uint32 (1 to MaxBatchPages)
//	4          pad   uint32 (0)
//	8          count × entry, 16 bytes each:
//	             gpa uint64 (page-aligned)
//	             crc uint32 (CRC32C of the page's 4096 bytes, once decoded)
//	             enc uint16 (1 raw, 2 lz4, 3 zero)
//	             len uint16 (bytes of data: 4096 raw, 1 to 4095 lz4, 0 zero)
//	8+16×count data: each entry's len bytes, back to back, in entry order
//
// The entries' CRCs are what the end record's checksum covers for pages (the
// data itself is covered by its CRC, which the backup checks when it decodes
// the page), and they are the pages' CRCs in the memory digest: each side
// reads each page's bytes for a CRC once. Data after the entries lets a run
// of raw pages go out of the primary's staging as one piece of a vectored
// write, and the backup read a message straight into its staging and copy
// each raw page from there into the replica.
//
// In version 2 each entry is followed by its data, and carries no CRC:
//
//	0          count uint32 (1 to MaxBatchPages)
//	4          pad   uint32 (0)
//	8          count × {gpa uint64, enc uint16, pad uint16 (0), len uint32, data [len]}
//
// with the same encodings and lengths; the end record's checksum covers the
// whole message, data included, and the backup computes each page's CRC.
type pageEntry struct {
	GPA uint64
	// CRC is the entry's CRC (version 3); in version 2, zeroCRC for a zero
	// page and 0 for the others, whose CRC the receiver computes.
	CRC  uint32
	Enc  uint16
	Data []byte // aliases the payload
	Off  int    // where Data starts in the payload
}

// pagesFixed is the count and pad before the entries.
const pagesFixed = 8

// putPageEntry writes entry i of a Pages payload of version v whose entries
// start at b[pagesFixed:]: in version 3 where the entries lie, in version 2
// in the same place of the sender's buffer, from where the sender writes
// each entry before its data (see batch.buffers).
func putPageEntry(v uint32, b []byte, i int, gpa uint64, crc uint32, enc uint16, n int) {
	e := b[pagesFixed+i*pageEntrySize:]
	binary.LittleEndian.PutUint64(e, gpa)
	if v == 2 {
		binary.LittleEndian.PutUint16(e[8:], enc)
		binary.LittleEndian.PutUint16(e[10:], 0)
		binary.LittleEndian.PutUint32(e[12:], uint32(n))
		return
	}
	binary.LittleEndian.PutUint32(e[8:], crc)
	binary.LittleEndian.PutUint16(e[12:], enc)
	binary.LittleEndian.PutUint16(e[14:], uint16(n))
}

// entryLen is the data length of an entry putPageEntry wrote.
func entryLen(v uint32, e []byte) int {
	if v == 2 {
		return int(binary.LittleEndian.Uint32(e[12:]))
	}
	return int(binary.LittleEndian.Uint16(e[14:]))
}

// putPagesCount writes the count and pad of a Pages payload.
func putPagesCount(b []byte, n int) {
	binary.LittleEndian.PutUint32(b, uint32(n))
	binary.LittleEndian.PutUint32(b[4:], 0)
}

// pagesMeta is how many bytes of a Pages payload with n entries are not page
// data (in version 3, all of them come before the data): what the end
// record's checksum covers in version 3.
func pagesMeta(n int) int { return pagesFixed + n*pageEntrySize }

// pagesCovered is the part of a Pages payload of version v with n entries
// that the end record's checksum covers, after the message's header.
func pagesCovered(v uint32, b []byte, n int) []byte {
	if v == 2 {
		return b
	}
	return b[:pagesMeta(n)]
}

// appendPages appends a whole Pages payload of version v, for tests and
// tools.
func appendPages(dst []byte, v uint32, entries []pageEntry) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, pagesMeta(len(entries)))...)
	putPagesCount(dst[start:], len(entries))
	for i, e := range entries {
		putPageEntry(v, dst[start:], i, e.GPA, e.CRC, e.Enc, len(e.Data))
	}
	if v == 2 {
		meta := bytes.Clone(dst[start+pagesFixed:])
		dst = dst[:start+pagesFixed]
		for i, e := range entries {
			dst = append(dst, meta[i*pageEntrySize:(i+1)*pageEntrySize]...)
			dst = append(dst, e.Data...)
		}
		return dst
	}
	for _, e := range entries {
		dst = append(dst, e.Data...)
	}
	return dst
}

// decodePages decodes a Pages payload of version v, in one walk, into dst
// (reused: a batch allocates nothing once dst has grown): the count, every
// entry's alignment, encoding and length, and that the data is exactly what
// the entries say. It returns the entries; on an error, none. What it checks
// is the message's structure: where each page lies in memory, and its bytes
// against its CRC, are the receiver's (session.pages).
func decodePages(v uint32, b []byte, dst []pageEntry) ([]pageEntry, error) {
	dst = dst[:0]
	if len(b) < pagesFixed {
		return dst, protoErr("pages: %d bytes, too short", len(b))
	}
	le := binary.LittleEndian
	n := le.Uint32(b)
	if n == 0 || n > MaxBatchPages {
		return dst, protoErr("pages: count %d (want 1 to %d)", n, MaxBatchPages)
	}
	if le.Uint32(b[4:]) != 0 {
		return dst, protoErr("pages: nonzero padding after the count")
	}
	if v == 2 {
		return decodePagesV2(b, int(n), dst)
	}
	meta := pagesMeta(int(n))
	if len(b) < meta {
		return dst, protoErr("pages: %d entries need %d bytes, the message has %d (truncated)", n, meta, len(b))
	}
	data := meta
	for i := range int(n) {
		e := b[pagesFixed+i*pageEntrySize:]
		pe := pageEntry{GPA: le.Uint64(e), CRC: le.Uint32(e[8:]), Enc: le.Uint16(e[12:]), Off: data}
		l := int(le.Uint16(e[14:]))
		if err := checkEntry(i, pe.GPA, pe.Enc, l); err != nil {
			return dst[:0], err
		}
		if data+l <= len(b) {
			pe.Data = b[data : data+l : data+l]
		}
		dst = append(dst, pe)
		data += l
	}
	if got, want := len(b)-meta, data-meta; got != want {
		if got < want {
			return dst[:0], protoErr("pages: entries hold %d bytes of data, the message %d (truncated)", want, got)
		}
		return dst[:0], protoErr("pages: %d bytes after the last entry's data", got-want)
	}
	return dst, nil
}

// decodePagesV2 is decodePages for version 2 after the count: entries with
// their data inline.
func decodePagesV2(b []byte, n int, dst []pageEntry) ([]pageEntry, error) {
	le := binary.LittleEndian
	off := pagesFixed
	for i := range n {
		if len(b)-off < pageEntrySize {
			return dst[:0], protoErr("pages: entry %d truncated", i)
		}
		e := b[off:]
		pe := pageEntry{GPA: le.Uint64(e), Enc: le.Uint16(e[8:])}
		if le.Uint16(e[10:]) != 0 {
			return dst[:0], protoErr("pages: entry %d (GPA %#x): nonzero padding", i, pe.GPA)
		}
		l := le.Uint32(e[12:])
		if err := checkEntry(i, pe.GPA, pe.Enc, int(l)); err != nil {
			return dst[:0], err
		}
		off += pageEntrySize
		if len(b)-off < int(l) {
			return dst[:0], protoErr("pages: entry %d (GPA %#x) truncated", i, pe.GPA)
		}
		pe.Data, pe.Off = b[off:off+int(l):off+int(l)], off
		if pe.Enc == encZero {
			pe.CRC = zeroCRC
		}
		dst = append(dst, pe)
		off += int(l)
	}
	if off != len(b) {
		return dst[:0], protoErr("pages: %d bytes after the last entry", len(b)-off)
	}
	return dst, nil
}

// checkEntry checks entry i's alignment, and its encoding with its length.
func checkEntry(i int, gpa uint64, enc uint16, l int) error {
	if gpa%PageSize != 0 {
		return protoErr("pages: entry %d: GPA %#x not page-aligned", i, gpa)
	}
	switch {
	case enc == encRaw && l == PageSize, enc == encLZ4 && l > 0 && l < PageSize, enc == encZero && l == 0:
		return nil
	}
	return protoErr("pages: entry %d (GPA %#x): encoding %d with %d bytes", i, gpa, enc, l)
}

// End closes an epoch (P→B):
//
//	0  pages    uint64 (pages sent in the epoch)
//	8  digest   uint64 (memory digest once the epoch is applied)
//	16 checksum uint32 (CRC32C, in stream order, of the epoch's messages with page data left out:
//	                   of each Pages message its header, count, pad and entries (with the pages' CRCs);
//	                   of each StreamSync, StreamEpoch and State message of a checkpoint, header and payload)
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

// Ack acknowledges the epoch in its header (B→P):
//
//	0 digest uint64 (the backup's memory digest with that epoch applied, for the primary to check)
//	8 cpu    uint64 (ns of CPU the backup's engine spent on the session's checkpoints so far; not in version 2)
//
// The CPU time is cumulative, so a lost report is no loss; the ack of N is
// sent once N is verified, before N is applied, so the difference between
// two acks is the receipt of one epoch and the application of the one before.
type Ack struct {
	Digest uint64
	CPU    time.Duration
}

const (
	ackSize   = 16
	ackSizeV2 = 8
)

func appendAck(dst []byte, v uint32, a Ack) []byte {
	dst = binary.LittleEndian.AppendUint64(dst, a.Digest)
	if v == 2 {
		return dst
	}
	return binary.LittleEndian.AppendUint64(dst, uint64(a.CPU))
}

func decodeAck(v uint32, b []byte) (Ack, error) {
	if v == 2 {
		if len(b) != ackSizeV2 {
			return Ack{}, protoErr("ack: %d bytes, want %d", len(b), ackSizeV2)
		}
		return Ack{Digest: binary.LittleEndian.Uint64(b)}, nil
	}
	if len(b) != ackSize {
		return Ack{}, protoErr("ack: %d bytes, want %d", len(b), ackSize)
	}
	cpu := binary.LittleEndian.Uint64(b[8:])
	if cpu > 1<<62 {
		return Ack{}, protoErr("ack: CPU time %d ns is not a duration", cpu)
	}
	return Ack{Digest: binary.LittleEndian.Uint64(b), CPU: time.Duration(cpu)}, nil
}

// Heartbeat (either way):
//
//	0  sent     int64  (the sender's clock, ns)
//	8  epoch    uint64 (the latest epoch the sender finished: sent by a primary, acknowledged by a backup)
//	16 progress uint64 (a count that grows while the sender's engine works:
//	                   bytes written by a primary, bytes read and pages applied by a backup; not in version 2)
//
// Progress tells a peer that cannot write (the link is full) whether the
// other side is busy or stuck: a busy peer is never taken for a dead one.
type Heartbeat struct {
	Sent     int64
	Epoch    uint64
	Progress uint64
}

const (
	heartbeatSize   = 24
	heartbeatSizeV2 = 16
)

func appendHeartbeat(dst []byte, v uint32, h Heartbeat) []byte {
	dst = binary.LittleEndian.AppendUint64(dst, uint64(h.Sent))
	dst = binary.LittleEndian.AppendUint64(dst, h.Epoch)
	if v == 2 {
		return dst
	}
	return binary.LittleEndian.AppendUint64(dst, h.Progress)
}

func decodeHeartbeat(v uint32, b []byte) (Heartbeat, error) {
	want := heartbeatSize
	if v == 2 {
		want = heartbeatSizeV2
	}
	if len(b) != want {
		return Heartbeat{}, protoErr("heartbeat: %d bytes, want %d", len(b), want)
	}
	le := binary.LittleEndian
	h := Heartbeat{Sent: int64(le.Uint64(b)), Epoch: le.Uint64(b[8:])}
	if v != 2 {
		h.Progress = le.Uint64(b[16:])
	}
	return h, nil
}

// castagnoli is the CRC32C table for epoch checksums and page digests.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// msgReader reads framed messages. The payload it returns is valid until the
// next read.
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
	h, err := m.ReadHeader()
	if err != nil {
		return Header{}, nil, err
	}
	payload, err := m.Payload(h)
	if err != nil {
		return Header{}, nil, err
	}
	return h, payload, nil
}

// Payload reads the payload of the message whose header h was just read,
// into the reader's own buffer.
func (m *msgReader) Payload(h Header) ([]byte, error) {
	if cap(m.buf) < int(h.Length) {
		m.buf = make([]byte, h.Length, max(int(h.Length), 2*cap(m.buf)))
	}
	m.buf = m.buf[:h.Length]
	if err := m.ReadPayload(m.buf); err != nil {
		return nil, err
	}
	return m.buf, nil
}

// ReadHeader reads and checks the next message's header; the payload
// follows, for ReadPayload.
func (m *msgReader) ReadHeader() (Header, error) {
	if _, err := io.ReadFull(m.r, m.hdr[:]); err != nil {
		return Header{}, err
	}
	return parseHeader(m.hdr[:])
}

// ReadPayload reads the payload of the message whose header was just read
// into dst, which is exactly as long as the header says: the backup reads a
// checkpoint's pages straight into its staging.
func (m *msgReader) ReadPayload(dst []byte) error {
	if _, err := io.ReadFull(m.r, dst); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// rawHeader returns the bytes of the last header read, for checksums.
func (m *msgReader) rawHeader() []byte { return m.hdr[:] }

// encodeMsg appends a whole message (header and payload) to dst.
func encodeMsg(dst []byte, t MsgType, epoch uint64, payload []byte) []byte {
	var hb [HeaderSize]byte
	Header{Type: t, Length: uint32(len(payload)), Epoch: epoch}.put(hb[:])
	return append(append(dst, hb[:]...), payload...)
}
