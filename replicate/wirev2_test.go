package replicate

import (
	"bytes"
	"hash/crc32"
	"testing"
)

// The data path in version 2: the sender's batches are version-2 Pages
// messages (each entry followed by its data, no CRC), the backup takes them
// apart into the same replica bytes and CRCs, and the epoch checksum covers
// the data. Neither side allocates per page.
func TestDataPathV2(t *testing.T) {
	for _, kind := range contentKinds {
		mem := pageContents(kind, 1500, 21)
		gpas := someGPAs(1500, 1200, 22)
		for _, mode := range []Compression{CompressAuto, CompressAlways, CompressNever} {
			for _, staged := range []bool{true, false} {
				p := testPrimary(mem, mode)
				p.version = 2
				msgs, crcs := p.testBatches(p.testJob(gpas, staged))
				s := testSession(t, 1500)
				s.version = 2
				var want uint32
				for _, m := range msgs {
					h, err := parseHeader(m[:HeaderSize])
					if err != nil {
						t.Fatal(err)
					}
					if _, err := decodePages(2, m[HeaderSize:], nil); err != nil || int(h.Length) != len(m)-HeaderSize {
						t.Fatalf("%s/%s: the sender's batch is no version-2 message: %v", kind, mode, err)
					}
					want = crc32.Update(want, castagnoli, m) // version 2: whole messages
					if err := s.receive(m); err != nil {
						t.Fatalf("%s/%s: backup refused a version-2 batch: %v", kind, mode, err)
					}
				}
				if s.crc != want {
					t.Fatalf("%s/%s: epoch checksum %08x, the whole messages sum to %08x", kind, mode, s.crc, want)
				}
				for k, r := range s.recs {
					if c := pageCRC(mem[gpas[k] : gpas[k]+PageSize]); r.crc != c || crcs[k] != c {
						t.Fatalf("page %#x: backup's CRC %08x, primary's %08x, the page's %08x", gpas[k], r.crc, crcs[k], c)
					}
				}
				if err := s.apply(false); err != nil {
					t.Fatal(err)
				}
				got := s.replicaBytes(t)
				for _, g := range gpas {
					if !bytes.Equal(got[g:g+PageSize], mem[g:g+PageSize]) {
						t.Fatalf("%s/%s staged=%v: replica page %#x differs from the page sent", kind, mode, staged, g)
					}
				}
			}
		}
	}
}

func TestDataPathV2Allocs(t *testing.T) {
	for _, kind := range []string{"stamp", "text", "zero"} {
		mem := pageContents(kind, MaxBatchPages, 13)
		p := testPrimary(mem, CompressAuto)
		p.version = 2
		job := p.testJob(someGPAs(MaxBatchPages, MaxBatchPages*4, 14), true)
		var w worker
		b := getBatch(p, job, 0, len(job.gpas))
		build := testing.AllocsPerRun(20, func() { b.build(&w, nil, nil); b.buffers(); b.checksum(0) })
		var msg []byte
		for _, piece := range *b.buffers() {
			msg = append(msg, piece...)
		}
		s := testSession(t, MaxBatchPages)
		s.version = 2
		recv := testing.AllocsPerRun(20, func() {
			if err := s.receive(msg); err != nil {
				t.Fatal(err)
			}
			if err := s.apply(false); err != nil {
				t.Fatal(err)
			}
			s.resetEpoch()
		})
		if build != 0 || recv != 0 {
			t.Errorf("%s pages: %v allocations to build a version-2 batch, %v to receive and apply it; want 0", kind, build, recv)
		}
	}
}
