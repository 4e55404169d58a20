package main

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
			var h hist
			samples := make([]time.Duration, d.n)
			for i := range samples {
				samples[i] = d.gen()
				h.add(samples[i])
			}
			for _, q := range []float64{0.001, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1} {
				want := naiveQuantile(samples, q)
				got := h.quantile(q)
				if !near(got, want) {
					t.Errorf("q=%g: %v, want %v ± 1/128", q, got, want)
				}
			}
			if h.quantile(1) != slices.Max(samples) || h.quantile(1e-9) != slices.Min(samples) || time.Duration(h.max) != slices.Max(samples) {
				t.Errorf("max: q=1 gives %v, max %v; want %v", h.quantile(1), time.Duration(h.max), slices.Max(samples))
			}
			var sum float64
			for _, s := range samples {
				sum += float64(s)
			}
			if want := sum / float64(len(samples)); math.Abs(float64(h.mean())-want) > want*1e-9+1 {
				t.Errorf("mean %v, want %v", h.mean(), time.Duration(want))
			}
		})
	}
	var empty hist
	if empty.quantile(0.5) != 0 || empty.mean() != 0 {
		t.Errorf("empty histogram: p50 %v mean %v", empty.quantile(0.5), empty.mean())
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
	for i := 0; i < histBuckets; i++ {
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
	var a epochAgg
	if a.meanDirty() != 0 || a.ratio() != 1 || a.meanPart(partKick) != 0 {
		t.Errorf("empty: dirty %v ratio %v kick %v", a.meanDirty(), a.ratio(), a.meanPart(partKick))
	}
	for i := 1; i <= 4; i++ {
		d := time.Duration(i) * time.Millisecond
		a.add(&replicate.EpochStats{Epoch: uint64(10 + i), Pause: d, Kick: d / 10, Harvest: d / 5, Copy: d / 2, Resume: time.Microsecond,
			Wait: time.Millisecond, DirtyPages: 100 * i, ZeroPages: i, RawBytes: uint64(100*i) * 4096, WireBytes: uint64(50*i) * 4096,
			AckLatency: 2 * d, Oversize: i == 4, Audited: i%2 == 0})
	}
	if a.epochs != 4 || a.first != 11 || a.last.Epoch != 14 || a.oversize != 1 || a.audited != 2 {
		t.Errorf("counts: %+v", a)
	}
	if a.meanDirty() != 250 || a.ratio() != 0.5 || a.zero != 10 || a.wait != 4*time.Millisecond {
		t.Errorf("dirty %v ratio %v zero %d wait %v", a.meanDirty(), a.ratio(), a.zero, a.wait)
	}
	if a.meanPart(partKick) != 250*time.Microsecond || a.meanPart(partCopy) != 1250*time.Microsecond ||
		a.meanPart(partResume) != time.Microsecond || a.meanPart(partSave) != 0 {
		t.Errorf("parts: %v", a.parts)
	}
	if !near(a.pause.quantile(0.5), 2*time.Millisecond) || time.Duration(a.pause.max) != 4*time.Millisecond ||
		a.ack.quantile(1) != 8*time.Millisecond {
		t.Errorf("pause p50 %v max %v, ack max %v", a.pause.quantile(0.5), time.Duration(a.pause.max), a.ack.quantile(1))
	}
	// The disk's messages are wire bytes, not compressed pages.
	a.add(&replicate.EpochStats{Epoch: 15, RawBytes: 1000 * 4096, WireBytes: 500*4096 + 3000, StreamRecords: 3, StreamBytes: 2900, StreamWireBytes: 3000})
	if a.diskWrites != 3 || a.diskBytes != 2900 || a.diskWire != 3000 || a.ratio() != 0.5 {
		t.Errorf("disk: writes %d bytes %d wire %d, ratio %v", a.diskWrites, a.diskBytes, a.diskWire, a.ratio())
	}
	a.reset()
	if a.epochs != 0 || a.last != nil || a.pause.n != 0 {
		t.Errorf("after reset: %+v", a)
	}
}

func TestDur(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0ns"}, {812, "812ns"}, {999, "999ns"}, {1000, "1.00µs"}, {81200, "81.2µs"}, {999400, "999µs"},
		{999600, "1.00ms"}, {1320 * time.Microsecond, "1.32ms"}, {115 * time.Millisecond, "115ms"},
		{2500 * time.Millisecond, "2.50s"}, {1234 * time.Second, "1234s"},
	} {
		if got := dur(tc.d); got != tc.want {
			t.Errorf("dur(%d) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestStatusLineString(t *testing.T) {
	for _, tc := range []struct {
		s    statusLine
		want string
	}{
		{statusLine{elapsed: 3 * time.Second, epochs: 10, n: 10, p50: 1230 * time.Microsecond, p99: 2340 * time.Microsecond,
			dirty: 5120, wireRate: 23.4e6, ratio: 0.4123, lag: 1, ack: 1200 * time.Microsecond, guest: 2.31e6, op: "writes",
			xfer: 3400 * time.Microsecond, period: 100 * time.Millisecond, cpu: 2100 * time.Nanosecond, backupCPU: 1050 * time.Nanosecond},
			"   3.0s  10.0 epochs/s  pause p50 1.23ms p99 2.34ms  dirty 5.12k/epoch  wire 23.4MB/s  ratio 0.412  lag 1 ack 1.20ms  xfer 3.40ms  period 100ms  cpu/page 2.10µs+1.05µs  guest 2.31M writes/s"},
		{statusLine{elapsed: 12 * time.Second, ack: 3 * time.Millisecond, guest: 580, op: "ticks", unprotected: true},
			"  12.0s  0.0 epochs/s  pause p50 - p99 -  dirty -/epoch  wire 0B/s  ratio -  lag 0 ack 3.00ms  xfer -  period -  cpu/page -  guest 580 ticks/s  UNPROTECTED"},
		{statusLine{elapsed: 2 * time.Second, epochs: 20, n: 20, p50: time.Millisecond, p99: time.Millisecond, dirty: 120, wireRate: 51e6,
			ratio: 0.1, ack: 2 * time.Millisecond, guest: 12300, op: "block writes", disk: &diskLine{writes: 12300, bytes: 50.4e6},
			net: &netLine{held: 10, released: 10, holdP50: time.Millisecond, holdP99: 2 * time.Millisecond}, unprotected: true},
			"   2.0s  20.0 epochs/s  pause p50 1.00ms p99 1.00ms  dirty 120/epoch  wire 51.0MB/s  ratio 0.100  lag 0 ack 2.00ms  xfer 0ns  period -  cpu/page 0ns+0ns  guest 12.3k block writes/s" +
				"  disk 12.3k writes/s 50.4MB/s  net held 10/s rel 10/s hold p50 1.00ms p99 2.00ms  UNPROTECTED"},
	} {
		if got := tc.s.String(); got != tc.want {
			t.Errorf("got  %q\nwant %q", got, tc.want)
		}
	}
}
