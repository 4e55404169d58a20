package ebpf

import "encoding/binary"

// holdQueue is the FIFO of held frames in userspace: one buffer of fixed
// size (Config.HoldLimit) used as a ring of entries, so holding never
// allocates and never grows. Frames leave from the front when their epoch
// commits and from the back when their epoch is discarded.
//
// Positions are absolute byte counts (the buffer offset is pos modulo the
// buffer size), so used bytes are tail-head and a position taken before a
// push can later truncate the queue back to it.
//
// An entry is a 24-byte header (epoch, ktime, frame length, flags) and the
// frame, padded to 8 bytes. An entry never wraps: when it does not fit
// before the end of the buffer, the rest of the buffer is skipped (marked
// with a pad header when there is room for one) and counted as used.
type holdQueue struct {
	buf  []byte
	head uint64
	tail uint64
}

const (
	queueHeaderSize = 24
	queuePad        = ^uint32(0) // frame length of a pad header
)

// queueEntry is a held frame at the front of the queue.
type queueEntry struct {
	epoch uint64
	ktime uint64
	flags uint32
	frame []byte // aliases the queue's buffer until the entry is popped
	next  uint64 // head position after this entry
}

func newHoldQueue(size int) *holdQueue {
	return &holdQueue{buf: make([]byte, size&^7)}
}

// used is the number of bytes taken, entries and skipped space.
func (q *holdQueue) used() uint64 { return q.tail - q.head }

// empty reports whether the queue holds no entry.
func (q *holdQueue) empty() bool { return q.head == q.tail }

func entrySize(n int) uint64 { return queueHeaderSize + uint64(n+7)&^7 }

// push appends a frame. It returns the tail position before the push (a
// truncate point that drops this entry and everything after it) and false,
// changing nothing, if the frame does not fit.
func (q *holdQueue) push(epoch, ktime uint64, flags uint32, frame []byte) (uint64, bool) {
	size := entrySize(len(frame))
	capacity := uint64(len(q.buf))
	if q.empty() && q.tail%capacity != 0 {
		// Nothing to keep: start again at the beginning of the buffer.
		q.tail += capacity - q.tail%capacity
		q.head = q.tail
	}
	start := q.tail
	off := q.tail % capacity
	skip := uint64(0)
	if off+size > capacity {
		skip = capacity - off
	}
	if q.used()+skip+size > capacity {
		return 0, false
	}
	if skip >= queueHeaderSize {
		binary.LittleEndian.PutUint32(q.buf[off+16:], queuePad)
	}
	q.tail += skip
	off = q.tail % capacity
	h := q.buf[off : off+queueHeaderSize]
	binary.LittleEndian.PutUint64(h[0:], epoch)
	binary.LittleEndian.PutUint64(h[8:], ktime)
	binary.LittleEndian.PutUint32(h[16:], uint32(len(frame)))
	binary.LittleEndian.PutUint32(h[20:], flags)
	copy(q.buf[off+queueHeaderSize:], frame)
	q.tail += size
	return start, true
}

// front returns the oldest entry, or false if the queue is empty. It moves
// head past skipped space.
func (q *holdQueue) front() (queueEntry, bool) {
	capacity := uint64(len(q.buf))
	for q.head != q.tail {
		off := q.head % capacity
		if capacity-off < queueHeaderSize {
			q.head += capacity - off
			continue
		}
		h := q.buf[off : off+queueHeaderSize]
		n := binary.LittleEndian.Uint32(h[16:])
		if n == queuePad {
			q.head += capacity - off
			continue
		}
		return queueEntry{
			epoch: binary.LittleEndian.Uint64(h[0:]),
			ktime: binary.LittleEndian.Uint64(h[8:]),
			flags: binary.LittleEndian.Uint32(h[20:]),
			frame: q.buf[off+queueHeaderSize : off+queueHeaderSize+uint64(n)],
			next:  q.head + entrySize(int(n)),
		}, true
	}
	return queueEntry{}, false
}

// pop removes the entry front returned.
func (q *holdQueue) pop(e queueEntry) { q.head = e.next }

// truncate drops every entry pushed at or after pos (a position push
// returned).
func (q *holdQueue) truncate(pos uint64) {
	if pos < q.head {
		pos = q.head
	}
	if pos < q.tail {
		q.tail = pos
	}
}

// clear drops every entry.
func (q *holdQueue) clear() { q.head = q.tail }
