package replicate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// Fixtures. Every test builds its inputs from these, so a seed or a table row
// differs from a valid message in exactly the way its name says.

// testShape is a valid two-region VM: 16 pages at 0, 4 pages at 1 MiB.
func testShape() Shape {
	return Shape{
		MemSize: 20 * PageSize,
		VCPUs:   2,
		Regions: []Region{
			{Slot: 0, GPA: 0, Size: 16 * PageSize},
			{Slot: 3, GPA: 0x100000, Size: 4 * PageSize},
		},
	}
}

func testHello() Hello {
	return Hello{
		Version:    Version,
		MinVersion: MinVersion,
		Shape:      testShape(),
		Interval:   30 * time.Millisecond,
		Heartbeat:  100 * time.Millisecond,
		VMM:        "testvm ✓", // multi-byte UTF-8 on purpose
	}
}

// helloWith returns the encoding of testHello after mod.
func helloWith(mod func(*Hello)) []byte {
	h := testHello()
	if mod != nil {
		mod(&h)
	}
	return appendHello(nil, h)
}

// patched returns a copy of b with v written little-endian at off; v's type
// picks the width.
func patched(b []byte, off int, v any) []byte {
	b = bytes.Clone(b)
	switch v := v.(type) {
	case uint16:
		binary.LittleEndian.PutUint16(b[off:], v)
	case uint32:
		binary.LittleEndian.PutUint32(b[off:], v)
	case uint64:
		binary.LittleEndian.PutUint64(b[off:], v)
	case []byte:
		copy(b[off:], v)
	default:
		panic("patched: bad type")
	}
	return b
}

// Offsets of Hello's fixed fields, from the layout comment in wire.go.
const (
	helloOffVersion  = 8
	helloOffMin      = 12
	helloOffPageSize = 16
	helloOffVCPUs    = 20
	helloOffMemSize  = 24
	helloOffInterval = 32
	helloOffHeart    = 40
	helloOffRegions  = 48
	helloOffVMMLen   = 52
	helloOffDiskSize = 56
	helloOffDiskBlk  = 64
	helloOffDiskPad  = 68
)

func pageOf(fill byte) []byte { return bytes.Repeat([]byte{fill}, PageSize) }

type testEntry struct {
	gpa  uint64
	enc  uint16
	data []byte
	crc  uint32 // 0: the CRC the sender would put there (of the page decoded, for lz4 of nothing)
}

// pagesPayload builds a Pages payload of entries the way the sender does:
// entries, then data.
func pagesPayload(entries ...testEntry) []byte { return pagesPayloadOf(Version, entries...) }

// pagesPayloadV2 builds a version-2 Pages payload: each entry with its data.
func pagesPayloadV2(entries ...testEntry) []byte { return pagesPayloadOf(2, entries...) }

// ours is the versions this build speaks.
var ours = versions{MinVersion, Version}

func pagesPayloadOf(v uint32, entries ...testEntry) []byte {
	es := make([]pageEntry, len(entries))
	for i, e := range entries {
		crc := e.crc
		if crc == 0 {
			switch e.enc {
			case encRaw:
				crc = pageCRC(e.data)
			case encZero:
				crc = zeroCRC
			}
		}
		es[i] = pageEntry{GPA: e.gpa, CRC: crc, Enc: e.enc, Data: e.data}
	}
	return appendPages(nil, v, es)
}

// entryOff is the offset in a Pages payload of entry i's field at off (0
// gpa, 8 crc, 12 enc, 14 len).
func entryOff(i, off int) int { return pagesFixed + i*pageEntrySize + off }

func headerBytes(h Header) []byte {
	b := make([]byte, HeaderSize)
	h.put(b)
	return b
}

// checkProto fails unless err is a protocol error naming want.
func checkProto(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", want)
	}
	if !errors.Is(err, ErrProtocol) {
		t.Errorf("error %q is not ErrProtocol", err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not contain %q", err, want)
	}
}

// --- Hello -----------------------------------------------------------------

func FuzzDecodeHello(f *testing.F) {
	valid := helloWith(nil)
	// A valid hello, as the primary sends it.
	f.Add(valid)
	// A valid hello with no VMM name and one region.
	f.Add(helloWith(func(h *Hello) {
		h.VMM = ""
		h.Shape = Shape{MemSize: PageSize, VCPUs: 1, Regions: []Region{{GPA: 0, Size: PageSize}}}
	}))
	// A valid hello speaking a version range that includes ours.
	f.Add(helloWith(func(h *Hello) { h.MinVersion, h.Version = 1, 7 }))
	// A valid hello of a version-2 primary (the previous version).
	f.Add(helloWith(func(h *Hello) { h.MinVersion, h.Version = 2, 2 }))
	// A version-1 primary: refused, naming both ranges.
	f.Add(helloWith(func(h *Hello) { h.MinVersion, h.Version = 1, 1 }))
	// Nothing at all.
	f.Add([]byte{})
	// Only the fixed part: truncated before the regions.
	f.Add(valid[:helloFixed])
	// Truncated by one byte, inside the VMM name.
	f.Add(valid[:len(valid)-1])
	// One byte too many.
	f.Add(append(bytes.Clone(valid), 'x'))
	// Bad magic: not a repagent primary.
	f.Add(patched(valid, 0, []byte("HTTP/1.1")))
	// Page size 8192.
	f.Add(patched(valid, helloOffPageSize, uint32(8192)))
	// Zero regions.
	f.Add(patched(valid, helloOffRegions, uint32(0)))
	// An oversize region count.
	f.Add(patched(valid, helloOffRegions, uint32(MaxRegions+1)))
	// A huge region count that would overflow a naive length computation.
	f.Add(patched(valid, helloOffRegions, uint32(0xffffffff)))
	// An oversize VMM name length.
	f.Add(patched(valid, helloOffVMMLen, uint32(maxVMM+1)))
	// Nonzero padding in region 0.
	f.Add(patched(valid, helloFixed+4, uint32(1)))
	// Empty version range.
	f.Add(patched(valid, helloOffMin, uint32(3)))
	// A valid hello with a disk; a disk without a block size; nonzero padding.
	f.Add(helloWith(func(h *Hello) { h.Stream = StreamInfo{Size: 64 << 20, Block: 1 << 20} }))
	f.Add(patched(valid, helloOffDiskSize, uint64(4096)))
	f.Add(patched(valid, helloOffDiskPad, uint32(9)))
	// Zero interval; negative heartbeat.
	f.Add(patched(valid, helloOffInterval, uint64(0)))
	f.Add(patched(valid, helloOffHeart, uint64(1<<63)))
	// A VMM name that is not UTF-8.
	f.Add(helloWith(func(h *Hello) { h.VMM = "vm\xff" }))
	// Overlapping regions.
	f.Add(helloWith(func(h *Hello) { h.Shape.Regions[1].GPA = 15 * PageSize }))
	// Memory size that the regions don't add up to.
	f.Add(patched(valid, helloOffMemSize, uint64(21*PageSize)))
	// A region that wraps the address space.
	f.Add(helloWith(func(h *Hello) { h.Shape.Regions[1].GPA = 1<<64 - 2*PageSize }))
	// Zero vCPUs.
	f.Add(patched(valid, helloOffVCPUs, uint32(0)))

	f.Fuzz(func(t *testing.T, b []byte) {
		h, v, err := decodeHello(b, ours)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if !reflect.DeepEqual(h, Hello{}) || v != 0 {
				t.Fatalf("error %q with a result: %+v, version %d", err, h, v)
			}
			return
		}
		if v < h.MinVersion || v > h.Version || v < MinVersion || v > Version {
			t.Fatalf("chose version %d for a primary of %d..%d", v, h.MinVersion, h.Version)
		}
		if err := h.Shape.check(); err != nil {
			t.Fatalf("decoded an invalid shape: %v", err)
		}
		if h.MinVersion > h.Version || h.Interval <= 0 || h.Heartbeat <= 0 || !utf8.ValidString(h.VMM) ||
			h.Stream.Size < 0 || (h.Stream.Size == 0) != (h.Stream.Block == 0) {
			t.Fatalf("decoded an invalid hello: %+v", h)
		}
		if got := appendHello(nil, h); !bytes.Equal(got, b) {
			t.Fatalf("round trip:\n in  %x\n out %x", b, got)
		}
	})
}

