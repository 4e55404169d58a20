package diskmirror

import (
	"bytes"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// image makes a temporary image file of size bytes holding fill (repeated
// or cut to size; zeros if nil).
func image(t testing.TB, name string, size int64, fill []byte) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if fill != nil {
		if _, err := f.WriteAt(fill[:min(int64(len(fill)), size)], 0); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func contents(t testing.TB, f io.ReaderAt, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, (n+7)/8*8)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:n]
}

// pair is a primary image with its Mirror and a backup image with its
// Replica, both starting with the same bytes.
type pair struct {
	size    int64
	pimg    *os.File
	bimg    *os.File
	m       *Mirror
	r       *Replica
	initial []byte
}

func newPair(t testing.TB, size int64, mcfg Config, rcfg ReplicaConfig) *pair {
	t.Helper()
	init := randBytes(rand.New(rand.NewPCG(1, 2)), int(size))
	p := &pair{size: size, pimg: image(t, "primary.img", size, init), bimg: image(t, "backup.img", size, init), initial: init}
	var err error
	if p.m, err = NewMirror(p.pimg, mcfg); err != nil {
		t.Fatal(err)
	}
	if p.r, err = NewReplica(p.bimg, size, rcfg); err != nil {
		t.Fatal(err)
	}
	return p
}

// ship takes epoch n from the mirror and gives it to the replica.
func (p *pair) ship(t testing.TB, n uint64) Summary {
	t.Helper()
	rd, sum, err := p.m.Epoch(n)
	if err != nil {
		t.Fatal(err)
	}
	got, err := p.r.Receive(rd)
	if err != nil {
		t.Fatalf("receive epoch %d: %v", n, err)
	}
	if got != sum {
		t.Fatalf("receive epoch %d: summary %+v, mirror says %+v", n, got, sum)
	}
	return sum
}

func (p *pair) write(t testing.TB, b []byte, off int64) {
	t.Helper()
	if n, err := p.m.WriteAt(b, off); err != nil || n != len(b) {
		t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(b), off, n, err)
	}
}

func (p *pair) wantBackup(t testing.TB, want []byte, what string) {
	t.Helper()
	got := contents(t, p.bimg, p.size)
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: backup image differs from the model at byte %d", what, i)
	}
}

// epochBytes returns epoch n's encoded stream.
func (p *pair) epochBytes(t testing.TB, n uint64) []byte {
	t.Helper()
	rd, _, err := p.m.Epoch(n)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rd)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// memDisk is an image in memory.
type memDisk struct{ b []byte }

func (d *memDisk) Size() int64 { return int64(len(d.b)) }
func (d *memDisk) Sync() error { return nil }

func (d *memDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(d.b)) {
		return 0, io.EOF
	}
	n := copy(p, d.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (d *memDisk) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return 0, io.ErrShortWrite
	}
	return copy(d.b[off:], p), nil
}

// craft encodes a stream of the given kind with the given writes, checked or
// not: tests use it to make streams the Mirror would never make.
func craft(kind uint16, size int64, block uint32, epoch uint64, ws ...Write) []byte {
	var out bytes.Buffer
	var e encoder
	e.start(&out, streamHeader{Kind: kind, Block: block, Size: size, Epoch: epoch})
	for _, w := range ws {
		e.write(w.Offset, w.Data)
	}
	e.end()
	return out.Bytes()
}

// patched returns a copy of b with v written little-endian at off.
func patched(b []byte, off int, v any) []byte {
	b = bytes.Clone(b)
	switch v := v.(type) {
	case uint8:
		b[off] = v
	case uint16:
		binary.LittleEndian.PutUint16(b[off:], v)
	case uint32:
		binary.LittleEndian.PutUint32(b[off:], v)
	case uint64:
		binary.LittleEndian.PutUint64(b[off:], v)
	}
	return b
}

// flip returns a copy of b with bit 0 of byte off inverted.
func flip(b []byte, off int) []byte {
	b = bytes.Clone(b)
	b[off] ^= 1
	return b
}
