package dirtylog_test

import (
	"context"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/kvm"
	"github.com/repagent/repagent/testvm"
)

// Harvest cost per mechanism, against the raw KVM ioctls measured in the same
// run, and the cost of walking a dirty set. See docs/BENCHMARKS.md. No
// benchmark asserts a speed; they fail only when they would measure the wrong
// thing (a harvest that does not return the pages the guest wrote).

// phaser runs a phased guest one phase at a time and leaves it paused, as an
// epoch checkpoint harvests: the vCPU is parked outside KVM_RUN instead of
// spinning in the guest, waiting for the next phase, on one of the two cores.
// With n = 0 the guest is never let go, so it writes nothing.
type phaser struct {
	b     *testing.B
	m     *testvm.Machine
	n     uint64
	phase uint64
	ctx   context.Context
}

func (p *phaser) next() {
	if p.n != 0 {
		if err := p.m.Resume(); err != nil {
			p.b.Fatal(err)
		}
		p.phase++
		p.m.Go(p.phase)
		if err := p.m.WaitPhase(p.ctx, p.phase); err != nil {
			p.b.Fatal(err)
		}
	}
	if err := p.m.Pause(); err != nil {
		p.b.Fatal(err)
	}
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func countBits(bms [][]uint64) int {
	n := 0
	for _, bm := range bms {
		for _, w := range bm {
			n += bits.OnesCount64(w)
		}
	}
	return n
}

func slotBitmaps(m *testvm.Machine) [][]uint64 {
	var bms [][]uint64
	for _, s := range m.Slots() {
		bms = append(bms, make([]uint64, (s.Size/4096+63)/64))
	}
	return bms
}

// rawResult is one raw harvest: its ioctl time, split into fetch and protect
// where the mechanism has the two steps.
type rawResult struct {
	fetch, protect time.Duration
}

// rawHarvester is the raw KVM sequence a harvest needs, without the tracker.
// harvest leaves the pages it got in bitmaps(), which the caller counts and
// clears outside the timing.
type rawHarvester interface {
	harvest() (rawResult, error)
	bitmaps() [][]uint64
}

// rawBitmap is classic KVM_GET_DIRTY_LOG on every slot.
type rawBitmap struct {
	vm    *kvm.VM
	slots []testvm.Slot
	bms   [][]uint64
}

func (r *rawBitmap) harvest() (rawResult, error) {
	t0 := time.Now()
	for i, s := range r.slots {
		if err := r.vm.GetDirtyLog(s.ID, r.bms[i]); err != nil {
			return rawResult{}, err
		}
	}
	return rawResult{fetch: time.Since(t0)}, nil
}

func (r *rawBitmap) bitmaps() [][]uint64 { return r.bms }

// rawManual is KVM_GET_DIRTY_LOG on every slot, then KVM_CLEAR_DIRTY_LOG of
// exactly the fetched bitmap, one call per slot covering the whole slot (first
// page 0, the slot's page count: allowed because the range ends the slot, and
// at most 2^19 pages here, well within uint32). The clear is issued even for
// an all-zero bitmap: that is the plain sequence, with no Go-side scan.
type rawManual struct {
	rawBitmap
}

func (r *rawManual) harvest() (rawResult, error) {
	t0 := time.Now()
	for i, s := range r.slots {
		if err := r.vm.GetDirtyLog(s.ID, r.bms[i]); err != nil {
			return rawResult{}, err
		}
	}
	t1 := time.Now()
	for i, s := range r.slots {
		if err := r.vm.ClearDirtyLog(s.ID, 0, uint32(s.Size/4096), r.bms[i]); err != nil {
			return rawResult{}, err
		}
	}
	return rawResult{fetch: t1.Sub(t0), protect: time.Since(t1)}, nil
}

// rawRing reads a vCPU's dirty ring directly and recycles the entries with
// KVM_RESET_DIRTY_RINGS. It owns the ring mapping, so it runs on a machine of
// its own, with no tracker: kvm.VCPU.MapDirtyRing refuses a second mapping of
// a ring, and two consumers of one ring would disagree on the fetch index
// anyway (each keeps its own, and a reset entry reads as empty). Each
// entry's page is recorded in a per-slot bitmap, the least a harvest must do
// with it; ring-full exits empty the ring into the same bitmaps.
type rawRing struct {
	mu       sync.Mutex
	vm       *kvm.VM
	rings    [][]kvm.DirtyGFN
	fetch    []uint64
	bms      [][]uint64 // by slot id (0 and 1 in testvm)
	pages    []uint64   // pages per slot, by slot id
	fulls    int
	entryErr error
}

func (r *rawRing) collect() {
	for v, ring := range r.rings {
		size := uint64(len(ring))
		for {
			e := &ring[r.fetch[v]%size]
			if kvm.LoadDirtyGFNFlags(e)&kvm.KVM_DIRTY_GFN_F_DIRTY == 0 {
				break
			}
			id := e.Slot & 0xffff
			if e.Slot>>16 != 0 || int(id) >= len(r.bms) || e.Offset >= r.pages[id] {
				if r.entryErr == nil {
					r.entryErr = fmt.Errorf("ring entry slot %#x offset %d out of range", e.Slot, e.Offset)
				}
			} else {
				r.bms[id][e.Offset/64] |= 1 << (e.Offset % 64)
			}
			kvm.StoreDirtyGFNFlags(e, kvm.KVM_DIRTY_GFN_F_RESET)
			r.fetch[v]++
		}
	}
}

// full is the machine's DirtyRingFull handler.
func (r *rawRing) full(int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fulls++
	r.collect()
	_, err := r.vm.ResetDirtyRings()
	return err
}

func (r *rawRing) harvest() (rawResult, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t0 := time.Now()
	r.collect()
	t1 := time.Now()
	_, err := r.vm.ResetDirtyRings()
	t2 := time.Now()
	if err == nil {
		err = r.entryErr
	}
	return rawResult{fetch: t1.Sub(t0), protect: t2.Sub(t1)}, err
}

func (r *rawRing) bitmaps() [][]uint64 { return r.bms }

func (r *rawRing) fullExits() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fulls
}

