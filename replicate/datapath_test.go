package replicate

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"testing"
)

// The data path end to end without a network: pages captured into staging
// (or read live), built into batches by a worker, taken apart by a backup
// session exactly as they would arrive, and applied to a replica file. What
// lands in the replica must be the pages, byte for byte, whatever the
// content and the compression mode; the CRCs both sides keep must agree.

// pageContents makes n pages of a kind a guest holds, like the test VM's
// dirty workload contents: "stamp" (every byte pseudo-random: does not
// compress), "text" (words: compresses about 2:1), "sparse" (a few 64-byte
// lines written, the rest zero), "zero".
func pageContents(kind string, n int, seed uint64) []byte {
	buf := make([]byte, n*PageSize)
	r := rand.New(rand.NewPCG(seed, 7))
	switch kind {
	case "stamp":
		for i := 0; i < len(buf); i += 8 {
			binary.LittleEndian.PutUint64(buf[i:], r.Uint64())
		}
	case "text":
		words := []string{"epoch ", "replica ", "guest ", "page ", "dirty ", "the ", "a ", "backup ", "\n"}
		var b bytes.Buffer
		for b.Len() < len(buf) {
			b.WriteString(words[r.IntN(len(words))])
		}
		copy(buf, b.Bytes())
	case "sparse":
		for p := 0; p < n; p++ {
			for range 1 + r.IntN(8) {
				line := buf[p*PageSize+r.IntN(64)*64:][:64]
				for i := 0; i < 64; i += 8 {
					binary.LittleEndian.PutUint64(line[i:], r.Uint64())
				}
			}
		}
	}
	return buf
}

// testPrimary is the primary-side half of the data path over mem (one
// region at GPA 0), with staging for all of it.
func testPrimary(mem []byte, mode Compression) *Primary {
	pages := uint64(len(mem)) / PageSize
	lay := layoutOf(nil, 1)
	lay.regions = []layoutRegion{{gpa: 0, size: uint64(len(mem)), host: mem}}
	lay.shape = Shape{MemSize: uint64(len(mem)), VCPUs: 1, Regions: []Region{{GPA: 0, Size: uint64(len(mem))}}}
	p := &Primary{lay: lay, policy: newCompressPolicy(mode, pages), stage: newArena(pages)}
	p.copier = &copier{p: p}
	return p
}

// capture makes a job of the pages at gpas, staged as a pause stages them,
// or read live.
func (p *Primary) testJob(gpas []uint64, staged bool) *epochJob {
	job := &epochJob{epoch: 2, kind: kindCheckpoint, gpas: gpas, live: !staged}
	if staged {
		job.start = p.stage.alloc(uint64(len(gpas)))
		job.staged = true
		p.copier.copyRange(job, 0, len(gpas))
	}
	return job
}

// batches builds job's batches and returns each message as it goes on the
// wire, with the pages' CRCs the primary recorded.
func (p *Primary) testBatches(job *epochJob) (msgs [][]byte, crcs []uint32) {
	var w worker
	for from := 0; from < len(job.gpas); from += MaxBatchPages {
		b := getBatch(p, job, from, min(from+MaxBatchPages, len(job.gpas)))
		b.build(&w, nil, nil)
		var msg []byte
		for _, piece := range *b.buffers() {
			msg = append(msg, piece...)
		}
		msgs = append(msgs, msg)
		crcs = append(crcs, b.crc...)
		putBatch(b)
	}
	return msgs, crcs
}

// testSession is a backup session holding a replica of pages pages in a
// temporary file.
func testSession(t testing.TB, pages uint64) *session {
	f, err := os.CreateTemp("", "replica")
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(f.Name())
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(pages * PageSize)); err != nil {
		t.Fatal(err)
	}
	shape := Shape{MemSize: pages * PageSize, VCPUs: 1, Regions: []Region{{GPA: 0, Size: pages * PageSize}}}
	rep, err := openReplica(shape, f, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rep.unmap)
	return &session{
		b:         &Backup{log: slog.New(slog.NewTextHandler(io.Discard, nil))},
		rep:       rep,
		seen:      make([]uint64, (pages+63)/64),
		epoch:     2, // a checkpoint after the first: staged until its end
		maxStaged: stagingLimit(pages * PageSize),
	}
}