func TestDecodeHello(t *testing.T) {
	want := testHello()
	got, v, err := decodeHello(appendHello(nil, want), ours)
	if err != nil {
		t.Fatal(err)
	}
	if v != Version {
		t.Fatalf("chose version %d, want %d", v, Version)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	if !got.Shape.Equal(want.Shape) {
		t.Fatal("shape not Equal to itself after a round trip")
	}
}

func TestDecodeHelloRejects(t *testing.T) {
	valid := helloWith(nil)
	manyRegions := func(n int) func(*Hello) {
		return func(h *Hello) {
			h.Shape.Regions = nil
			for i := range n {
				h.Shape.Regions = append(h.Shape.Regions, Region{Slot: uint32(i), GPA: uint64(i) * PageSize, Size: PageSize})
			}
			h.Shape.MemSize = uint64(n) * PageSize
		}
	}
	tests := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{"empty", nil, "0 bytes, want at least 72"},
		{"short", valid[:helloFixed-1], "want at least 72"},
		{"wrong magic", patched(valid, 0, []byte("REPAGENX")), "bad magic"},
		{"page size 8192", patched(valid, helloOffPageSize, uint32(8192)), "page size 8192, want 4096"},
		{"page size 0", patched(valid, helloOffPageSize, uint32(0)), "page size 0"},
		{"zero regions", helloWith(manyRegions(0)), "0 memory regions"},
		{"too many regions", helloWith(manyRegions(MaxRegions + 1)), "65 memory regions (want 1 to 64)"},
		{"VMM name too long", helloWith(func(h *Hello) { h.VMM = strings.Repeat("v", maxVMM+1) }), "VMM name of 257 bytes"},
		{"truncated", valid[:len(valid)-1], "129 bytes, want 130 for 2 regions"},
		{"trailing byte", append(bytes.Clone(valid), 0), "131 bytes, want 130 for 2 regions"},
		{"min > max version", patched(valid, helloOffMin, uint32(Version+1)), fmt.Sprintf("version range %d..%d is empty", Version+1, Version)},
		// Version 1's layout had no disk fields: a version-1 primary hears
		// about versions, not about its hello's length.
		{"a version-1 primary", patched(patched(append(bytes.Clone(valid[:helloOffDiskSize]), valid[helloFixed:]...),
			helloOffVersion, uint32(1)), helloOffMin, uint32(1)), "protocol version: primary speaks 1..1, this backup 2..4"},
		{"disk without block size", patched(valid, helloOffDiskSize, uint64(1<<20)), "stream of 1048576 bytes in 0-byte sync blocks"},
		{"block size without disk", patched(valid, helloOffDiskBlk, uint32(4096)), "stream of 0 bytes in 4096-byte sync blocks"},
		{"negative disk size", patched(patched(valid, helloOffDiskSize, uint64(1<<63)), helloOffDiskBlk, uint32(4096)), "stream of -9223372036854775808 bytes"},
		{"disk padding", patched(valid, helloOffDiskPad, uint32(1)), "nonzero padding after the stream block size"},
		{"zero interval", helloWith(func(h *Hello) { h.Interval = 0 }), "interval 0s"},
		{"negative interval", helloWith(func(h *Hello) { h.Interval = -time.Second }), "out of range"},
		{"zero heartbeat", helloWith(func(h *Hello) { h.Heartbeat = 0 }), "heartbeat 0s (want 1ms to 10s) out of range"},
		{"region padding", patched(valid, helloFixed+24+4, uint32(7)), "region 1 has nonzero padding"},
		{"non-UTF-8 VMM name", helloWith(func(h *Hello) { h.VMM = "qemu\xc3" }), "VMM name is not UTF-8"},
		{"zero vCPUs", helloWith(func(h *Hello) { h.Shape.VCPUs = 0 }), "0 vCPUs"},
		{"too many vCPUs", helloWith(func(h *Hello) { h.Shape.VCPUs = MaxVCPUs + 1 }), "1025 vCPUs"},
		{"overlapping regions", helloWith(func(h *Hello) { h.Shape.Regions[1].GPA = 8 * PageSize }), "region 1 (GPA 0x8000) overlaps"},
		{"identical regions", helloWith(func(h *Hello) {
			h.Shape.Regions[1] = h.Shape.Regions[0]
			h.Shape.MemSize = 32 * PageSize
		}), "overlaps"},
		{"sizes don't sum to memSize", patched(valid, helloOffMemSize, uint64(24*PageSize)), "regions hold 81920 bytes, memory size says 98304"},
		{"unaligned region GPA", helloWith(func(h *Hello) { h.Shape.Regions[1].GPA = 0x100800 }), "region 1 (GPA 0x100800, 16384 bytes) is empty, unaligned or wraps"},
		{"unaligned region size", helloWith(func(h *Hello) {
			h.Shape.Regions[1].Size = 4*PageSize + 1
			h.Shape.MemSize += 1
		}), "unaligned"},
		{"empty region", helloWith(func(h *Hello) {
			h.Shape.Regions[1].Size = 0
			h.Shape.MemSize = 16 * PageSize
		}), "region 1 (GPA 0x100000, 0 bytes) is empty"},
		{"region wraps", helloWith(func(h *Hello) { h.Shape.Regions[1].GPA = 1<<64 - 2*PageSize }), "wraps"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, v, err := decodeHello(tt.in, ours)
			checkProto(t, err, tt.wantErr)
			if !reflect.DeepEqual(h, Hello{}) || v != 0 {
				t.Errorf("error with a result: %+v, version %d", h, v)
			}
		})
	}
}

func TestHelloNegotiate(t *testing.T) {
	tests := []struct {
		name    string
		lo, hi  uint32
		backup  versions // zero: ours
		want    uint32
		wantErr string
	}{
		{"exactly ours", 4, 4, versions{}, 4, ""},
		{"newer primary that still speaks 4", 1, 6, versions{}, 4, ""},
		{"primary claiming version 0 too", 0, 4, versions{}, 4, ""},
		{"only newer versions", 5, 6, versions{}, 0, "primary speaks 5..6, this backup 2..4"},
		{"only version 3 (no session ID): the previous version, spoken", 3, 3, versions{}, 3, ""},
		{"a primary of 2..4, a backup of 2..3", 2, 4, versions{2, 3}, 3, ""},
		{"only version 2 (page data among the entries): still spoken", 2, 2, versions{}, 2, ""},
		{"a primary of 2..3, a backup of only 2", 2, 3, versions{2, 2}, 2, ""},
		{"a primary of only 3, a backup of only 2", 3, 3, versions{2, 2}, 0, "primary speaks 3..3, this backup 2..2"},
		{"only version 1 (no disk)", 1, 1, versions{}, 0, "primary speaks 1..1, this backup 2..4"},
		{"only version 0", 0, 0, versions{}, 0, "primary speaks 0..0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := testHello()
			h.MinVersion, h.Version = tt.lo, tt.hi
			v, err := negotiate(h, tt.backup.orDefault())
			if tt.wantErr != "" {
				checkProto(t, err, tt.wantErr)
				if v != 0 {
					t.Errorf("error with version %d", v)
				}
				return
			}
			if err != nil || v != tt.want {
				t.Fatalf("negotiate(%d..%d) = %d, %v; want %d", tt.lo, tt.hi, v, err, tt.want)
			}
		})
	}
}