// bootRawRing boots a machine with a dirty ring and logging on from the start,
// whose ring is read by a rawRing instead of a tracker.
func bootRawRing(b *testing.B, cfg testvm.Config) (*testvm.Machine, *rawRing) {
	r := &rawRing{}
	cfg.DirtyLog = true
	cfg.DirtyRingFull = r.full
	m := vmtest.Boot(b, cfg, func(m *testvm.Machine) {
		r.vm = m.VM()
		for _, s := range m.Slots() {
			for int(s.ID) >= len(r.bms) {
				r.bms = append(r.bms, nil)
				r.pages = append(r.pages, 0)
			}
			r.pages[s.ID] = s.Size / 4096
			r.bms[s.ID] = make([]uint64, (s.Size/4096+63)/64)
		}
		for i := 0; i < m.NumVCPUs(); i++ {
			ring, err := m.VCPU(i).MapDirtyRing(int(cfg.DirtyRingEntries))
			if err != nil {
				b.Fatal(err)
			}
			r.rings = append(r.rings, ring)
		}
		r.fetch = make([]uint64, len(r.rings))
	})
	return m, r
}

// bootTracked boots a machine whose dirty log a started tracker of mechanism
// mech harvests.
func bootTracked(b *testing.B, cfg testvm.Config, mech dirtylog.Mechanism) (*testvm.Machine, *dirtylog.Tracker) {
	var tr *dirtylog.Tracker
	m := vmtest.Boot(b, cfg, func(m *testvm.Machine) {
		var err error
		if tr, err = m.DirtyTracker(mech, false); err != nil {
			b.Fatal(err)
		}
		if tr.Mechanism() != mech {
			b.Fatalf("tracker uses %s, want %s", tr.Mechanism(), mech)
		}
		if err := tr.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { tr.Stop() }) // runs before the machine's Close
	})
	return m, tr
}

var harvestSizes = []struct {
	name  string
	bytes uint64
}{{"1GiB", 1 << 30}, {"4GiB", 4 << 30}}

var harvestDirty = []struct {
	name  string
	pages uint64
}{{"0", 0}, {"1k", 1000}, {"10k", 10000}, {"100k", 100000}}

