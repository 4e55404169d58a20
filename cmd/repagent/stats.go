package main

import (
	"fmt"
	"math"
	"math/bits"
	"time"

	"github.com/repagent/repagent/replicate"
)

// histSubBits sets a histogram's precision: each power of two is split into
// 2^(histSubBits-1) buckets, so a bucket is at most 1/64 of its lower bound
// wide and a percentile read from its middle is within 1/128 of the truth.
const histSubBits = 7

// histBuckets covers every uint64: values below 2^histSubBits exactly, then
// 64 buckets per power of two up to 2^64.
const histBuckets = (64-histSubBits+1)*(1<<(histSubBits-1)) + 1<<(histSubBits-1)

// hist is a log-linear histogram of durations (in nanoseconds): fixed size,
// whatever the number of samples, so a run of any length keeps its
// percentiles without keeping every sample. Min, max, sum and count are exact.
type hist struct {
	counts   [histBuckets]uint64
	n        uint64
	sum      float64
	min, max uint64
}

// bucketOf is the bucket holding v.
func bucketOf(v uint64) int {
	if v < 1<<histSubBits {
		return int(v)
	}
	e := bits.Len64(v) - histSubBits // v>>e is in [64, 128)
	return e<<(histSubBits-1) + int(v>>e)
}

// bucketRange is the values bucket i holds: [lo, lo+width).
func bucketRange(i int) (lo, width uint64) {
	const half = 1 << (histSubBits - 1)
	if i < 1<<histSubBits {
		return uint64(i), 1
	}
	e := i/half - 1
	m := uint64(i - e*half)
	return m << e, 1 << e
}

func (h *hist) add(d time.Duration) {
	v := uint64(max(d, 0))
	if h.n == 0 || v < h.min {
		h.min = v
	}
	h.max = max(h.max, v)
	h.n++
	h.sum += float64(v)
	h.counts[bucketOf(v)]++
}

// quantile returns the nearest-rank q-quantile (0 < q <= 1): the value of the
// ceil(q*n)-th smallest sample, to within 1/128, clamped to [min, max]; the
// smallest and largest exactly. It is 0 with no samples.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = min(max(rank, 1), h.n)
	switch rank {
	case 1:
		return time.Duration(h.min)
	case h.n:
		return time.Duration(h.max)
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			lo, w := bucketRange(i)
			v := lo + w/2
			return time.Duration(min(max(v, h.min), h.max))
		}
	}
	return time.Duration(h.max)
}

func (h *hist) mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / float64(h.n))
}

func (h *hist) reset() { *h = hist{} }

// epochAgg aggregates the stats of acknowledged epochs: over one status line's
// second, or over the whole run for the summary. It is not safe for
// concurrent use.
type epochAgg struct {
	epochs   uint64
	pause    hist
	ack      hist
	parts    [nParts]time.Duration // sums of the pause's parts
	wait     time.Duration         // back-pressure wait, summed
	dirty    uint64
	zero     uint64
	raw      uint64
	wire     uint64
	oversize uint64
	audited  uint64
	first    uint64 // first epoch seen
	last     *replicate.EpochStats
	transfer hist // from the pause's end to the end record's write
	period   hist // from the previous epoch's pause to this one's
	// The engine's CPU time on the epochs, primary side and backup side
	// (EpochStats.CPU, BackupCPU); with dirty, the cost per page.
	cpu, backupCPU time.Duration
	// prevStart is the last epoch's pause start; reset keeps it, so the
	// period of a second's first epoch is known.
	prevStart time.Time

	// The disk: write records mirrored (in epoch 1, the sync's residual
	// blocks), their data, their messages on the wire.
	diskWrites, diskBytes, diskWire uint64
}

// The parts of a pause, in EpochStats order.
const (
	partKick = iota
	partHarvest
	partSave
	partStall
	partCopy
	partGates
	partResume
	partAudit
	nParts
)

var partNames = [nParts]string{"kick", "harvest", "save", "stall", "copy", "gates", "resume", "audit"}

func (a *epochAgg) add(s *replicate.EpochStats) {
	if a.epochs == 0 {
		a.first = s.Epoch
	}
	a.epochs++
	a.pause.add(s.Pause)
	a.ack.add(s.AckLatency)
	a.transfer.add(s.Transfer)
	if !a.prevStart.IsZero() && s.Start.After(a.prevStart) {
		a.period.add(s.Start.Sub(a.prevStart))
	}
	a.prevStart = s.Start
	a.cpu += s.CPU
	a.backupCPU += s.BackupCPU
	for i, d := range [nParts]time.Duration{s.Kick, s.Harvest, s.Save, s.Stall, s.Copy, s.Gates, s.Resume, s.Audit} {
		a.parts[i] += d
	}
	a.wait += s.Wait
	a.dirty += uint64(s.DirtyPages)
	a.zero += uint64(s.ZeroPages)
	a.raw += s.RawBytes
	a.wire += s.WireBytes
	if s.Oversize {
		a.oversize++
	}
	if s.Audited {
		a.audited++
	}
	a.diskWrites += uint64(s.StreamRecords)
	a.diskBytes += s.StreamBytes
	a.diskWire += s.StreamWireBytes
	a.last = s
}

func (a *epochAgg) reset() { *a = epochAgg{prevStart: a.prevStart} }

// cpuPerPage is the engine's mean CPU time per dirty page, primary and
// backup side; 0, 0 without pages.
func (a *epochAgg) cpuPerPage() (primary, backup time.Duration) {
	if a.dirty == 0 {
		return 0, 0
	}
	return a.cpu / time.Duration(a.dirty), a.backupCPU / time.Duration(a.dirty)
}

// meanPart is the mean of pause part i per epoch.
func (a *epochAgg) meanPart(i int) time.Duration {
	if a.epochs == 0 {
		return 0
	}
	return a.parts[i] / time.Duration(a.epochs)
}

// meanDirty is the mean number of dirty pages per epoch.
func (a *epochAgg) meanDirty() float64 {
	if a.epochs == 0 {
		return 0
	}
	return float64(a.dirty) / float64(a.epochs)
}

// ratio is the compression ratio of memory, wire bytes over raw bytes (1
// with no raw bytes). The disk's messages are left out: they are part of the
// wire bytes, not of the raw pages.
func (a *epochAgg) ratio() float64 {
	if a.raw == 0 {
		return 1
	}
	return float64(a.wire-a.diskWire) / float64(a.raw)
}

// dur formats a duration for a status line or summary with three significant
// digits in the unit that suits it: 812ns, 81.2µs, 1.32ms, 2.50s, 1234s.
func dur(d time.Duration) string {
	x := float64(d)
	unit := "ns"
	for _, u := range []string{"µs", "ms", "s"} {
		if x < 999.5 {
			break
		}
		x, unit = x/1000, u
	}
	switch {
	case unit == "ns" || x >= 99.95:
		return fmt.Sprintf("%.0f%s", x, unit)
	case x < 9.995:
		return fmt.Sprintf("%.2f%s", x, unit)
	}
	return fmt.Sprintf("%.1f%s", x, unit)
}

// bytesSI formats a byte count with a decimal prefix: 812B, 4.10MB, 1.07GB.
func bytesSI(x float64) string { return si(x) + "B" }