// --- Welcome ---------------------------------------------------------------

// testSessionID is a session ID with every byte set, so a test sees any of
// them lost.
var testSessionID = SessionID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0xff}

func FuzzDecodeWelcome(f *testing.F) {
	// A valid welcome choosing this version, with its session ID.
	f.Add(appendWelcome(nil, Version, testSessionID))
	// The previous version (no session ID), spoken; and version 2.
	f.Add(appendWelcome(nil, 3, SessionID{}))
	f.Add(appendWelcome(nil, MinVersion, SessionID{}))
	// Version 0, never valid; and the version before MinVersion.
	f.Add(appendWelcome(nil, 0, SessionID{}))
	f.Add(appendWelcome(nil, MinVersion-1, SessionID{}))
	// A version newer than this primary speaks, with and without an ID.
	f.Add(appendWelcome(nil, Version+1, testSessionID))
	f.Add(appendWelcome(nil, Version+1, SessionID{})[:welcomeV3])
	// Version 4 with a zero session ID.
	f.Add(appendWelcome(nil, 4, SessionID{}))
	// Version 4 without its ID; version 3 with one.
	f.Add(appendWelcome(nil, 4, testSessionID)[:welcomeV3])
	f.Add(append(appendWelcome(nil, 3, SessionID{}), testSessionID[:]...))
	// Nonzero padding, in version 3 and 4.
	f.Add(patched(appendWelcome(nil, Version, testSessionID), 4, uint32(1)))
	f.Add(patched(appendWelcome(nil, 3, SessionID{}), 4, uint32(1)))
	// Truncated; and one byte too long.
	f.Add(appendWelcome(nil, Version, testSessionID)[:welcomeV4-1])
	f.Add(append(appendWelcome(nil, Version, testSessionID), 0))
	f.Add(appendWelcome(nil, 3, SessionID{})[:7])
	f.Add(append(appendWelcome(nil, 3, SessionID{}), 0))
	// Nothing.
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, b []byte) {
		v, id, err := decodeWelcome(b, ours)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if v != 0 || !id.IsZero() {
				t.Fatalf("error %q with version %d, session %v", err, v, id)
			}
			return
		}
		if v < MinVersion || v > Version {
			t.Fatalf("accepted version %d", v)
		}
		if id.IsZero() != (v < 4) {
			t.Fatalf("version %d with session %v", v, id)
		}
		if got := appendWelcome(nil, v, id); !bytes.Equal(got, b) {
			t.Fatalf("round trip: in %x, out %x", b, got)
		}
	})
}

func TestDecodeWelcome(t *testing.T) {
	tests := []struct {
		name    string
		version uint32
		session SessionID // what the welcome is built with
		want    SessionID // what it decodes to
		size    int
	}{
		{"version 4 names the session", 4, testSessionID, testSessionID, welcomeV4},
		{"version 3 names none", 3, SessionID{}, SessionID{}, welcomeV3},
		{"version 3 drops an ID it was given", 3, testSessionID, SessionID{}, welcomeV3},
		{"version 2 names none", 2, testSessionID, SessionID{}, welcomeV3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := appendWelcome(nil, tt.version, tt.session)
			if len(b) != tt.size {
				t.Fatalf("welcome of %d bytes, want %d", len(b), tt.size)
			}
			v, id, err := decodeWelcome(b, ours)
			if err != nil {
				t.Fatal(err)
			}
			if v != tt.version || id != tt.want {
				t.Fatalf("decoded version %d, session %v; want %d, %v", v, id, tt.version, tt.want)
			}
		})
	}
}

func TestSessionID(t *testing.T) {
	if got, want := testSessionID.String(), "0102030405060708090a0b0c0d0e0fff"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got, want := (SessionID{}).String(), strings.Repeat("0", 32); got != want {
		t.Errorf("zero String() = %q, want %q", got, want)
	}
	if (SessionID{}).IsZero() != true || testSessionID.IsZero() || (SessionID{15: 1}).IsZero() {
		t.Error("IsZero is wrong")
	}
	a, b := newSessionID(), newSessionID()
	if a.IsZero() || b.IsZero() || a == b {
		t.Errorf("newSessionID gave %v and %v", a, b)
	}
}

func TestDecodeWelcomeRejects(t *testing.T) {
	v3 := appendWelcome(nil, 3, SessionID{})
	v4 := appendWelcome(nil, 4, testSessionID)
	tests := []struct {
		name    string
		in      []byte
		offered versions // zero: ours
		wantErr string
	}{
		{"empty", nil, versions{}, "welcome: 0 bytes, want at least 8"},
		{"short", v3[:7], versions{}, "welcome: 7 bytes, want at least 8"},
		{"version 3, long", append(bytes.Clone(v3), 0), versions{}, "welcome: 9 bytes, want 8 for version 3"},
		{"version 3 with a session ID", append(bytes.Clone(v3), testSessionID[:]...), versions{}, "welcome: 24 bytes, want 8 for version 3"},
		{"version 2 with a session ID", append(appendWelcome(nil, 2, SessionID{}), testSessionID[:]...), versions{}, "welcome: 24 bytes, want 8 for version 2"},
		{"version 4 without its session ID", v4[:8], versions{}, "welcome: 8 bytes, want 24 for version 4"},
		{"version 4, truncated", v4[:23], versions{}, "welcome: 23 bytes, want 24 for version 4"},
		{"version 4, long", append(bytes.Clone(v4), 0), versions{}, "welcome: 25 bytes, want 24 for version 4"},
		{"version 4 with a zero session ID", appendWelcome(nil, 4, SessionID{}), versions{}, "welcome: version 4 with a zero session ID"},
		{"version 0", appendWelcome(nil, 0, SessionID{}), versions{}, "backup chose version 0"},
		{"version too old", appendWelcome(nil, 1, SessionID{}), versions{}, "backup chose version 1, this primary speaks 2..4"},
		{"version too new", appendWelcome(nil, 5, testSessionID), versions{}, "backup chose version 5"},
		{"a version the hello did not offer", v4, versions{2, 3}, "backup chose version 4, this primary speaks 2..3"},
		{"an older version the hello did not offer", v3, versions{2, 2}, "backup chose version 3, this primary speaks 2..2"},
		{"padding, version 4", patched(v4, 4, uint32(1)), versions{}, "nonzero padding"},
		{"padding, version 3", patched(v3, 4, uint32(1)), versions{}, "nonzero padding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, id, err := decodeWelcome(tt.in, tt.offered.orDefault())
			checkProto(t, err, tt.wantErr)
			if v != 0 || !id.IsZero() {
				t.Errorf("error with version %d, session %v", v, id)
			}
		})
	}
}

// --- Reject ----------------------------------------------------------------