// ringEntries is the largest dirty ring KVM allows (1 MiB per vCPU). A
// 100k-page phase overflows it: the vCPU exits with KVM_EXIT_DIRTY_RING_FULL
// (at 65536-64 entries) and the handler empties the ring, outside the timing.
const ringEntries = 65536

// BenchmarkHarvest is Tracker.Harvest of a 1 vCPU guest (Dirty workload, Seq
// pattern, WorkingSet = PhaseOps = N), against the raw KVM sequence measured in
// the same benchmark. Every op does both, in alternating order: a guest phase
// that writes exactly N distinct pages, then a tracker harvest (into a cleared
// set); another phase, then the raw harvest. The machine is paused (untimed)
// for each harvest, as an epoch checkpoint does. Only the harvests are timed:
//
//   - pause-µs/op: Tracker.Harvest, the mean over the ops;
//   - raw-µs/op: the raw sequence: bitmap, KVM_GET_DIRTY_LOG per slot; manual,
//     GET per slot then one KVM_CLEAR_DIRTY_LOG per slot of the fetched bitmap;
//     ring, read the published ring entries into per-slot bitmaps, mark them
//     reset, KVM_RESET_DIRTY_RINGS;
//   - ratio-vs-raw: pause-µs/op / raw-µs/op (the goal is at most 1.3);
//   - pause-p50-µs, raw-p50-µs, ratio-p50: the same from the per-op medians;
//   - fetch-µs, protect-µs: the tracker's own Stats split; raw-fetch-µs and
//     raw-protect-µs the raw sequence's (bitmap fetches and protects at once);
//   - ring-full-exits, raw-ring-full-exits: KVM_EXIT_DIRTY_RING_FULL exits per
//     phase, emptied by the run loop outside the timing.
//
// Bitmap and manual run both harvests on one machine (the raw ioctls consume
// the same KVM log the tracker does). The ring's raw harvest runs on a second,
// identical machine, because the tracker owns the first one's ring mapping.
// Every harvest must return N to N+3 pages (N plus the guest's status and
// stack pages and the params page that Machine.Go writes); N = 0 runs no
// phase at all.
func BenchmarkHarvest(b *testing.B) {
	for _, mech := range []dirtylog.Mechanism{dirtylog.Bitmap, dirtylog.Manual, dirtylog.Ring} {
		for _, mem := range harvestSizes {
			for _, d := range harvestDirty {
				b.Run(fmt.Sprintf("mech=%s/mem=%s/dirty=%s", mech, mem.name, d.name), func(b *testing.B) {
					benchHarvest(b, mech, mem.bytes, d.pages)
				})
			}
		}
	}
}

