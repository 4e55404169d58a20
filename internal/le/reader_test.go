package le

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

func TestReader(t *testing.T) {
	b := binary.LittleEndian.AppendUint32(nil, 0x11223344)
	b = binary.LittleEndian.AppendUint64(b, 0x5566778899aabbcc)
	b = append(b, 1, 2, 3)
	b = binary.LittleEndian.AppendUint32(b, 2) // a length-prefixed part
	b = append(b, 9, 8)
	b = binary.LittleEndian.AppendUint32(b, 0) // an empty one
	b = append(b, 0xee)

	r := NewReader(b)
	var fixed [3]byte
	if v := r.U32("a"); v != 0x11223344 {
		t.Errorf("U32 = %#x", v)
	}
	if v := r.U64("b"); v != 0x5566778899aabbcc {
		t.Errorf("U64 = %#x", v)
	}
	r.Fixed("c", fixed[:])
	part := r.Bytes("d", 2)
	empty := r.Bytes("e", 2)
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	if fixed != [3]byte{1, 2, 3} || !bytes.Equal(part, []byte{9, 8}) || empty != nil {
		t.Errorf("Fixed %v, Bytes %v and %v", fixed, part, empty)
	}
	if rest := r.Rest(); !bytes.Equal(rest, []byte{0xee}) {
		t.Errorf("Rest = %x", rest)
	}
	part[0] = 0
	if b[len(b)-7] != 9 {
		t.Error("Bytes returned a slice of the input, not a copy")
	}
}

// Each read that runs off the end names its field, the bytes it needed and
// those left.
func TestReaderShort(t *testing.T) {
	four := []byte{1, 2, 3, 4}
	tests := []struct {
		name     string
		in       []byte
		read     func(r *Reader)
		wantWhat string
		wantNeed int
		wantLeft int
	}{
		{"u32", []byte{1, 2, 3}, func(r *Reader) { r.U32("tx_cons") }, "tx_cons", 4, 3},
		{"u64", four, func(r *Reader) { r.U64("mem size") }, "mem size", 8, 4},
		{"fixed", four, func(r *Reader) { r.Fixed("regs", make([]byte, 5)) }, "regs", 5, 4},
		{"take", nil, func(r *Reader) { r.Take("frame", 1) }, "frame", 1, 0},
		{"take negative", four, func(r *Reader) { r.Take("frame", -1) }, "frame", -1, 4},
		{"length prefix", []byte{1, 0}, func(r *Reader) { r.Bytes("xsave", 100) }, "xsave length", 4, 2},
		{"counted bytes", append(binary.LittleEndian.AppendUint32(nil, 3), 1, 2), func(r *Reader) { r.Bytes("xsave", 100) }, "xsave", 3, 2},
		{"count", []byte{7}, func(r *Reader) { r.Count("msrs", 10) }, "msrs length", 4, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(tc.in)
			tc.read(&r)
			var e *ShortError
			if !errors.As(r.Err(), &e) {
				t.Fatalf("Err() = %v, want a *ShortError", r.Err())
			}
			if e.What != tc.wantWhat || e.Need != tc.wantNeed || e.Left != tc.wantLeft {
				t.Errorf("error %+v (%q), want %s needing %d with %d left", *e, e, tc.wantWhat, tc.wantNeed, tc.wantLeft)
			}
		})
	}
}

// A length over its limit is refused before anything of that length is read
// or allocated.
func TestReaderLimit(t *testing.T) {
	b := binary.LittleEndian.AppendUint32(nil, 0xffffffff)
	for _, read := range []func(r *Reader){
		func(r *Reader) { r.Count("msrs", 4096) },
		func(r *Reader) { r.Bytes("msrs", 4096) },
	} {
		r := NewReader(b)
		read(&r)
		var e *LimitError
		if !errors.As(r.Err(), &e) || e.What != "msrs" || e.Len != 0xffffffff || e.Limit != 4096 {
			t.Errorf("Err() = %v, want a *LimitError for msrs", r.Err())
		}
		if want := "msrs: length 4294967295 exceeds the limit of 4096"; r.Err().Error() != want {
			t.Errorf("error %q, want %q", r.Err(), want)
		}
	}
	r := NewReader(binary.LittleEndian.AppendUint32(nil, 4096))
	if n := r.Count("msrs", 4096); n != 4096 || r.Err() != nil {
		t.Errorf("Count at the limit = %d, %v", n, r.Err())
	}
}

// After the first error every read returns zero, consumes nothing, and the
// first error stays.
func TestReaderSticky(t *testing.T) {
	r := NewReader([]byte{1, 2, 3, 4, 5, 6})
	r.U64("first")
	first := r.Err()
	if first == nil {
		t.Fatal("no error reading 8 of 6 bytes")
	}
	dst := []byte{0xaa}
	r.Fixed("fixed", dst)
	r.Fail(errors.New("later"))
	if v, p, n, c := r.U32("u32"), r.Take("take", 0), r.Bytes("bytes", 10), r.Count("count", 10); v != 0 || p != nil || n != nil || c != 0 {
		t.Errorf("reads after an error returned %d, %v, %v, %d", v, p, n, c)
	}
	if dst[0] != 0xaa {
		t.Error("Fixed wrote into its destination after an error")
	}
	if r.Err() != first {
		t.Errorf("Err() = %v, want the first error %v", r.Err(), first)
	}
	if len(r.Rest()) != 6 {
		t.Errorf("%d bytes left after failed reads, want all 6", len(r.Rest()))
	}
	var e *ShortError
	if !errors.As(first, &e) || e.What != "first" {
		t.Errorf("first error %v does not name the field first", first)
	}
}

func TestReaderFail(t *testing.T) {
	r := NewReader([]byte{1, 0, 0, 0})
	bad := errors.New("flag 1 not allowed")
	r.Fail(bad)
	if v := r.U32("flag"); v != 0 || r.Err() != bad {
		t.Errorf("after Fail: U32 = %d, Err() = %v", v, r.Err())
	}
}
