package replicate

// recvArena holds what a checkpoint's Pages messages brought, as received,
// and its LZ4 pages decoded, until the end record proves the epoch whole: in
// fixed chunks, reused from epoch to epoch. A large epoch neither
// reallocates nor copies what already arrived (a growing buffer would, and
// on a 1 GiB epoch the copy and the fresh memory's page faults stall the
// session for seconds), and steady epochs allocate nothing.
type recvArena struct {
	chunks [][]byte
	cur    int // the chunk being filled
	used   int // bytes used in it
	// peak is a slowly decaying maximum of the chunks epochs used: reset
	// frees the chunks beyond it, so one huge epoch does not pin its memory
	// for long, and epochs that vary in size do not fault fresh memory in
	// again and again.
	peak int
}

// recvChunk is a chunk's size: at least one whole message.
const recvChunk = 2 * MaxPayload

// alloc returns n bytes (n ≤ recvChunk) and where they lie.
func (a *recvArena) alloc(n int) (b []byte, chunk, off int) {
	if len(a.chunks) == 0 || a.used+n > recvChunk {
		if len(a.chunks) != 0 {
			a.cur++
		}
		if a.cur == len(a.chunks) {
			a.chunks = append(a.chunks, make([]byte, recvChunk))
		}
		a.used = 0
	}
	off = a.used
	a.used += n
	return a.chunks[a.cur][off:a.used:a.used], a.cur, off
}

// bytes returns n bytes at chunk, off.
func (a *recvArena) bytes(chunk, off, n int) []byte {
	return a.chunks[chunk][off : off+n]
}

// reset empties the arena for the next epoch.
func (a *recvArena) reset() {
	n := 0
	if len(a.chunks) != 0 {
		n = a.cur + 1
	}
	a.peak = max(n, a.peak-a.peak/16)
	keep := a.peak
	for i := keep; i < len(a.chunks); i++ {
		a.chunks[i] = nil
	}
	a.chunks = a.chunks[:min(keep, len(a.chunks))]
	a.cur, a.used = 0, 0
}
