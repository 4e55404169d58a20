package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Record flags (struct rec_hdr.flags in bpf/hold.c).
const (
	// recVLANRestored: the kernel had moved the frame's VLAN tag into skb
	// metadata before tc ingress, and the hold program put it back.
	recVLANRestored = 1 << 0
	// recDrain: the frame was held in pass mode because frames held before
	// it were still on their way back (see Gate.Release).
	recDrain = 1 << 1

	recKnownFlags = recVLANRestored | recDrain
)

// recordHeaderSize is sizeof(struct rec_hdr) in bpf/hold.c. The struct is
// no map's type, so bpf2go does not generate it; this file mirrors it:
//
//	struct rec_hdr {
//		__u64 epoch; // offset 0
//		__u64 seq;   // offset 8
//		__u64 ktime; // offset 16
//		__u32 len;   // offset 24
//		__u32 flags; // offset 28
//	};
const recordHeaderSize = 32

// ethHeaderLen is the smallest frame the gate handles: an Ethernet header.
const ethHeaderLen = 14

// maxFrame is the capacity of the largest record class (CLASS4 in hold.c):
// a larger frame is dropped in the kernel and counted as too big.
const maxFrame = 65544

// record is one held frame as the hold program put it into the ring.
type record struct {
	epoch uint64 // epoch open when the frame was held
	seq   uint64 // hold-path sequence number (diagnostics only)
	ktime uint64 // CLOCK_MONOTONIC nanoseconds at hold
	flags uint32 // rec* flags
	frame []byte // the frame, aliasing the raw sample
}

// errMalformed is wrapped by every decodeRecord error.
var errMalformed = errors.New("malformed ring record")

// decodeRecord decodes a raw ring sample. The sample is the record class's
// reserved size: the header, the frame, then unused capacity. On error the
// record is zero.
func decodeRecord(raw []byte) (record, error) {
	if len(raw) < recordHeaderSize {
		return record{}, fmt.Errorf("%w: %d bytes, want at least a %d-byte header", errMalformed, len(raw), recordHeaderSize)
	}
	n := binary.LittleEndian.Uint32(raw[24:])
	flags := binary.LittleEndian.Uint32(raw[28:])
	if n < ethHeaderLen || n > maxFrame {
		return record{}, fmt.Errorf("%w: frame length %d, want %d to %d", errMalformed, n, ethHeaderLen, maxFrame)
	}
	if int(n) > len(raw)-recordHeaderSize {
		return record{}, fmt.Errorf("%w: frame length %d overruns the %d-byte sample", errMalformed, n, len(raw))
	}
	if flags&^recKnownFlags != 0 {
		return record{}, fmt.Errorf("%w: unknown flags %#x", errMalformed, flags)
	}
	return record{
		epoch: binary.LittleEndian.Uint64(raw[0:]),
		seq:   binary.LittleEndian.Uint64(raw[8:]),
		ktime: binary.LittleEndian.Uint64(raw[16:]),
		flags: flags,
		frame: raw[recordHeaderSize : recordHeaderSize+int(n)],
	}, nil
}
