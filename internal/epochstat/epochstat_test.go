package epochstat

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
)

// naiveQuantile is the nearest-rank q-quantile of samples by sorting them:
// the ceil(q*n)-th smallest.
func naiveQuantile(samples []time.Duration, q float64) time.Duration {
	s := slices.Clone(samples)
	slices.Sort(s)
	rank := int(math.Ceil(q * float64(len(s))))
	rank = min(max(rank, 1), len(s))
	return s[rank-1]
}

// TestHistQuantiles cross-checks the histogram's percentiles against a naive
// sort: within 1/128 of the true value (the bucket's half width), and exact
// below 128ns.
func TestHistQuantiles(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	dists := []struct {
		name string
		n    int
		gen  func() time.Duration
	}{
		{"one", 1, func() time.Duration { return 1234567 }},
		{"constant", 100, func() time.Duration { return 3 * time.Millisecond }},
		{"small exact", 1000, func() time.Duration { return time.Duration(rng.IntN(128)) }},
		{"uniform 0-10ms", 5000, func() time.Duration { return time.Duration(rng.Int64N(int64(10 * time.Millisecond))) }},
		{"exponential 1ms", 10000, func() time.Duration { return time.Duration(rng.ExpFloat64() * 1e6) }},
		{"log-uniform 1ns-100s", 10000, func() time.Duration { return time.Duration(math.Exp(rng.Float64() * math.Log(1e11))) }},
		{"bimodal", 999, func() time.Duration {
			if rng.IntN(100) < 3 {
				return 500*time.Millisecond + time.Duration(rng.IntN(1e6))
			}
			return 200*time.Microsecond + time.Duration(rng.IntN(1e5))
		}},
		{"huge", 10, func() time.Duration { return time.Duration(math.MaxInt64 - rng.Int64N(1e15)) }},
	}
	for _, d := range dists {
		t.Run(d.name, func(t *testing.T) {
			var h Hist
			samples := make([]time.Duration, d.n)
			for i := range samples {
				samples[i] = d.gen()
				h.Add(samples[i])
			}
			for _, q := range []float64{0.001, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1} {
				want := naiveQuantile(samples, q)
				got := h.Quantile(q)
				if !near(got, want) {
					t.Errorf("q=%g: %v, want %v ± 1/128", q, got, want)
				}
			}
			if h.Quantile(1) != slices.Max(samples) || h.Quantile(1e-9) != slices.Min(samples) || time.Duration(h.max) != slices.Max(samples) {
				t.Errorf("max: q=1 gives %v, max %v; want %v", h.Quantile(1), time.Duration(h.max), slices.Max(samples))
			}
			var sum float64
			for _, s := range samples {
				sum += float64(s)
			}
			if want := sum / float64(len(samples)); math.Abs(float64(h.Mean())-want) > want*1e-9+1 {
				t.Errorf("mean %v, want %v", h.Mean(), time.Duration(want))
			}
		})
	}
	var empty Hist
	if empty.Quantile(0.5) != 0 || empty.Mean() != 0 {
		t.Errorf("empty histogram: p50 %v mean %v", empty.Quantile(0.5), empty.Mean())
	}
}

// near reports whether got is within 1/128 of want.
func near(got, want time.Duration) bool {
	return math.Abs(float64(got)-float64(want)) <= float64(want)/128
}

// TestBuckets checks that buckets tile the uint64 range in order, each at
// most 1/64 of its lower bound wide.
func TestBuckets(t *testing.T) {
	prevEnd := uint64(0)
	for i := 0; i < nBuckets; i++ {
		lo, w := bucketRange(i)
		if lo != prevEnd {
			t.Fatalf("bucket %d starts at %d, the previous one ended at %d", i, lo, prevEnd)
		}
		if lo >= 128 && w > lo/64 {
			t.Fatalf("bucket %d: [%d, +%d) is wider than 1/64", i, lo, w)
		}
		for _, v := range []uint64{lo, lo + w/2, lo + w - 1} {
			if got := bucketOf(v); got != i {
				t.Fatalf("bucketOf(%d) = %d, want %d", v, got, i)
			}
		}
		prevEnd = lo + w
	}
	if prevEnd != 0 { // wrapped around: the last bucket ends at 2^64
		t.Errorf("buckets end at %d, not 2^64", prevEnd)
	}
}

func TestEpochAgg(t *testing.T) {
	var a Agg
	if a.MeanDirty() != 0 || a.Ratio() != 1 || a.MeanPart(PartKick) != 0 {
		t.Errorf("empty: dirty %v ratio %v kick %v", a.MeanDirty(), a.Ratio(), a.MeanPart(PartKick))
	}
	for i := 1; i <= 4; i++ {
		d := time.Duration(i) * time.Millisecond
		a.Add(&replicate.EpochStats{Epoch: uint64(10 + i), Pause: d, Kick: d / 10, Harvest: d / 5, Copy: d / 2, Resume: time.Microsecond,
			Wait: time.Millisecond, DirtyPages: 100 * i, ZeroPages: i, RawBytes: uint64(100*i) * 4096, WireBytes: uint64(50*i) * 4096,
			AckLatency: 2 * d, Oversize: i == 4, Audited: i%2 == 0})
	}
	if a.Epochs != 4 || a.First != 11 || a.Last.Epoch != 14 || a.Oversize != 1 || a.Audited != 2 {
		t.Errorf("counts: %+v", a)
	}
	if a.MeanDirty() != 250 || a.Ratio() != 0.5 || a.Zero != 10 || a.Wait != 4*time.Millisecond {
		t.Errorf("dirty %v ratio %v zero %d wait %v", a.MeanDirty(), a.Ratio(), a.Zero, a.Wait)
	}
	if a.MeanPart(PartKick) != 250*time.Microsecond || a.MeanPart(PartCopy) != 1250*time.Microsecond ||
		a.MeanPart(PartResume) != time.Microsecond || a.MeanPart(PartSave) != 0 {
		t.Errorf("parts: %v", a.Parts)
	}
	if !near(a.Pause.Quantile(0.5), 2*time.Millisecond) || time.Duration(a.Pause.max) != 4*time.Millisecond ||
		a.Ack.Quantile(1) != 8*time.Millisecond {
		t.Errorf("pause p50 %v max %v, ack max %v", a.Pause.Quantile(0.5), time.Duration(a.Pause.max), a.Ack.Quantile(1))
	}
	// The disk's messages are wire bytes, not compressed pages.
	a.Add(&replicate.EpochStats{Epoch: 15, RawBytes: 1000 * 4096, WireBytes: 500*4096 + 3000, StreamRecords: 3, StreamBytes: 2900, StreamWireBytes: 3000})
	if a.DiskWrites != 3 || a.DiskBytes != 2900 || a.DiskWire != 3000 || a.Ratio() != 0.5 {
		t.Errorf("disk: writes %d bytes %d wire %d, ratio %v", a.DiskWrites, a.DiskBytes, a.DiskWire, a.Ratio())
	}
	a.Reset()
	if a.Epochs != 0 || a.Last != nil || a.Pause.n != 0 {
		t.Errorf("after reset: %+v", a)
	}
}