// receive takes one Pages message as the session's read loop does: the
// payload read into staging, then checked.
func (s *session) receive(msg []byte) error {
	h, err := parseHeader(msg[:HeaderSize])
	if err != nil {
		return err
	}
	if err := s.enter(h); err != nil {
		return err
	}
	payload, chunk, off := s.arena.alloc(int(h.Length))
	copy(payload, msg[HeaderSize:])
	return s.handlePages(msg[:HeaderSize], payload, chunk, off)
}

// replicaBytes reads the whole replica.
func (s *session) replicaBytes(t testing.TB) []byte {
	out := make([]byte, s.rep.shape.MemSize)
	if _, err := s.rep.mem.ReadAt(out, 0); err != nil {
		t.Fatal(err)
	}
	return out
}

// roundTrip sends the pages at gpas of mem through the data path into a
// fresh replica and checks the replica, the CRCs and the wire size; it
// returns the bytes the pages took on the wire.
func roundTrip(t testing.TB, mem []byte, gpas []uint64, mode Compression, staged bool) int {
	t.Helper()
	p := testPrimary(mem, mode)
	job := p.testJob(gpas, staged)
	msgs, crcs := p.testBatches(job)
	s := testSession(t, uint64(len(mem))/PageSize)
	wire := 0
	for _, m := range msgs {
		wire += len(m)
		if err := s.receive(m); err != nil {
			t.Fatalf("backup refused a batch of %s: %v", mode, err)
		}
	}
	if len(s.recs) != len(gpas) {
		t.Fatalf("backup has %d pages, %d were sent", len(s.recs), len(gpas))
	}
	for k, r := range s.recs {
		if want := pageCRC(mem[gpas[k] : gpas[k]+PageSize]); r.crc != want || crcs[k] != want {
			t.Fatalf("page %#x: backup's CRC %08x, primary's %08x, the page's %08x", gpas[k], r.crc, crcs[k], want)
		}
	}
	if err := s.apply(false); err != nil {
		t.Fatal(err)
	}
	got := s.replicaBytes(t)
	want := make([]byte, len(mem))
	for _, g := range gpas {
		copy(want[g:g+PageSize], mem[g:g+PageSize])
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("replica differs from the pages sent at byte %#x (page %#x)", i, i/PageSize*PageSize)
			}
		}
	}
	return wire
}

// someGPAs picks n of pages pages at random, in address order, as a harvest
// lists them.
func someGPAs(pages, n int, seed uint64) []uint64 {
	r := rand.New(rand.NewPCG(seed, 1))
	set := make([]bool, pages)
	for range n {
		set[r.IntN(pages)] = true
	}
	var out []uint64
	for i, in := range set {
		if in {
			out = append(out, uint64(i)*PageSize)
		}
	}
	return out
}

var contentKinds = []string{"stamp", "text", "sparse", "zero"}

func TestDataPathRoundTrip(t *testing.T) {
	const pages = 1500 // three batches, the last one short
	for _, kind := range contentKinds {
		mem := pageContents(kind, pages, 1)
		for _, mode := range []Compression{CompressAuto, CompressAlways, CompressNever} {
			for _, staged := range []bool{true, false} {
				for _, gpas := range [][]uint64{someGPAs(pages, pages, 2), someGPAs(pages, 300, 3)} {
					t.Run(fmt.Sprintf("%s/%s/staged=%v/pages=%d", kind, mode, staged, len(gpas)), func(t *testing.T) {
						roundTrip(t, mem, gpas, mode, staged)
					})
				}
			}
		}
	}
	// Mixed memory: regions of each kind side by side, so auto has to
	// follow the content region by region.
	var mem []byte
	for _, kind := range contentKinds {
		mem = append(mem, pageContents(kind, 1024, 4)...)
	}
	all := someGPAs(len(mem)/PageSize, len(mem)/PageSize*4, 5)
	for _, mode := range []Compression{CompressAuto, CompressAlways, CompressNever} {
		t.Run("mixed/"+mode.String(), func(t *testing.T) { roundTrip(t, mem, all, mode, true) })
	}
}