func benchHarvest(b *testing.B, mech dirtylog.Mechanism, mem, n uint64) {
	cfg := testvm.Config{MemSize: mem, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq,
		WorkingSet: n, PhaseOps: n}
	if n == 0 {
		// The guest waits for phase 1, which never comes: it writes nothing.
		cfg.WorkingSet, cfg.PhaseOps = 1, 1
	}
	if mech == dirtylog.Ring {
		cfg.DirtyRingEntries = ringEntries
	}
	ctx := vmtest.Context(b)
	m, tr := bootTracked(b, cfg, mech)
	trPh := &phaser{b: b, m: m, n: n, ctx: ctx}
	rawPh := trPh
	var raw rawHarvester
	var ring *rawRing
	switch mech {
	case dirtylog.Bitmap:
		raw = &rawBitmap{vm: m.VM(), slots: m.Slots(), bms: slotBitmaps(m)}
	case dirtylog.Manual:
		raw = &rawManual{rawBitmap{vm: m.VM(), slots: m.Slots(), bms: slotBitmaps(m)}}
	case dirtylog.Ring:
		var m2 *testvm.Machine
		m2, ring = bootRawRing(b, cfg)
		raw = ring
		rawPh = &phaser{b: b, m: m2, n: n, ctx: ctx}
	}
	set := tr.NewSet()

	// Warm up: the first phase touches fresh memory; then start clean.
	trPh.next()
	if _, err := tr.Harvest(set); err != nil {
		b.Fatal(err)
	}
	if rawPh != trPh {
		rawPh.next()
	}
	if _, err := raw.harvest(); err != nil {
		b.Fatal(err)
	}
	for _, bm := range raw.bitmaps() {
		clear(bm)
	}

	var (
		trTotal, trFetch, trProtect time.Duration
		rawTotal, rawFetch, rawProt time.Duration
		trPages                     int
		ops                         int
		trEach, rawEach             []time.Duration
		fulls0                      uint64
		rawFulls0                   int
	)
	doTracker := func() {
		trPh.next()
		set.Clear()
		t0 := time.Now()
		st, err := tr.Harvest(set)
		d := time.Since(t0)
		if err != nil {
			b.Fatal(err)
		}
		if st.Pages < int(n) || st.Pages > int(n)+3 {
			b.Fatalf("tracker harvest after phase %d: %d pages, want %d (+ up to 3 bookkeeping pages)", trPh.phase, st.Pages, n)
		}
		trTotal += d
		trEach = append(trEach, d)
		trFetch += st.Fetch
		trProtect += st.Protect
		trPages += st.Pages
	}
	doRaw := func() {
		rawPh.next()
		t0 := time.Now()
		r, err := raw.harvest()
		d := time.Since(t0)
		if err != nil {
			b.Fatal(err)
		}
		got := countBits(raw.bitmaps())
		if got < int(n) || got > int(n)+3 {
			b.Fatalf("raw harvest after phase %d: %d pages, want %d (+ up to 3 bookkeeping pages)", rawPh.phase, got, n)
		}
		for _, bm := range raw.bitmaps() {
			clear(bm)
		}
		rawTotal += d
		rawEach = append(rawEach, d)
		rawFetch += r.fetch
		rawProt += r.protect
	}
	// One untimed round of each, so the timed ops start warm: the rings,
	// bitmaps and sets have been touched and the guest's pages mapped.
	doTracker()
	doRaw()
	trTotal, trFetch, trProtect, rawTotal, rawFetch, rawProt, trPages = 0, 0, 0, 0, 0, 0, 0
	trEach, rawEach = trEach[:0], rawEach[:0]
	fulls0 = tr.RingFullExits()
	if ring != nil {
		rawFulls0 = ring.fullExits()
	}
	for b.Loop() {
		if ops%2 == 0 {
			doTracker()
			doRaw()
		} else {
			doRaw()
			doTracker()
		}
		ops++
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 / float64(ops) }
	b.ReportMetric(us(trTotal), "pause-µs/op")
	b.ReportMetric(us(rawTotal), "raw-µs/op")
	b.ReportMetric(float64(trTotal)/float64(rawTotal), "ratio-vs-raw")
	// Medians too: one multi-millisecond stall inside an ioctl (seen on this
	// shared machine, in the raw and the tracker's ioctls alike) moves a mean
	// of a few ops by tens of percent.
	trMed, rawMed := median(trEach), median(rawEach)
	b.ReportMetric(float64(trMed.Nanoseconds())/1e3, "pause-p50-µs")
	b.ReportMetric(float64(rawMed.Nanoseconds())/1e3, "raw-p50-µs")
	b.ReportMetric(float64(trMed)/float64(rawMed), "ratio-p50")
	b.ReportMetric(float64(trPages)/float64(ops), "pages")
	b.ReportMetric(us(trFetch), "fetch-µs")
	if mech != dirtylog.Bitmap {
		b.ReportMetric(us(trProtect), "protect-µs")
		b.ReportMetric(us(rawFetch), "raw-fetch-µs")
		b.ReportMetric(us(rawProt), "raw-protect-µs")
	}
	if mech == dirtylog.Ring {
		b.ReportMetric(float64(tr.RingFullExits()-fulls0)/float64(ops), "ring-full-exits")
		b.ReportMetric(float64(ring.fullExits()-rawFulls0)/float64(ops), "raw-ring-full-exits")
	}
}

// Set iteration over 4 GiB (one slot of 2^20 pages, 16384 bitmap words) at
// several densities, laid out at random or as one contiguous run from the
// start of the slot.

const setPages = 1 << 20

