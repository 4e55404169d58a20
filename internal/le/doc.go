// Package le reads the little-endian encodings of kvm's and testvm's saved
// state: fixed-size fields, and parts prefixed with a uint32 length.
//
// A Reader keeps the first error it meets and, after it, reads nothing more:
// a decoder reads every field in order and checks Err once at the end. The
// error names the field that did not fit (a *ShortError when the input ends
// before it, a *LimitError when its length prefix is over the decoder's
// limit), so a bad state says where it went wrong. Limits keep a hostile
// length from making a decoder allocate without bound.
package le