func FuzzDecodeReject(f *testing.F) {
	// A typical reason.
	f.Add([]byte("VM shape mismatch: primary has 2 vCPUs"))
	// The empty reason.
	f.Add([]byte{})
	// Exactly at the length limit.
	f.Add(bytes.Repeat([]byte("x"), maxReason))
	// One byte over the limit.
	f.Add(bytes.Repeat([]byte("x"), maxReason+1))
	// Multi-byte UTF-8 straddling the limit (appendReject must trim it).
	f.Add([]byte(strings.Repeat("x", maxReason-1) + "é"))
	// Not UTF-8: a lone continuation byte; a truncated sequence.
	f.Add([]byte("bad \x80 reason"))
	f.Add([]byte("ends in \xe2\x82"))

	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := decodeReject(b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if s != "" {
				t.Fatalf("error %q with reason %q", err, s)
			}
		} else if got := appendReject(nil, s); !bytes.Equal(got, b) {
			t.Fatalf("round trip: in %q, out %q", b, got)
		}
		// Whatever UTF-8 reason a side sends, the other side must accept it.
		// The long reason is b repeated past the limit, so the fuzzer
		// reaches appendReject's trimming without growing inputs past 1 KiB
		// (which makes Go's input minimizer crawl, golang/go#48820).
		if utf8.Valid(b) {
			checkRejectReason(t, string(b))
			if len(b) > 0 && len(b) <= maxReason {
				checkRejectReason(t, strings.Repeat(string(b), maxReason/len(b)+1))
			}
		}
	})
}

// checkRejectReason checks that appendReject encodes a UTF-8 reason as a
// prefix of it that decodeReject accepts, cut only if over the limit and then
// by less than one rune.
func checkRejectReason(t *testing.T, reason string) {
	t.Helper()
	enc := appendReject(nil, reason)
	if len(enc) > maxReason || !strings.HasPrefix(reason, string(enc)) {
		t.Fatalf("appendReject(%d bytes) = %d bytes, not a short enough prefix", len(reason), len(enc))
	}
	if len(reason) <= maxReason && len(enc) != len(reason) {
		t.Fatalf("appendReject trimmed a %d-byte reason to %d", len(reason), len(enc))
	}
	if len(reason) > maxReason && len(enc) <= maxReason-utf8.UTFMax {
		t.Fatalf("appendReject trimmed a %d-byte reason to %d, more than a rune past the limit", len(reason), len(enc))
	}
	if got, err := decodeReject(enc); err != nil || got != string(enc) {
		t.Fatalf("decodeReject(appendReject(%q)) = %q, %v", reason, got, err)
	}
}

func TestDecodeReject(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{"too long", bytes.Repeat([]byte("x"), maxReason+1), "at most 1024 bytes"},
		{"not UTF-8", []byte("\xff"), "not UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := decodeReject(tt.in)
			checkProto(t, err, tt.wantErr)
			if s != "" {
				t.Errorf("error with reason %q", s)
			}
		})
	}
	// A long multi-byte reason is cut at a rune boundary within the limit.
	long := strings.Repeat("é", maxReason) // 2048 bytes
	enc := appendReject(nil, long)
	if len(enc) != maxReason {
		t.Fatalf("appendReject of %d bytes = %d bytes, want %d", len(long), len(enc), maxReason)
	}
	if s, err := decodeReject(enc); err != nil || s != long[:maxReason] {
		t.Fatalf("decodeReject(appendReject(long)) = %q, %v", s, err)
	}
}

// --- Pages -----------------------------------------------------------------

func FuzzDecodePages(f *testing.F) {
	raw := testEntry{gpa: 0x2000, enc: encRaw, data: pageOf(0xab)}
	zero := testEntry{gpa: 0x100000, enc: encZero}
	lz4 := testEntry{gpa: 0x3000, enc: encLZ4, data: []byte{0x1f, 0x00, 0x01, 0x00, 0x00}, crc: 0x1234}
	valid := pagesPayload(raw, zero, lz4)
	const v2, v3 = true, false
	// A valid batch of one page of each encoding.
	f.Add(v3, valid)
	// A valid batch of one zero page, the smallest possible.
	f.Add(v3, pagesPayload(zero))
	// A valid batch of one raw page at a high GPA.
	f.Add(v3, pagesPayload(testEntry{gpa: 1<<64 - PageSize, enc: encRaw, data: pageOf(1)}))
	// Nothing; just the count.
	f.Add(v3, []byte{})
	f.Add(v3, valid[:4])
	// Count 0.
	f.Add(v3, []byte{0, 0, 0, 0, 0, 0, 0, 0})
	// Count over MaxBatchPages.
	f.Add(v3, patched(valid, 0, uint32(MaxBatchPages+1)))
	// Count 0xffffffff: must not loop or allocate that much.
	f.Add(v3, patched(valid, 0, uint32(0xffffffff)))
	// Count says 4, three entries follow; count says 2, three follow.
	f.Add(v3, patched(valid, 0, uint32(4)))
	f.Add(v3, patched(valid, 0, uint32(2)))
	// Nonzero padding after the count.
	f.Add(v3, patched(valid, 4, uint32(1)))
	// An unaligned GPA.
	f.Add(v3, pagesPayload(testEntry{gpa: 0x2001, enc: encZero}))
	// Raw with the wrong length.
	f.Add(v3, pagesPayload(testEntry{enc: encRaw, data: make([]byte, PageSize-1)}))
	// LZ4 with 0 and with 4096 bytes.
	f.Add(v3, pagesPayload(testEntry{enc: encLZ4}))
	f.Add(v3, pagesPayload(testEntry{enc: encLZ4, data: make([]byte, PageSize)}))
	// Zero with data.
	f.Add(v3, pagesPayload(testEntry{enc: encZero, data: []byte{0}}))
	// Unknown encodings 0 and 4.
	f.Add(v3, pagesPayload(testEntry{}))
	f.Add(v3, pagesPayload(testEntry{enc: 4}))
	// Trailing bytes after the last entry's data.
	f.Add(v3, append(bytes.Clone(valid), 0))
	// Truncated inside the entries, and inside a raw page's data.
	f.Add(v3, valid[:pagesMeta(3)-1])
	f.Add(v3, valid[:pagesMeta(3)+100])
	// An entry whose length is the largest a length can say.
	f.Add(v3, patched(pagesPayload(testEntry{enc: encLZ4, data: []byte{1}}), entryOff(0, 14), uint16(0xffff)))

	validV2 := pagesPayloadV2(raw, zero, lz4)
	// Version 2: a valid batch of one page of each encoding, data inline.
	f.Add(v2, validV2)
	// Version 2: one zero page.
	f.Add(v2, pagesPayloadV2(zero))
	// Version 2: a version-3 batch read as version 2 (the lengths fall elsewhere).
	f.Add(v2, valid)
	// Version 2: truncated inside the second entry, and inside the raw page.
	f.Add(v2, validV2[:pagesFixed+pageEntrySize+PageSize+8])
	f.Add(v2, validV2[:pagesFixed+pageEntrySize+100])
	// Version 2: nonzero padding in the first entry.
	f.Add(v2, patched(validV2, pagesFixed+10, uint16(1)))
	// Version 2: a length of 4 GiB - 1, more than any message.
	f.Add(v2, patched(pagesPayloadV2(testEntry{enc: encLZ4, data: []byte{1}}), pagesFixed+12, uint32(0xffffffff)))
	// Version 2: trailing bytes.
	f.Add(v2, append(bytes.Clone(validV2), 0))

	var ents []pageEntry
	f.Fuzz(func(t *testing.T, isV2 bool, b []byte) {
		v := uint32(Version)
		if isV2 {
			v = 2
		}
		var err error
		ents, err = decodePages(v, b, ents)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if len(ents) != 0 {
				t.Fatalf("error %q with %d entries", err, len(ents))
			}
			return
		}
		if n := len(ents); n < 1 || n > MaxBatchPages {
			t.Fatalf("decoded %d entries", n)
		}
		es := make([]pageEntry, len(ents))
		for i, e := range ents {
			if len(e.Data) > 0 && &e.Data[0] != &b[e.Off] {
				t.Fatalf("entry at GPA %#x: Off %d is not where its data lies", e.GPA, e.Off)
			}
			ok := e.Enc == encRaw && len(e.Data) == PageSize ||
				e.Enc == encLZ4 && len(e.Data) > 0 && len(e.Data) < PageSize ||
				e.Enc == encZero && len(e.Data) == 0
			if e.GPA%PageSize != 0 || !ok {
				t.Fatalf("entry %d invalid: GPA %#x encoding %d, %d bytes", i, e.GPA, e.Enc, len(e.Data))
			}
			if v == 2 && e.CRC != map[bool]uint32{true: zeroCRC, false: 0}[e.Enc == encZero] {
				t.Fatalf("version 2 entry %d (encoding %d) with CRC %08x", i, e.Enc, e.CRC)
			}
			es[i] = pageEntry{GPA: e.GPA, CRC: e.CRC, Enc: e.Enc, Data: bytes.Clone(e.Data)}
		}
		if out := appendPages(nil, v, es); !bytes.Equal(out, b) {
			t.Fatalf("round trip:\n in  %x\n out %x", b, out)
		}
	})
}

