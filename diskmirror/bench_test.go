package diskmirror

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// BenchmarkWrite compares, in one run, 4 KiB writes at random offsets of a
// 64 MiB image through a Mirror (logged, an epoch opened and committed every
// 1024 writes) with plain WriteAt on the same file, and reports the ratio.
func BenchmarkWrite(b *testing.B) {
	const (
		size   = 64 << 20
		writes = 16384
		wsize  = 4096
		epoch  = 1024
	)
	img := image(b, "primary.img", size, nil)
	m, err := NewMirror(img, Config{})
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 1))
	data := randBytes(r, wsize)
	offs := make([]int64, writes)
	for i := range offs {
		offs[i] = r.Int64N(size/wsize) * wsize
	}
	b.SetBytes(writes * wsize)
	var plain, mirrored time.Duration
	n := uint64(0)
	for b.Loop() {
		start := time.Now()
		for _, off := range offs {
			if _, err := img.WriteAt(data, off); err != nil {
				b.Fatal(err)
			}
		}
		plain += time.Since(start)
		start = time.Now()
		for i, off := range offs {
			if i%epoch == 0 {
				n++
				if err := m.Open(n); err != nil {
					b.Fatal(err)
				}
				if n > 1 {
					if err := m.Commit(n - 1); err != nil {
						b.Fatal(err)
					}
				}
			}
			if _, err := m.WriteAt(data, off); err != nil {
				b.Fatal(err)
			}
		}
		mirrored += time.Since(start)
	}
	ops := float64(b.N * writes)
	b.ReportMetric(float64(plain.Nanoseconds())/ops, "plain-ns/write")
	b.ReportMetric(float64(mirrored.Nanoseconds())/ops, "mirror-ns/write")
	b.ReportMetric(float64(mirrored)/float64(plain), "mirror/plain")
}

// BenchmarkInitialSync syncs a sparse 1 GiB image to a backup that already
// holds 0, 50 or 100% of its 1 MiB blocks, and reports the time (hashing
// both sides, sending and applying) and the bytes sent. A differing block
// differs in one byte, so the images stay sparse.
func BenchmarkInitialSync(b *testing.B) {
	const size = 1 << 30
	const block = DefaultBlockSize
	for _, identical := range []int{0, 50, 100} {
		b.Run(fmt.Sprintf("size=1GiB/identical=%d%%", identical), func(b *testing.B) {
			var sent, enc int64
			for b.Loop() {
				b.StopTimer()
				pimg := image(b, "primary.img", size, nil)
				bimg := image(b, "backup.img", size, nil)
				nb := int64(size / block)
				for i := range nb {
					if i*100 >= nb*int64(identical) { // the first identical% blocks are the same
						if _, err := pimg.WriteAt([]byte{1}, i*block+17); err != nil {
							b.Fatal(err)
						}
					}
				}
				m, err := NewMirror(pimg, Config{})
				if err != nil {
					b.Fatal(err)
				}
				r, err := NewReplica(bimg, size, ReplicaConfig{})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				hs, err := r.Hashes(block)
				if err != nil {
					b.Fatal(err)
				}
				var list bytes.Buffer
				if err := EncodeHashes(&list, hs, size, block); err != nil {
					b.Fatal(err)
				}
				remote, blk, err := DecodeHashes(&list, size)
				if err != nil {
					b.Fatal(err)
				}
				st, err := m.Precopy(remote, blk, SyncConfig{}, func(s []byte) error {
					_, err := r.ApplySync(bytes.NewReader(s))
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
				if want := (nb - nb*int64(identical)/100) * block; st.Bytes != want {
					b.Fatalf("sent %d bytes, want %d", st.Bytes, want)
				}
				sent += st.Bytes
				enc += st.Encoded + int64(list.Len())
			}
			b.ReportMetric(float64(sent)/float64(b.N)/(1<<20), "sent-MiB/op")
			b.ReportMetric(float64(enc)/float64(b.N)/(1<<20), "wire-MiB/op")
		})
	}
}