// Adaptive compression compresses what compresses (text within 5% of
// always trying LZ4), sends raw what does not (stamp: as small as never
// trying), and finds zero pages without LZ4 in every mode.
func TestAdaptiveCompression(t *testing.T) {
	const pages = 4096
	for _, kind := range contentKinds {
		mem := pageContents(kind, pages, 9)
		gpas := someGPAs(pages, pages*2, 10)
		wire := map[Compression]int{}
		for _, mode := range []Compression{CompressAuto, CompressAlways, CompressNever} {
			wire[mode] = roundTrip(t, mem, gpas, mode, true)
		}
		raw := len(gpas) * PageSize
		t.Logf("%s: wire/raw auto %.3f, always %.3f, never %.3f", kind, float64(wire[CompressAuto])/float64(raw),
			float64(wire[CompressAlways])/float64(raw), float64(wire[CompressNever])/float64(raw))
		switch kind {
		case "text", "sparse":
			if wire[CompressAlways] > raw*3/4 {
				t.Errorf("%s pages: always-LZ4 takes %d of %d bytes: the content does not compress as it should", kind, wire[CompressAlways], raw)
			}
			if float64(wire[CompressAuto]) > 1.05*float64(wire[CompressAlways]) {
				t.Errorf("%s pages: auto takes %d bytes, more than 5%% over always-LZ4's %d", kind, wire[CompressAuto], wire[CompressAlways])
			}
		case "stamp":
			if wire[CompressAuto] != wire[CompressNever] || wire[CompressAlways] != wire[CompressNever] {
				t.Errorf("stamp pages: auto %d, always %d, never %d bytes: incompressible pages must go raw", wire[CompressAuto], wire[CompressAlways], wire[CompressNever])
			}
		case "zero":
			want := 0
			for n := len(gpas); n > 0; n -= MaxBatchPages {
				want += HeaderSize + pagesMeta(min(n, MaxBatchPages))
			}
			for mode, w := range wire {
				if w != want {
					t.Errorf("zero pages, %s: %d bytes on the wire, want %d: their entries alone", mode, w, want)
				}
			}
		}
	}
}

// Auto probes incompressible regions only now and then: on stamp pages it
// tries LZ4 on few pages, and a region that becomes compressible is
// compressed again within compressMaxSkip of its pages.
func TestCompressPolicyProbes(t *testing.T) {
	c := newCompressPolicy(CompressAuto, 1<<compressRegionShift)
	tries := 0
	for i := range uint64(1 << compressRegionShift) {
		if c.try(i) {
			tries++
			c.result(i, false)
		}
	}
	if tries > (1<<compressRegionShift)/compressMaxSkip*2 {
		t.Errorf("auto tried LZ4 on %d of %d incompressible pages", tries, 1<<compressRegionShift)
	}
	// Now the region compresses: within compressMaxSkip+1 pages it is tried
	// again, and from a success on, every page is.
	var first uint64 = 1 << 62
	for i := range uint64(compressMaxSkip + 1) {
		if c.try(i) {
			first = min(first, i)
			c.result(i, true)
		}
	}
	if first > compressMaxSkip {
		t.Fatalf("a region that became compressible was not tried in %d pages", compressMaxSkip+1)
	}
	for i := range uint64(100) {
		if !c.try(i) {
			t.Fatalf("page %d of a compressible region not tried", i)
		}
		c.result(i, true)
	}
}

// FuzzDataPath sends arbitrary page bytes through the data path in every
// mode: the replica must get them exactly.
func FuzzDataPath(f *testing.F) {
	f.Add([]byte("a page of text, a page of text, a page of text"), uint8(3))
	f.Add(make([]byte, 64), uint8(2))
	f.Add(bytes.Repeat([]byte{0xff, 0}, 3000), uint8(5))
	f.Add(pageContents("stamp", 1, 1)[:1000], uint8(1))
	f.Fuzz(func(t *testing.T, seed []byte, n uint8) {
		pages := int(n%8) + 1
		mem := make([]byte, pages*PageSize)
		for p := range pages {
			// Page p holds the seed, repeated from offset p, so pages differ.
			if len(seed) > 0 {
				for i := range PageSize {
					mem[p*PageSize+i] = seed[(i+p)%len(seed)]
				}
			}
			if p%3 == 2 {
				clear(mem[p*PageSize : (p+1)*PageSize])
			}
		}
		gpas := someGPAs(pages, pages, uint64(n))
		for _, mode := range []Compression{CompressAuto, CompressAlways, CompressNever} {
			for _, staged := range []bool{true, false} {
				roundTrip(t, mem, gpas, mode, staged)
			}
		}
	})
}