func TestDecodePages(t *testing.T) {
	want := []testEntry{
		{gpa: 0x2000, enc: encRaw, data: pageOf(0xab)},
		{gpa: 0x100000, enc: encZero},
		{gpa: 0x3000, enc: encLZ4, data: []byte{9, 8, 7}, crc: 77},
	}
	for _, v := range []uint32{Version, 2} {
		t.Run(fmt.Sprintf("version=%d", v), func(t *testing.T) {
			b := pagesPayloadOf(v, want...)
			got, err := decodePages(v, b, nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(want) {
				t.Fatalf("got %d entries, want %d", len(got), len(want))
			}
			wantCRC := []uint32{pageCRC(pageOf(0xab)), zeroCRC, 77}
			if v == 2 {
				wantCRC = []uint32{0, zeroCRC, 0} // not on the wire: the backup computes them
			}
			off := pagesMeta(3)
			for i, w := range want {
				if v == 2 {
					off = pagesFixed + (i+1)*pageEntrySize
					for _, p := range want[:i] {
						off += len(p.data)
					}
				}
				g := got[i]
				if g.GPA != w.gpa || g.Enc != w.enc || !bytes.Equal(g.Data, w.data) || g.CRC != wantCRC[i] || g.Off != off {
					t.Errorf("entry %d: got GPA %#x enc %d %d bytes CRC %08x at %d, want GPA %#x enc %d %d bytes CRC %08x at %d",
						i, g.GPA, g.Enc, len(g.Data), g.CRC, g.Off, w.gpa, w.enc, len(w.data), wantCRC[i], off)
				}
				if v != 2 {
					off += len(w.data)
				}
			}
			// The end record's checksum covers the entries (version 3) or all of it (version 2).
			if c, want := len(pagesCovered(v, b, 3)), map[bool]int{true: len(b), false: pagesMeta(3)}[v == 2]; c != want {
				t.Errorf("checksum covers %d bytes, want %d", c, want)
			}

			// A full batch of MaxBatchPages entries is fine, and decoding into
			// a grown slice allocates nothing.
			full := make([]testEntry, MaxBatchPages)
			for i := range full {
				full[i] = testEntry{gpa: uint64(i) * PageSize, enc: encZero}
			}
			fb := pagesPayloadOf(v, full...)
			ents, err := decodePages(v, fb, nil)
			if err != nil || len(ents) != MaxBatchPages {
				t.Fatalf("decodePages(%d zero pages) = %d, %v", MaxBatchPages, len(ents), err)
			}
			if a := testing.AllocsPerRun(10, func() { ents, _ = decodePages(v, fb, ents) }); a != 0 {
				t.Errorf("%v allocations to decode a batch into a grown slice", a)
			}
		})
	}
}

func TestDecodePagesRejects(t *testing.T) {
	raw := testEntry{gpa: 0x2000, enc: encRaw, data: pageOf(0xab)}
	zero := testEntry{gpa: 0x5000, enc: encZero}
	valid := pagesPayload(raw, zero)
	validV2 := pagesPayloadV2(raw, zero)
	tests := []struct {
		name    string
		version uint32
		in      []byte
		wantErr string
	}{
		{"empty", 3, nil, "0 bytes, too short"},
		{"short", 3, valid[:7], "7 bytes, too short"},
		{"count 0", 3, make([]byte, 8), "count 0 (want 1 to 512)"},
		{"count 0 with entries", 3, patched(valid, 0, uint32(0)), "count 0"},
		{"count > MaxBatchPages", 3, patched(valid, 0, uint32(MaxBatchPages+1)), "count 513 (want 1 to 512)"},
		{"count padding", 3, patched(valid, 4, uint32(1)), "nonzero padding after the count"},
		{"unaligned GPA", 3, pagesPayload(raw, testEntry{gpa: 0x5008, enc: encZero}), "entry 1: GPA 0x5008 not page-aligned"},
		{"raw too short", 3, pagesPayload(testEntry{enc: encRaw, data: make([]byte, PageSize-1)}), "encoding 1 with 4095 bytes"},
		{"raw too long", 3, pagesPayload(testEntry{enc: encRaw, data: make([]byte, PageSize+1)}), "encoding 1 with 4097 bytes"},
		{"raw empty", 3, pagesPayload(testEntry{enc: encRaw}), "encoding 1 with 0 bytes"},
		{"lz4 with 0 bytes", 3, pagesPayload(testEntry{gpa: 0x1000, enc: encLZ4}), "entry 0 (GPA 0x1000): encoding 2 with 0 bytes"},
		{"lz4 with 4096 bytes", 3, pagesPayload(testEntry{enc: encLZ4, data: make([]byte, PageSize)}), "encoding 2 with 4096 bytes"},
		{"zero with data", 3, pagesPayload(zero, testEntry{enc: encZero, data: []byte{0}}), "entry 1 (GPA 0x0): encoding 3 with 1 bytes"},
		{"unknown encoding 0", 3, pagesPayload(testEntry{}), "encoding 0 with 0 bytes"},
		{"unknown encoding 4", 3, pagesPayload(testEntry{enc: 4, data: []byte{1}}), "encoding 4 with 1 bytes"},
		{"trailing bytes", 3, append(bytes.Clone(valid), 1, 2, 3), "3 bytes after the last entry's data"},
		{"count too small", 3, patched(valid, 0, uint32(1)), "16 bytes after the last entry's data"},
		{"truncated entries", 3, valid[:pagesMeta(2)-1], "2 entries need 40 bytes, the message has 39 (truncated)"},
		{"count too large", 3, patched(valid, 0, uint32(3)), "entry 2: GPA 0xabababababababab not page-aligned"},
		{"truncated entry data", 3, valid[:pagesMeta(2)+PageSize-1], "entries hold 4096 bytes of data, the message 4095 (truncated)"},
		{"huge entry length", 3, patched(pagesPayload(testEntry{enc: encLZ4, data: []byte{1}}), entryOff(0, 14), uint16(0xffff)), "encoding 2 with 65535 bytes"},

		{"v2 empty", 2, nil, "0 bytes, too short"},
		{"v2 count 0", 2, make([]byte, 8), "count 0 (want 1 to 512)"},
		{"v2 count padding", 2, patched(validV2, 4, uint32(1)), "nonzero padding after the count"},
		{"v2 entry padding", 2, patched(validV2, pagesFixed+10, uint16(1)), "entry 0 (GPA 0x2000): nonzero padding"},
		{"v2 unaligned GPA", 2, pagesPayloadV2(testEntry{gpa: 0x5008, enc: encZero}), "entry 0: GPA 0x5008 not page-aligned"},
		{"v2 raw too short", 2, pagesPayloadV2(testEntry{enc: encRaw, data: make([]byte, PageSize-1)}), "encoding 1 with 4095 bytes"},
		{"v2 zero with data", 2, pagesPayloadV2(testEntry{enc: encZero, data: []byte{0}}), "encoding 3 with 1 bytes"},
		{"v2 huge length", 2, patched(pagesPayloadV2(testEntry{enc: encLZ4, data: []byte{1}}), pagesFixed+12, uint32(0xffffffff)), "encoding 2 with 4294967295 bytes"},
		{"v2 truncated entry", 2, validV2[:pagesFixed+pageEntrySize+PageSize+3], "entry 1 truncated"},
		{"v2 truncated data", 2, validV2[:pagesFixed+pageEntrySize+PageSize-1], "entry 0 (GPA 0x2000) truncated"},
		{"v2 count too large", 2, patched(validV2, 0, uint32(3)), "entry 2 truncated"},
		{"v2 trailing bytes", 2, append(bytes.Clone(validV2), 1, 2), "2 bytes after the last entry"},
		{"v3 read as v2 (its CRC where the pad was)", 2, valid, "entry 0 (GPA 0x2000): nonzero padding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ents, err := decodePages(tt.version, tt.in, make([]pageEntry, 0, 4))
			checkProto(t, err, tt.wantErr)
			if len(ents) != 0 {
				t.Errorf("%d entries for a malformed batch", len(ents))
			}
		})
	}
}

