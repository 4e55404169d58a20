package diskmirror

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// Offsets in a stream with one write record: the stream header, the first
// record's header, its data.
const (
	rec0 = StreamHeaderSize
	dat0 = rec0 + RecordHeaderSize
)

// Every bad stream is refused with an error that names the problem, the
// backup image is unchanged, nothing is pending, and the good stream is still
// accepted afterwards.
func TestBadStreams(t *testing.T) {
	const size = 1 << 20
	p := newPair(t, size, Config{}, ReplicaConfig{})
	if err := p.m.Open(1); err != nil {
		t.Fatal(err)
	}
	p.write(t, []byte("first write of epoch one"), 4096)
	p.write(t, []byte("second"), 4100)
	if err := p.m.Open(2); err != nil {
		t.Fatal(err)
	}
	p.write(t, []byte("epoch two"), 0)
	if err := p.m.Open(3); err != nil {
		t.Fatal(err)
	}
	good, two := p.epochBytes(t, 1), p.epochBytes(t, 2)
	end := len(good) - RecordHeaderSize
	for _, c := range []struct {
		name     string
		stream   []byte
		wantErr  error
		wantText string
	}{
		{"empty", nil, ErrFormat, "truncated in stream header"},
		{"bad magic", flip(good, 0), ErrFormat, "bad magic"},
		{"version 2", patched(good, 8, uint16(2)), ErrFormat, "version 2"},
		{"version 0", patched(good, 8, uint16(0)), ErrFormat, "version 0"},
		{"sync stream", patched(good, 10, uint16(kindSync)), ErrFormat, "sync stream where epoch stream expected"},
		{"foreign image size", craft(kindEpoch, size+4096, 0, 1, Write{0, []byte("x")}), ErrImageSize, "for a 1052672-byte image"},
		{"epoch 0", craft(kindEpoch, size, 0, 0), ErrFormat, "epoch 0"},
		{"reordered: epoch 2 first", two, ErrEpoch, "epoch 2 where epoch 1 is expected"},
		{"block size in an epoch stream", patched(good, 12, uint32(4096)), ErrFormat, "block size"},
		{"corrupted data", flip(good, dat0+3), ErrFormat, "data checksum"},
		{"corrupted length", patched(good, rec0+4, uint32(23)), ErrFormat, "data checksum"},
		{"corrupted offset", patched(good, rec0+16, uint64(4097)), ErrFormat, "end record checksum"},
		{"write beyond the end", craft(kindEpoch, size, 0, 1, Write{size - 10, make([]byte, 11)}), ErrRange, "writes 11 bytes at 1048566"},
		{"offset wraps", patched(good, rec0+16, uint64(1<<64-8)), ErrRange, "the image has 1048576 bytes"},
		{"empty write", craft(kindEpoch, size, 0, 1, Write{0, nil}), ErrFormat, "length 0"},
		{"write too long", patched(good, rec0+4, uint32(MaxRecordData+1)), ErrFormat, "length 1048577"},
		{"record of another epoch", patched(good, rec0+8, uint64(2)), ErrFormat, "epoch 2 in a stream of epoch 1"},
		{"flags", patched(good, rec0+2, uint16(1)), ErrFormat, "nonzero flags"},
		{"reserved", patched(good, rec0+28, uint32(1)), ErrFormat, "reserved"},
		{"unknown record type", patched(good, rec0, uint16(3)), ErrFormat, "unknown type 3"},
		{"record type 0", patched(good, rec0, uint16(0)), ErrFormat, "unknown type 0"},
		{"end count", patched(good, end+4, uint32(1)), ErrFormat, "end record counts 1 writes"},
		{"end bytes", patched(good, end+16, uint64(29)), ErrFormat, "of 29 bytes"},
		{"end checksum", flip(good, end+24), ErrFormat, "end record checksum"},
		{"trailing byte", append(bytes.Clone(good), 0), ErrFormat, "trailing bytes"},
		{"two streams", append(bytes.Clone(good), good...), ErrFormat, "trailing bytes"},
		{"no end record", good[:end], ErrFormat, "truncated in record 2 header"},
		{"truncated in data", good[:dat0+5], ErrFormat, "truncated in record 0 data"},
		{"truncated in the end record", good[:len(good)-1], ErrFormat, "truncated in record 2 header"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := p.r.Receive(bytes.NewReader(c.stream))
			if !errors.Is(err, c.wantErr) || !strings.Contains(err.Error(), c.wantText) {
				t.Fatalf("Receive = %v, want %v naming %q", err, c.wantErr, c.wantText)
			}
			// A stream out of order is well formed on its own.
			if s, derr := DecodeEpoch(c.stream, size); c.wantErr != ErrEpoch && (s != nil || derr == nil) {
				t.Fatalf("DecodeEpoch = %v, %v; want no stream and an error", s, derr)
			}
			if s := p.r.Stats(); s.Pending != 0 || s.Next != 1 || s.Memory != 0 {
				t.Fatalf("after a refused stream: %+v", s)
			}
			if err := p.r.Commit(1); !errors.Is(err, ErrEpoch) {
				t.Fatalf("Commit(1) of a refused epoch = %v, want ErrEpoch", err)
			}
			p.wantBackup(t, p.initial, "refused stream")
		})
	}
	// Every cut of the good stream is a truncation.
	for i := range len(good) {
		if _, err := p.r.Receive(bytes.NewReader(good[:i])); !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), "truncated") {
			t.Fatalf("Receive of %d of %d bytes = %v, want a truncation", i, len(good), err)
		}
	}
	p.wantBackup(t, p.initial, "truncated streams")
	p.ship(t, 1)
	if _, err := p.r.Receive(bytes.NewReader(good)); !errors.Is(err, ErrEpoch) {
		t.Fatalf("epoch 1 again = %v, want ErrEpoch", err)
	}
	p.ship(t, 2)
	if err := p.r.Commit(2); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, contents(t, p.pimg, size), "good epochs after bad ones")
}

