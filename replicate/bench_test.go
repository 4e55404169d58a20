package replicate

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/pierrec/lz4/v4"
)

// pageKinds makes pages of the kinds a guest holds: zero, random (does not
// compress) and text-like (compresses about 2:1).
func pageKinds(kind string, n int) []byte {
	buf := make([]byte, n*PageSize)
	r := rand.New(rand.NewPCG(1, 2))
	switch kind {
	case "random":
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
	case "text":
		words := []string{"epoch ", "replica ", "guest ", "page ", "dirty ", "the ", "a ", "backup ", "\n"}
		var b bytes.Buffer
		for b.Len() < len(buf) {
			b.WriteString(words[r.IntN(len(words))])
		}
		copy(buf, b.Bytes())
	}
	return buf
}

// batchOf returns a memory of MaxBatchPages pages of a kind and a batch of
// all of them, read live, as a pre-copy round reads guest memory.
func batchOf(kind string) ([]byte, *batch) {
	mem := pageKinds(kind, MaxBatchPages)
	p := &Primary{lay: layout{regions: []layoutRegion{{gpa: 0, size: uint64(len(mem)), host: mem}}}}
	job := &epochJob{live: true}
	for k := range MaxBatchPages {
		job.gpas = append(job.gpas, uint64(k)*PageSize)
	}
	return mem, &batch{p: p, job: job, to: MaxBatchPages}
}

// BenchmarkBatch is one worker building a full Pages message: copy, CRC,
// zero check, LZ4. SetBytes counts guest memory in.
func BenchmarkBatch(b *testing.B) {
	for _, kind := range []string{"zero", "random", "text"} {
		b.Run("pages="+kind, func(b *testing.B) {
			mem, bt := batchOf(kind)
			var c lz4.Compressor
			page, dst := make([]byte, PageSize), make([]byte, lz4.CompressBlockBound(PageSize))
			b.SetBytes(int64(len(mem)))
			for b.Loop() {
				bt.build(&c, page, dst, nil)
			}
			b.ReportMetric(float64(len(bt.msg))/float64(len(mem)), "wire/raw")
		})
	}
}

// BenchmarkDecode is the backup decoding a Pages message into pages with
// their CRCs, as it does for every staged epoch before it acks.
func BenchmarkDecode(b *testing.B) {
	for _, kind := range []string{"zero", "random", "text"} {
		b.Run("pages="+kind, func(b *testing.B) {
			mem, bt := batchOf(kind)
			var c lz4.Compressor
			bt.build(&c, make([]byte, PageSize), make([]byte, lz4.CompressBlockBound(PageSize)), nil)
			payload := bt.msg[HeaderSize:]
			out := make([]byte, PageSize)
			b.SetBytes(int64(len(mem)))
			for b.Loop() {
				err := decodePages(payload, func(e pageEntry) error {
					if err := decodePage(e, out); err != nil {
						return err
					}
					_ = pageCRC(out)
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDigest compares updating the digest for an epoch's pages with
// digesting all of memory (the audit, and the backup's check at failover).
func BenchmarkDigest(b *testing.B) {
	const memPages = 16384 // 64 MiB
	mem := pageKinds("random", memPages)
	for _, dirty := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("update/dirty=%d", dirty), func(b *testing.B) {
			t := newDigestTable(memPages)
			b.SetBytes(int64(dirty) * PageSize)
			for b.Loop() {
				for i := range dirty {
					t.set(uint64(i), pageCRC(mem[i*PageSize:(i+1)*PageSize]))
				}
			}
		})
	}
	b.Run("full/mem=64MiB", func(b *testing.B) {
		b.SetBytes(int64(len(mem)))
		for b.Loop() {
			digestSlots([][]byte{mem}, nil)
		}
	})
}
