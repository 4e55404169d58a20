package replicate

import (
	"fmt"
	"testing"
)

// BenchmarkBatch is one worker building a full Pages message from staged
// pages: zero check, CRC, LZ4 where the mode says. SetBytes counts guest
// memory in; wire/raw is the message over the pages.
func BenchmarkBatch(b *testing.B) {
	for _, kind := range contentKinds {
		for _, mode := range []Compression{CompressAuto, CompressAlways, CompressNever} {
			b.Run(fmt.Sprintf("pages=%s/compress=%s", kind, mode), func(b *testing.B) {
				mem := pageContents(kind, MaxBatchPages, 1)
				p := testPrimary(mem, mode)
				job := p.testJob(someGPAs(MaxBatchPages, 4*MaxBatchPages, 2), true)
				bt := getBatch(p, job, 0, len(job.gpas))
				var w worker
				b.SetBytes(int64(len(job.gpas)) * PageSize)
				for b.Loop() {
					bt.build(&w, nil, nil)
				}
				b.ReportMetric(float64(len(bt.head)+bt.size)/float64(len(job.gpas)*PageSize), "wire/raw")
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(job.gpas)), "ns/page")
			})
		}
	}
}

// BenchmarkReceive is the backup taking a Pages message (the payload copied
// in as a socket read would, every page checked against its CRC, LZ4 pages
// decoded) and applying it to a replica file.
func BenchmarkReceive(b *testing.B) {
	for _, kind := range contentKinds {
		b.Run("pages="+kind, func(b *testing.B) {
			mem := pageContents(kind, MaxBatchPages, 1)
			p := testPrimary(mem, CompressAuto)
			job := p.testJob(someGPAs(MaxBatchPages, 4*MaxBatchPages, 2), true)
			msgs, _ := p.testBatches(job)
			s := testSession(b, MaxBatchPages)
			b.SetBytes(int64(len(job.gpas)) * PageSize)
			for b.Loop() {
				if err := s.receive(msgs[0]); err != nil {
					b.Fatal(err)
				}
				if err := s.apply(false); err != nil {
					b.Fatal(err)
				}
				s.resetEpoch()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(job.gpas)), "ns/page")
		})
	}
}

// BenchmarkDigest compares updating the digest for an epoch's pages with
// digesting all of memory (the audit, and the backup's check at failover
// with VerifyReplica).
func BenchmarkDigest(b *testing.B) {
	const memPages = 16384 // 64 MiB
	mem := pageContents("stamp", memPages, 3)
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