// A backup image of the wrong size is refused.
func TestWrongImageSize(t *testing.T) {
	for _, c := range []struct {
		name     string
		have     int64
		declared int64
		want     string
	}{
		{"smaller", 1 << 20, 2 << 20, "the primary's image has 2097152 bytes, the backup image 1048576"},
		{"larger", 2 << 20, 1<<20 + 512, "the primary's image has 1049088 bytes, the backup image 2097152"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := image(t, "backup.img", c.have, []byte("keep me"))
			r, err := NewReplica(img, c.declared, ReplicaConfig{})
			if r != nil || !errors.Is(err, ErrImageSize) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("NewReplica = %v, %v; want ErrImageSize naming %q", r, err, c.want)
			}
			if got := contents(t, img, 7); string(got) != "keep me" {
				t.Fatalf("image changed: %q", got)
			}
		})
	}
	if _, err := NewReplica(&memDisk{}, 0, ReplicaConfig{}); err == nil {
		t.Fatal("NewReplica of size 0: no error")
	}
}

const fuzzSize = 64 << 10

func FuzzDecodeEpoch(f *testing.F) {
	valid := craft(kindEpoch, fuzzSize, 0, 3,
		Write{0, []byte("hello")}, Write{2, []byte("overlap")}, Write{fuzzSize - 1, []byte{9}})
	// A valid epoch of three writes, two overlapping, one at the last byte.
	f.Add(valid)
	// A valid empty epoch: header and end record only.
	f.Add(craft(kindEpoch, fuzzSize, 0, 1))
	// A valid epoch with a whole-image write.
	f.Add(craft(kindEpoch, fuzzSize, 0, 1<<63, Write{0, make([]byte, fuzzSize)}))
	// Nothing, a header alone, a cut end record.
	f.Add([]byte{})
	f.Add(valid[:StreamHeaderSize])
	f.Add(valid[:len(valid)-1])
	// Another image size, epoch 0, a block size.
	f.Add(craft(kindEpoch, fuzzSize*2, 0, 1))
	f.Add(craft(kindEpoch, fuzzSize, 0, 0))
	f.Add(patched(valid, 12, uint32(4096)))
	// A write one byte past the end; an offset that wraps.
	f.Add(craft(kindEpoch, fuzzSize, 0, 1, Write{fuzzSize - 1, []byte{1, 2}}))
	f.Add(patched(valid, rec0+16, uint64(1<<64-1)))
	// A length of 0xffffffff: must not allocate or read that much.
	f.Add(patched(valid, rec0+4, uint32(0xffffffff)))
	// Corrupted data, a record of another epoch, an unknown type, flags.
	f.Add(flip(valid, dat0))
	f.Add(patched(valid, rec0+8, uint64(4)))
	f.Add(patched(valid, rec0, uint16(9)))
	f.Add(patched(valid, rec0+2, uint16(1)))
	// Trailing bytes.
	f.Add(append(bytes.Clone(valid), 0))

	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeEpoch(b, fuzzSize)
		// The Replica's streaming check must agree, and never touch the image.
		first := uint64(1)
		if len(b) >= StreamHeaderSize {
			if e := binary.LittleEndian.Uint64(b[24:]); e != 0 {
				first = e
			}
		}
		img := &memDisk{b: make([]byte, fuzzSize)}
		r, nerr := NewReplica(img, fuzzSize, ReplicaConfig{FirstEpoch: first})
		if nerr != nil {
			t.Fatal(nerr)
		}
		_, rerr := r.Receive(bytes.NewReader(b))
		if (err == nil) != (rerr == nil) {
			t.Fatalf("DecodeEpoch: %v, but Receive: %v", err, rerr)
		}
		if !bytes.Equal(img.b, make([]byte, fuzzSize)) {
			t.Fatal("Receive changed the image")
		}
		if err != nil {
			if s != nil {
				t.Fatalf("error %q with a stream", err)
			}
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %q is not ErrFormat", err)
			}
			return
		}
		// Round trip: the format is canonical.
		if again := craft(kindEpoch, fuzzSize, 0, s.Summary.Epoch, s.Writes...); !bytes.Equal(again, b) {
			t.Fatalf("re-encoding the decoded stream gives other bytes")
		}
		if s.Summary.Encoded != int64(len(b)) || s.Summary.Writes != len(s.Writes) {
			t.Fatalf("summary %+v for %d bytes and %d writes", s.Summary, len(b), len(s.Writes))
		}
		// Applying it gives the model's bytes.
		model := make([]byte, fuzzSize)
		for _, w := range s.Writes {
			copy(model[w.Offset:], w.Data)
		}
		if err := r.Commit(s.Summary.Epoch); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(img.b, model) {
			t.Fatal("the applied epoch differs from the model")
		}
	})
}

