package diskmirror

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"sync"
)

// chunkSize is the unit in which spools take memory from their budget.
const chunkSize = 256 << 10

// DefaultMemoryLimit is the memory a Mirror or a Replica holds for its
// epochs' records when its config says 0.
const DefaultMemoryLimit = 64 << 20

// budget is the memory all the spools of one Mirror or Replica share. A spool
// takes whole chunks, so the bytes held never exceed the limit. Chunks given
// back are kept for the next spool: the Mirror opens an epoch (and writes its
// header into a chunk) in the engine's pause, which should not allocate and
// zero 256 KiB. The chunks in use and kept together stay within the limit.
type budget struct {
	mu    sync.Mutex
	used  int64
	limit int64
	spare [][]byte
}

// chunk takes an empty chunk, or returns nil when the budget is spent.
func (b *budget) chunk() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+chunkSize > b.limit {
		return nil
	}
	b.used += chunkSize
	if n := len(b.spare); n > 0 {
		c := b.spare[n-1]
		b.spare = b.spare[:n-1]
		return c[:0]
	}
	return make([]byte, 0, chunkSize)
}

// give returns chunks no one reads any more.
func (b *budget) give(cs [][]byte) {
	b.mu.Lock()
	b.used -= int64(len(cs)) * chunkSize
	b.spare = append(b.spare, cs...)
	b.mu.Unlock()
}

func (b *budget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// spool holds one stream's bytes: in memory chunks while the budget allows,
// then in a spill file (created in dir and unlinked at once, so nothing is
// left behind even if the process dies). Bytes are never dropped: a write the
// spool cannot keep returns an error. A spool is written by one goroutine;
// reader and free may run in another once writing is over.
type spool struct {
	b      *budget
	dir    string
	chunks [][]byte
	f      *os.File
	flen   int64
}

func (s *spool) Write(p []byte) (int, error) {
	total := len(p)
	for s.f == nil && len(p) > 0 {
		if n := len(s.chunks); n > 0 {
			last := s.chunks[n-1]
			if room := cap(last) - len(last); room > 0 {
				k := min(room, len(p))
				s.chunks[n-1] = append(last, p[:k]...)
				p = p[k:]
				continue
			}
		}
		c := s.b.chunk()
		if c == nil {
			break
		}
		s.chunks = append(s.chunks, c)
	}
	if len(p) == 0 {
		return total, nil
	}
	if s.f == nil {
		f, err := os.CreateTemp(s.dir, "diskmirror-spill-*")
		if err != nil {
			return total - len(p), fmt.Errorf("create spill file: %w", err)
		}
		if err := os.Remove(f.Name()); err != nil {
			f.Close()
			return total - len(p), fmt.Errorf("unlink spill file: %w", err)
		}
		s.f = f
	}
	n, err := s.f.WriteAt(p, s.flen)
	s.flen += int64(n)
	if err != nil {
		return total - len(p) + n, fmt.Errorf("write spill file: %w", err)
	}
	return total, nil
}

// size is the number of bytes held.
func (s *spool) size() int64 {
	var n int64
	for _, c := range s.chunks {
		n += int64(len(c))
	}
	return n + s.flen
}

// spilled is the number of bytes held in the spill file.
func (s *spool) spilled() int64 { return s.flen }

// reader returns a reader of every byte written so far, in order. It stays
// valid until free (after which its chunks may hold another spool's bytes).
func (s *spool) reader() io.Reader {
	rs := make([]io.Reader, 0, len(s.chunks)+1)
	for _, c := range s.chunks {
		rs = append(rs, bytes.NewReader(c))
	}
	if s.f != nil {
		rs = append(rs, io.NewSectionReader(s.f, 0, s.flen))
	}
	return io.MultiReader(rs...)
}

// readAt reads len(p) bytes at off of what was written.
func (s *spool) readAt(p []byte, off int64) error {
	for _, c := range s.chunks {
		if len(p) == 0 {
			return nil
		}
		if off >= int64(len(c)) {
			off -= int64(len(c))
			continue
		}
		k := copy(p, c[off:])
		p, off = p[k:], 0
	}
	if len(p) == 0 {
		return nil
	}
	if s.f == nil || off+int64(len(p)) > s.flen {
		return fmt.Errorf("read %d bytes past the end of a %d-byte spool", len(p), s.size())
	}
	_, err := s.f.ReadAt(p, off)
	return err
}

// free returns the memory to the budget and closes the spill file.
func (s *spool) free() {
	s.b.give(s.chunks)
	s.chunks = nil
	if s.f != nil {
		s.f.Close()
		s.f = nil
	}
	s.flen = 0
}