// --- End -------------------------------------------------------------------

func FuzzDecodeEnd(f *testing.F) {
	pre := appendEnd(nil, End{Pages: 1234, Digest: 0xdeadbeefcafe, Checksum: 0x1234567, Kind: kindPrecopy, Round: 3})
	ckpt := appendEnd(nil, End{Pages: 7, Digest: 1, Checksum: 2, Kind: kindCheckpoint})
	// A valid pre-copy round end.
	f.Add(pre)
	// A valid checkpoint end.
	f.Add(ckpt)
	// An all-zero end: kind 0.
	f.Add(make([]byte, endSize))
	// Unknown kind 3.
	f.Add(patched(ckpt, 20, uint32(3)))
	// A checkpoint with a pre-copy round.
	f.Add(patched(ckpt, 24, uint32(1)))
	// Nonzero padding.
	f.Add(patched(pre, 28, uint32(1)))
	// Truncated; one byte too long; nothing.
	f.Add(pre[:endSize-1])
	f.Add(append(bytes.Clone(pre), 0))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := decodeEnd(b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if e != (End{}) {
				t.Fatalf("error %q with a result: %+v", err, e)
			}
			return
		}
		if e.Kind != kindPrecopy && e.Kind != kindCheckpoint || e.Kind == kindCheckpoint && e.Round != 0 {
			t.Fatalf("decoded an invalid end: %+v", e)
		}
		if got := appendEnd(nil, e); !bytes.Equal(got, b) {
			t.Fatalf("round trip: in %x, out %x", b, got)
		}
	})
}

func TestDecodeEndRejects(t *testing.T) {
	ckpt := appendEnd(nil, End{Pages: 7, Digest: 1, Checksum: 2, Kind: kindCheckpoint})
	tests := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{"short", ckpt[:31], "end: 31 bytes, want 32"},
		{"long", append(bytes.Clone(ckpt), 0), "end: 33 bytes, want 32"},
		{"kind 0", patched(ckpt, 20, uint32(0)), "unknown epoch kind 0"},
		{"unknown kind", patched(ckpt, 20, uint32(99)), "unknown epoch kind 99"},
		{"checkpoint with round", patched(ckpt, 24, uint32(5)), "checkpoint with pre-copy round 5"},
		{"padding", patched(ckpt, 28, uint32(1)), "end: nonzero padding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := decodeEnd(tt.in)
			checkProto(t, err, tt.wantErr)
			if e != (End{}) {
				t.Errorf("error with a result: %+v", e)
			}
		})
	}
}

// --- Ack, Heartbeat --------------------------------------------------------

func FuzzDecodeAck(f *testing.F) {
	const v2, v3 = true, false
	// A valid ack.
	f.Add(v3, appendAck(nil, Version, Ack{Digest: 0x0123456789abcdef, CPU: 3 * time.Millisecond}))
	// A valid ack of digest 0, no CPU time yet.
	f.Add(v3, appendAck(nil, Version, Ack{}))
	// The largest CPU time accepted, and one past it.
	f.Add(v3, appendAck(nil, Version, Ack{CPU: 1 << 62}))
	f.Add(v3, patched(appendAck(nil, Version, Ack{}), 8, uint64(1<<62+1)))
	// Truncated; one byte too long; nothing.
	f.Add(v3, appendAck(nil, Version, Ack{Digest: 1})[:15])
	f.Add(v3, append(appendAck(nil, Version, Ack{Digest: 1}), 0))
	f.Add(v3, []byte{})
	// Version 2: a valid ack (the digest alone); a version-3 ack; truncated.
	f.Add(v2, appendAck(nil, 2, Ack{Digest: 0x0123456789abcdef}))
	f.Add(v2, appendAck(nil, Version, Ack{Digest: 1, CPU: 2}))
	f.Add(v2, appendAck(nil, 2, Ack{Digest: 1})[:7])

	f.Fuzz(func(t *testing.T, isV2 bool, b []byte) {
		v := uint32(Version)
		if isV2 {
			v = 2
		}
		a, err := decodeAck(v, b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if a != (Ack{}) {
				t.Fatalf("error %q with a result %+v", err, a)
			}
			return
		}
		if a.CPU < 0 || v == 2 && a.CPU != 0 {
			t.Fatalf("version %d ack with CPU time %v", v, a.CPU)
		}
		if got := appendAck(nil, v, a); !bytes.Equal(got, b) {
			t.Fatalf("round trip: in %x, out %x", b, got)
		}
	})
}