func FuzzDecodeSync(f *testing.F) {
	const block = 4096
	const syncFuzzSize = 3*block + 512
	valid := craft(kindSync, syncFuzzSize, block, 0, Write{0, bytes.Repeat([]byte{1}, block)}, Write{2 * block, make([]byte, block)})
	// Two whole blocks.
	f.Add(valid)
	// The short last block (the image is not a multiple of the block), and
	// one short block of 1 MiB.
	f.Add(craft(kindSync, syncFuzzSize, block, 0, Write{3 * block, make([]byte, 512)}))
	f.Add(craft(kindSync, syncFuzzSize, 1<<20, 0, Write{0, make([]byte, syncFuzzSize)}))
	// An unaligned block, a partial block, a block size that is no power of
	// two, an epoch number.
	f.Add(craft(kindSync, syncFuzzSize, block, 0, Write{1, make([]byte, block)}))
	f.Add(craft(kindSync, syncFuzzSize, block, 0, Write{0, make([]byte, block-1)}))
	f.Add(patched(valid, 12, uint32(5000)))
	f.Add(patched(valid, 24, uint64(1)))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeSync(b, syncFuzzSize)
		if err != nil {
			if s != nil || !errors.Is(err, ErrFormat) {
				t.Fatalf("error %q with stream %v, or not ErrFormat", err, s)
			}
			return
		}
		blk := binary.LittleEndian.Uint32(b[12:])
		if again := craft(kindSync, syncFuzzSize, blk, 0, s.Writes...); !bytes.Equal(again, b) {
			t.Fatal("re-encoding the decoded stream gives other bytes")
		}
		for _, w := range s.Writes {
			if w.Offset%int64(blk) != 0 || int64(len(w.Data)) != min(int64(blk), syncFuzzSize-w.Offset) {
				t.Fatalf("accepted %d bytes at %d as a %d-byte block", len(w.Data), w.Offset, blk)
			}
		}
	})
}

func FuzzDecodeHashes(f *testing.F) {
	img := &memDisk{b: bytes.Repeat([]byte("0123456789abcdef"), fuzzSize/16)}
	hs, err := HashImage(img, fuzzSize, 4096)
	if err != nil {
		f.Fatal(err)
	}
	var valid bytes.Buffer
	if err := EncodeHashes(&valid, hs, fuzzSize, 4096); err != nil {
		f.Fatal(err)
	}
	// 16 blocks of 4 KiB.
	f.Add(valid.Bytes())
	// One short block of 1 MiB over a 64 KiB image.
	var one bytes.Buffer
	EncodeHashes(&one, []Hash{{1}}, fuzzSize, 1<<20)
	f.Add(one.Bytes())
	// Cut, trailing byte, corrupted hash, wrong block size, epoch number.
	f.Add(valid.Bytes()[:valid.Len()-1])
	f.Add(append(bytes.Clone(valid.Bytes()), 0))
	f.Add(flip(valid.Bytes(), StreamHeaderSize))
	f.Add(patched(valid.Bytes(), 12, uint32(8192)))
	f.Add(patched(valid.Bytes(), 12, uint32(1)))
	f.Add(patched(valid.Bytes(), 24, uint64(1)))
	f.Fuzz(func(t *testing.T, b []byte) {
		hs, block, err := DecodeHashes(bytes.NewReader(b), fuzzSize)
		if err != nil {
			if hs != nil || block != 0 || !errors.Is(err, ErrFormat) {
				t.Fatalf("error %q with %d hashes, block %d, or not ErrFormat", err, len(hs), block)
			}
			return
		}
		var again bytes.Buffer
		if err := EncodeHashes(&again, hs, fuzzSize, block); err != nil || !bytes.Equal(again.Bytes(), b) {
			t.Fatalf("re-encoding the decoded list: %v, or other bytes", err)
		}
	})
}