// A corrupted page byte is caught by its CRC, and nothing of its batch is
// kept; so is a zero page whose entry claims another CRC.
func TestDataPathCorruption(t *testing.T) {
	for _, kind := range []string{"stamp", "text"} {
		mem := pageContents(kind, 64, 11)
		p := testPrimary(mem, CompressAlways)
		job := p.testJob(someGPAs(64, 64, 12), true)
		msgs, _ := p.testBatches(job)
		msg := msgs[0]
		msg[len(msg)-1] ^= 1
		s := testSession(t, 64)
		err := s.receive(msg)
		checkProto(t, err, "checksum")
	}
	zero := make([]byte, 4*PageSize)
	p := testPrimary(zero, CompressAuto)
	msgs, _ := p.testBatches(p.testJob([]uint64{0, PageSize}, true))
	binary.LittleEndian.PutUint32(msgs[0][HeaderSize+entryOff(1, 8):], 5)
	s := testSession(t, 4)
	checkProto(t, s.receive(msgs[0]), "zero page at GPA 0x1000 with checksum 00000005")
}

// No allocation per page: building a batch, and receiving and applying it,
// allocate nothing once their buffers are grown.
func TestDataPathAllocs(t *testing.T) {
	for _, kind := range []string{"stamp", "text", "zero"} {
		mem := pageContents(kind, MaxBatchPages, 13)
		p := testPrimary(mem, CompressAuto)
		job := p.testJob(someGPAs(MaxBatchPages, MaxBatchPages*4, 14), true)
		var w worker
		b := getBatch(p, job, 0, len(job.gpas))
		build := testing.AllocsPerRun(20, func() { b.build(&w, nil, nil); b.buffers() })
		var msg []byte
		for _, piece := range *b.buffers() {
			msg = append(msg, piece...)
		}
		s := testSession(t, MaxBatchPages)
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
			t.Errorf("%s pages: %v allocations to build a batch of %d pages, %v to receive and apply it; want 0",
				kind, build, len(job.gpas), recv)
		}
	}
}

// A checkpoint that dirties all of a guest's compressible memory fits the
// backup's staging limit: the limit counts what the stream brings, not the
// LZ4 pages decoded beside it (which, with the stream, exceed it at 64 MiB).
func TestStagingLimitCountsTheStream(t *testing.T) {
	const pages = 64 << 20 / PageSize
	mem := pageContents("text", pages, 1)
	all := make([]uint64, pages)
	for i := range all {
		all[i] = uint64(i) * PageSize
	}
	wire := roundTrip(t, mem, all, CompressAlways, true)
	if decoded := pages * PageSize; wire+decoded <= stagingLimit(pages*PageSize) {
		t.Fatalf("stream %d + decoded %d bytes fit the limit %d: the test proves nothing", wire, decoded, stagingLimit(pages*PageSize))
	}
}

// Checkpoint 1 is applied as it arrives (until it is complete the replica
// holds no checkpoint to protect), later ones only at their end.
func TestFirstCheckpointAppliedAtOnce(t *testing.T) {
	const pages = 600
	mem := pageContents("text", pages, 1)
	gpas := someGPAs(pages, 400, 4)
	p := testPrimary(mem, CompressAuto)
	job := p.testJob(gpas, true)
	job.epoch = 1
	msgs, _ := p.testBatches(job)
	s := testSession(t, pages)
	s.epoch = 1
	for _, m := range msgs {
		if err := s.receive(m); err != nil {
			t.Fatal(err)
		}
	}
	if len(s.recs) != 0 || s.pages != uint64(len(gpas)) {
		t.Fatalf("checkpoint 1: %d pages staged of %d received, want none staged", len(s.recs), s.pages)
	}
	got := s.replicaBytes(t)
	for _, g := range gpas {
		if !bytes.Equal(got[g:g+PageSize], mem[g:g+PageSize]) {
			t.Fatalf("page %#x not in the replica after checkpoint 1's pages arrived", g)
		}
	}
}