func FuzzDecodeHeartbeat(f *testing.F) {
	const v2, v3 = true, false
	// A valid heartbeat.
	f.Add(v3, appendHeartbeat(nil, Version, Heartbeat{Sent: time.Now().UnixNano(), Epoch: 42, Progress: 1 << 40}))
	// A valid heartbeat with a negative clock (before 1970).
	f.Add(v3, appendHeartbeat(nil, Version, Heartbeat{Sent: -1, Epoch: 0}))
	// Truncated; one byte too long; nothing.
	f.Add(v3, appendHeartbeat(nil, Version, Heartbeat{Sent: 1, Epoch: 2})[:23])
	f.Add(v3, append(appendHeartbeat(nil, Version, Heartbeat{Sent: 1, Epoch: 2}), 0))
	f.Add(v3, []byte{})
	// Version 2: a valid heartbeat (no progress); a version-3 one; truncated.
	f.Add(v2, appendHeartbeat(nil, 2, Heartbeat{Sent: 1, Epoch: 2}))
	f.Add(v2, appendHeartbeat(nil, Version, Heartbeat{Sent: 1, Epoch: 2, Progress: 3}))
	f.Add(v2, appendHeartbeat(nil, 2, Heartbeat{Sent: 1, Epoch: 2})[:15])

	f.Fuzz(func(t *testing.T, isV2 bool, b []byte) {
		v := uint32(Version)
		if isV2 {
			v = 2
		}
		h, err := decodeHeartbeat(v, b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if h != (Heartbeat{}) {
				t.Fatalf("error %q with a result: %+v", err, h)
			}
			return
		}
		if v == 2 && h.Progress != 0 {
			t.Fatalf("version 2 heartbeat with progress %d", h.Progress)
		}
		if got := appendHeartbeat(nil, v, h); !bytes.Equal(got, b) {
			t.Fatalf("round trip: in %x, out %x", b, got)
		}
	})
}

func TestDecodeAckHeartbeatRejects(t *testing.T) {
	a, err := decodeAck(Version, make([]byte, 9))
	checkProto(t, err, "ack: 9 bytes, want 16")
	if a != (Ack{}) {
		t.Errorf("ack error with a result %+v", a)
	}
	a, err = decodeAck(Version, patched(appendAck(nil, Version, Ack{Digest: 5}), 8, uint64(1<<63)))
	checkProto(t, err, "is not a duration")
	if a != (Ack{}) {
		t.Errorf("ack error with a result %+v", a)
	}
	h, err := decodeHeartbeat(Version, make([]byte, 16))
	checkProto(t, err, "heartbeat: 16 bytes, want 24")
	if h != (Heartbeat{}) {
		t.Errorf("heartbeat error with a result %+v", h)
	}
	// Version 2: the ack is the digest alone, a heartbeat has no progress.
	a, err = decodeAck(2, appendAck(nil, Version, Ack{Digest: 5}))
	checkProto(t, err, "ack: 16 bytes, want 8")
	if a != (Ack{}) {
		t.Errorf("ack error with a result %+v", a)
	}
	h, err = decodeHeartbeat(2, make([]byte, 24))
	checkProto(t, err, "heartbeat: 24 bytes, want 16")
	if h != (Heartbeat{}) {
		t.Errorf("heartbeat error with a result %+v", h)
	}
	if a, err := decodeAck(2, appendAck(nil, 2, Ack{Digest: 5, CPU: time.Second})); err != nil || a != (Ack{Digest: 5}) {
		t.Errorf("version 2 ack: %+v, %v; want the digest alone", a, err)
	}
	if h, err := decodeHeartbeat(2, appendHeartbeat(nil, 2, Heartbeat{Sent: 1, Epoch: 2, Progress: 3})); err != nil || h != (Heartbeat{Sent: 1, Epoch: 2}) {
		t.Errorf("version 2 heartbeat: %+v, %v; want no progress", h, err)
	}
}

// --- Header and framing ----------------------------------------------------

func FuzzParseHeader(f *testing.F) {
	// A valid header of each message type.
	for typ := MsgHello; typ < msgTypes; typ++ {
		f.Add(headerBytes(Header{Type: typ, Length: 100, Epoch: uint64(typ) * 1000}))
	}
	// A valid header at the payload limit.
	f.Add(headerBytes(Header{Type: MsgPages, Length: MaxPayload, Epoch: 1}))
	// Type 0: a zeroed header.
	f.Add(make([]byte, HeaderSize))
	// Type msgTypes, the first unknown one; and 0xffff.
	f.Add(headerBytes(Header{Type: msgTypes}))
	f.Add(headerBytes(Header{Type: 0xffff}))
	// Nonzero (reserved) flags.
	f.Add(headerBytes(Header{Type: MsgAck, Flags: 0x8000}))
	// An oversize length.
	f.Add(headerBytes(Header{Type: MsgState, Length: MaxPayload + 1}))
	f.Add(headerBytes(Header{Type: MsgState, Length: 0xffffffff}))
	// Truncated; one byte too long; nothing.
	f.Add(headerBytes(Header{Type: MsgBye})[:HeaderSize-1])
	f.Add(append(headerBytes(Header{Type: MsgBye}), 0))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %q is not ErrProtocol", err)
			}
			if h != (Header{}) {
				t.Fatalf("error %q with a result: %+v", err, h)
			}
			return
		}
		if h.Type == 0 || h.Type >= msgTypes || h.Flags != 0 || h.Length > MaxPayload {
			t.Fatalf("accepted an invalid header: %+v", h)
		}
		if got := headerBytes(h); !bytes.Equal(got, b) {
			t.Fatalf("round trip: in %x, out %x", b, got)
		}
	})
}

func TestParseHeaderRejects(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{"type 0", headerBytes(Header{Type: 0, Length: 8}), "unknown message type 0"},
		{"type msgTypes", headerBytes(Header{Type: msgTypes}), "unknown message type 15"},
		{"type 0xffff", headerBytes(Header{Type: 0xffff}), "unknown message type 65535"},
		{"nonzero flags", headerBytes(Header{Type: MsgPages, Flags: 1}), "pages message with unknown flags 0x1"},
		{"length > MaxPayload", headerBytes(Header{Type: MsgState, Length: MaxPayload + 1}), "state message of 8388609 bytes exceeds the 8388608-byte limit"},
		{"short", make([]byte, HeaderSize-1), "header: 15 bytes, want 16"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := parseHeader(tt.in)
			checkProto(t, err, tt.wantErr)
			if h != (Header{}) {
				t.Errorf("error with a result: %+v", h)
			}
		})
	}
}