var setDensities = []struct {
	name string
	frac float64
}{{"0.1%", 0.001}, {"1%", 0.01}, {"10%", 0.1}, {"100%", 1}}

// benchSet returns a 4 GiB set with k = frac*2^20 pages set.
func benchSet(b *testing.B, random bool, frac float64) (*dirtylog.Set, uint64) {
	s := dirtylog.NewSet([]dirtylog.Slot{{ID: 0, GPA: 0, Size: setPages * dirtylog.PageSize}})
	k := uint64(frac * setPages)
	if !random || k == setPages {
		if err := s.AddRange(0, k*dirtylog.PageSize); err != nil {
			b.Fatal(err)
		}
		return s, k
	}
	r := rand.New(rand.NewPCG(1, 2))
	for n := uint64(0); n < k; {
		gpa := r.Uint64N(setPages) * dirtylog.PageSize
		if !s.Has(gpa) {
			s.Add(gpa)
			n++
		}
	}
	return s, k
}

func benchSetWalk(b *testing.B, walk func(s *dirtylog.Set) int) {
	for _, layout := range []string{"random", "contig"} {
		for _, d := range setDensities {
			b.Run(fmt.Sprintf("mem=4GiB/layout=%s/density=%s", layout, d.name), func(b *testing.B) {
				s, k := benchSet(b, layout == "random", d.frac)
				if got := s.Count(); got != int(k) {
					b.Fatalf("set has %d pages, want %d", got, k)
				}
				runs := walk(s)
				ops := 0
				for b.Loop() {
					runs = walk(s)
					ops++
				}
				ns := float64(b.Elapsed().Nanoseconds()) / float64(ops)
				b.ReportMetric(ns/float64(k), "ns/page")
				b.ReportMetric(ns/float64(setPages/64), "ns/word")
				b.ReportMetric(float64(k), "set-pages")
				b.ReportMetric(float64(runs), "runs")
			})
		}
	}
}

// BenchmarkSetForEachRun is Set.ForEachRun with a callback that only sums the
// run lengths. ns/page is per set page, ns/word per bitmap word of the set.
func BenchmarkSetForEachRun(b *testing.B) {
	benchSetWalk(b, func(s *dirtylog.Set) int {
		runs := 0
		var total uint64
		s.ForEachRun(func(gpa, pages uint64) bool {
			runs++
			total += pages
			return true
		})
		if total == 0 && runs != 0 {
			panic("empty runs")
		}
		return runs
	})
}

// BenchmarkSetRanges is Set.Ranges into a reused slice: the wire form.
func BenchmarkSetRanges(b *testing.B) {
	var dst []dirtylog.Range
	benchSetWalk(b, func(s *dirtylog.Set) int {
		dst = s.Ranges(dst[:0])
		return len(dst)
	})
}

// BenchmarkSetWholeWalk is the Set operations that walk every word of a set
// whatever it holds, on an empty set of 1 GiB and 4 GiB (two slots, as testvm
// lays memory out): Count, Union with another empty set, and Clear. A harvest
// calls Count twice, and the ring mechanism also a Union and a Clear of its
// pending set, so these are a harvest's fixed Go-side cost.
func BenchmarkSetWholeWalk(b *testing.B) {
	for _, mem := range harvestSizes {
		slots := []dirtylog.Slot{{ID: 0, GPA: 0, Size: mem.bytes / 2}, {ID: 1, GPA: 4 << 30, Size: mem.bytes / 2}}
		a, o := dirtylog.NewSet(slots), dirtylog.NewSet(slots)
		words := float64(mem.bytes / dirtylog.PageSize / 64)
		for _, op := range []struct {
			name string
			f    func()
		}{
			{"count", func() {
				if a.Count() != 0 {
					b.Fatal("empty set counts pages")
				}
			}},
			{"union", func() {
				if err := a.Union(o); err != nil {
					b.Fatal(err)
				}
			}},
			{"clear", a.Clear},
		} {
			b.Run(fmt.Sprintf("op=%s/mem=%s", op.name, mem.name), func(b *testing.B) {
				ops := 0
				for b.Loop() {
					op.f()
					ops++
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(ops)/words, "ns/word")
			})
		}
	}
}
