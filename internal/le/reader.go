package le

import (
	"encoding/binary"
	"fmt"
)

// ShortError is the error of a Reader whose input ends before a field.
type ShortError struct {
	What string // the field
	Need int    // bytes the field needs
	Left int    // bytes that were left
}

func (e *ShortError) Error() string {
	return fmt.Sprintf("%s needs %d bytes, %d left", e.What, e.Need, e.Left)
}

// LimitError is the error of a Reader that read a length prefix over the
// limit its caller set.
type LimitError struct {
	What  string // the field the length is of
	Len   uint32 // the length read
	Limit int
}

func (e *LimitError) Error() string {
	return fmt.Sprintf("%s: length %d exceeds the limit of %d", e.What, e.Len, e.Limit)
}

// Reader reads fields from the front of a byte slice. Each method names the
// field it reads, for the error. Once a read fails, every later one returns
// zero (or nil) and consumes nothing, and Err returns the first error.
type Reader struct {
	b   []byte
	err error
}

// NewReader returns a Reader of b. It does not copy b: Take returns slices of
// it, and Rest the part not read.
func NewReader(b []byte) Reader { return Reader{b: b} }

// Err returns the first error a read met, or nil.
func (r *Reader) Err() error { return r.err }

// Rest returns the bytes not read yet.
func (r *Reader) Rest() []byte { return r.b }

// Fail sets the Reader's error to err, if it has none, so that a decoder can
// stop at a value that is read but invalid, as at a short one.
func (r *Reader) Fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

// Take returns the next n bytes, a slice of the input, or nil when fewer
// than n are left (or n < 0).
func (r *Reader) Take(what string, n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || len(r.b) < n {
		r.err = &ShortError{What: what, Need: n, Left: len(r.b)}
		return nil
	}
	p := r.b[:n:n]
	r.b = r.b[n:]
	return p
}

// Fixed fills dst from the next len(dst) bytes. dst is left unchanged when
// they are not there.
func (r *Reader) Fixed(what string, dst []byte) {
	if p := r.Take(what, len(dst)); p != nil {
		copy(dst, p)
	}
}

// U32 reads a uint32.
func (r *Reader) U32(what string) uint32 {
	if p := r.Take(what, 4); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

// U64 reads a uint64.
func (r *Reader) U64(what string) uint64 {
	if p := r.Take(what, 8); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

// Count reads a uint32 length prefix and checks it against limit. It returns
// 0 on error.
func (r *Reader) Count(what string, limit int) int {
	n := r.U32(what + " length")
	if r.err != nil {
		return 0
	}
	if uint64(n) > uint64(limit) {
		r.err = &LimitError{What: what, Len: n, Limit: limit}
		return 0
	}
	return int(n)
}

// Bytes reads a uint32 length, at most limit, and that many bytes, and
// returns a copy of them: nil for a length of 0 or on error.
func (r *Reader) Bytes(what string, limit int) []byte {
	n := r.Count(what, limit)
	p := r.Take(what, n)
	if len(p) == 0 {
		return nil
	}
	return append([]byte(nil), p...)
}