func FuzzReadMsg(f *testing.F) {
	hello := encodeMsg(nil, MsgHello, 0, appendHello(nil, testHello()))
	stream := encodeMsg(nil, MsgHeartbeat, 3, appendHeartbeat(nil, Version, Heartbeat{Sent: 1, Epoch: 2}))
	stream = encodeMsg(stream, MsgAck, 3, appendAck(nil, Version, Ack{Digest: 99}))
	stream = encodeMsg(stream, MsgBye, 4, nil)
	// One valid message.
	f.Add(hello)
	// Three valid messages, the last with an empty payload.
	f.Add(stream)
	// An empty stream: a clean io.EOF.
	f.Add([]byte{})
	// A stream ending inside a header, and inside a payload.
	f.Add(hello[:10])
	f.Add(hello[:HeaderSize+5])
	// A stream ending right after a header that announces a payload.
	f.Add(hello[:HeaderSize])
	// A valid message followed by a partial header.
	f.Add(append(bytes.Clone(stream), 1, 0))
	// A valid message followed by a bad header (type 0).
	f.Add(append(bytes.Clone(hello), make([]byte, HeaderSize)...))
	// A header announcing more than MaxPayload.
	f.Add(headerBytes(Header{Type: MsgPages, Length: MaxPayload + 1}))
	// A header with nonzero flags.
	f.Add(headerBytes(Header{Type: MsgBye, Flags: 4}))

	f.Fuzz(func(t *testing.T, b []byte) {
		rd := newMsgReader(bytes.NewReader(b))
		off := 0
		for {
			h, p, err := rd.ReadMsg()
			rest := b[off:]
			if err != nil {
				if h != (Header{}) || p != nil {
					t.Fatalf("error %q with a result: %+v, %d bytes", err, h, len(p))
				}
				switch {
				case err == io.EOF:
					if len(rest) != 0 {
						t.Fatalf("io.EOF with %d bytes unread", len(rest))
					}
				case err == io.ErrUnexpectedEOF:
					if len(rest) == 0 {
						t.Fatal("io.ErrUnexpectedEOF between messages")
					}
					if len(rest) >= HeaderSize {
						want, perr := parseHeader(rest[:HeaderSize])
						if perr != nil || uint64(len(rest)-HeaderSize) >= uint64(want.Length) {
							t.Fatalf("io.ErrUnexpectedEOF with a whole message (or a bad header) left: %x", rest)
						}
					}
				case errors.Is(err, ErrProtocol):
					if len(rest) < HeaderSize {
						t.Fatalf("protocol error %q on a partial header", err)
					}
					if _, perr := parseHeader(rest[:HeaderSize]); perr == nil {
						t.Fatalf("protocol error %q on a valid header", err)
					}
				default:
					t.Fatalf("error %q is neither ErrProtocol, io.EOF nor io.ErrUnexpectedEOF", err)
				}
				return
			}
			n := HeaderSize + int(h.Length)
			if len(rest) < n {
				t.Fatalf("read a %d-byte message from %d bytes", n, len(rest))
			}
			if !bytes.Equal(rd.rawHeader(), rest[:HeaderSize]) {
				t.Fatalf("rawHeader %x, stream has %x", rd.rawHeader(), rest[:HeaderSize])
			}
			if got := encodeMsg(nil, h.Type, h.Epoch, p); !bytes.Equal(got, rest[:n]) {
				t.Fatalf("round trip: in %x, out %x", rest[:n], got)
			}
			off += n
		}
	})
}

func TestWireReadMsg(t *testing.T) {
	var stream []byte
	want := []struct {
		t       MsgType
		epoch   uint64
		payload []byte
	}{
		{MsgHello, 0, appendHello(nil, testHello())},
		{MsgPages, 1, pagesPayload(testEntry{enc: encRaw, data: pageOf(7)})},
		{MsgBye, 2, nil},
		{MsgAck, 1, appendAck(nil, Version, Ack{Digest: 5})},
	}
	for _, m := range want {
		stream = encodeMsg(stream, m.t, m.epoch, m.payload)
	}
	rd := newMsgReader(bytes.NewReader(stream))
	for i, m := range want {
		h, p, err := rd.ReadMsg()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if h.Type != m.t || h.Epoch != m.epoch || int(h.Length) != len(m.payload) || !bytes.Equal(p, m.payload) {
			t.Fatalf("message %d: got %v epoch %d %d bytes, want %v epoch %d %d bytes", i, h.Type, h.Epoch, len(p), m.t, m.epoch, len(m.payload))
		}
	}
	if _, _, err := rd.ReadMsg(); err != io.EOF {
		t.Fatalf("at the end: %v, want io.EOF", err)
	}

	tests := []struct {
		name    string
		in      []byte
		wantErr error
		errText string
	}{
		{"partial header", stream[:3], io.ErrUnexpectedEOF, ""},
		{"header only", stream[:HeaderSize], io.ErrUnexpectedEOF, ""},
		{"partial payload", stream[:HeaderSize+1], io.ErrUnexpectedEOF, ""},
		{"bad type", headerBytes(Header{Type: 0}), ErrProtocol, "unknown message type 0"},
		{"oversize", headerBytes(Header{Type: MsgState, Length: MaxPayload + 1}), ErrProtocol, "exceeds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, p, err := newMsgReader(bytes.NewReader(tt.in)).ReadMsg()
			if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("got %v, want %v containing %q", err, tt.wantErr, tt.errText)
			}
			if h != (Header{}) || p != nil {
				t.Fatalf("error with a result: %+v, %d bytes", h, len(p))
			}
		})
	}
}

// --- Digest ----------------------------------------------------------------

func TestDigestIncremental(t *testing.T) {
	for _, pages := range []uint64{1, 5, 1<<20/PageSize + 3} { // the last spans DigestMemory's 1 MiB buffer
		rng := rand.New(rand.NewPCG(1, pages))
		size := pages * PageSize
		mem := make([]byte, size)
		for i := range mem {
			mem[i] = byte(rng.Uint32())
		}
		if pages >= 2 {
			clear(mem[PageSize : 2*PageSize]) // a zero page among the random ones
		}

		digestMem := func() uint64 {
			t.Helper()
			d, err := DigestMemory(bytes.NewReader(mem), size)
			if err != nil {
				t.Fatal(err)
			}
			return d
		}
		// The same memory as two regions back to back (one if it has one page).
		split := pages / 2 * PageSize
		slots := func() uint64 { return digestSlots([][]byte{mem[:split], mem[split:]}, nil) }

		// A fresh table is the digest of zero memory.
		tab := newDigestTable(pages)
		zeroDigest, err := DigestMemory(bytes.NewReader(make([]byte, size)), size)
		if err != nil {
			t.Fatal(err)
		}
		if tab.digest != zeroDigest {
			t.Fatalf("%d pages: new table digest %#x, zero memory %#x", pages, tab.digest, zeroDigest)
		}

		for i := range pages {
			tab.set(i, pageCRC(mem[i*PageSize:(i+1)*PageSize]))
		}
		want := digestMem()
		if tab.digest != want || slots() != want {
			t.Fatalf("%d pages: table %#x, DigestMemory %#x, digestSlots %#x", pages, tab.digest, want, slots())
		}

		// Filling the table in another order gives the same digest.
		rev := newDigestTable(pages)
		for i := pages; i > 0; i-- {
			rev.set(i-1, pageCRC(mem[(i-1)*PageSize:i*PageSize]))
		}
		if rev.digest != want {
			t.Fatalf("%d pages: digest depends on update order: %#x vs %#x", pages, rev.digest, want)
		}

		// One changed byte changes the digest, and updating just that page
		// brings the table along.
		pg := pages - 1
		old := tab.crcs[pg]
		mem[pg*PageSize+123] ^= 0x40
		changed := digestMem()
		if changed == want {
			t.Fatalf("%d pages: flipping a bit did not change the digest", pages)
		}
		newCRC := pageCRC(mem[pg*PageSize : (pg+1)*PageSize])
		if d := tab.delta(pg, newCRC); tab.digest+d != changed {
			t.Fatalf("%d pages: delta %#x does not lead to %#x", pages, d, changed)
		}
		tab.set(pg, newCRC)
		if tab.digest != changed || slots() != changed {
			t.Fatalf("%d pages: after one page changed: table %#x, DigestMemory %#x, digestSlots %#x", pages, tab.digest, changed, slots())
		}

		// Setting the page back restores the digest.
		mem[pg*PageSize+123] ^= 0x40
		tab.set(pg, old)
		if tab.digest != want || digestMem() != want {
			t.Fatalf("%d pages: setting the page back: table %#x, want %#x", pages, tab.digest, want)
		}

		// Swapping two different pages' contents changes the digest: it
		// depends on where each page is, not just on the set of pages.
		if pages >= 2 {
			a, b := bytes.Clone(mem[:PageSize]), bytes.Clone(mem[PageSize:2*PageSize])
			copy(mem[:PageSize], b)
			copy(mem[PageSize:], a)
			if !bytes.Equal(a, b) && digestMem() == want {
				t.Fatalf("%d pages: swapping pages 0 and 1 did not change the digest", pages)
			}
		}
	}
}
