package epochstat

import (
	"math"
	"math/bits"
	"time"

	"github.com/repagent/repagent/replicate"
)

// subBits sets a histogram's precision: each power of two is split into
// 2^(subBits-1) buckets, so a bucket is at most 1/64 of its lower bound
// wide and a percentile read from its middle is within 1/128 of the truth.
const subBits = 7

// nBuckets covers every uint64: values below 2^subBits exactly, then
// 64 buckets per power of two up to 2^64.
const nBuckets = (64-subBits+1)*(1<<(subBits-1)) + 1<<(subBits-1)

// Hist is a log-linear histogram of durations (in nanoseconds): fixed size,
// whatever the number of samples, so a run of any length keeps its
// percentiles without keeping every sample. Min, max, sum and count are exact.
type Hist struct {
	counts   [nBuckets]uint64
	n        uint64
	sum      float64
	min, max uint64
}

// bucketOf is the bucket holding v.
func bucketOf(v uint64) int {
	if v < 1<<subBits {
		return int(v)
	}
	e := bits.Len64(v) - subBits // v>>e is in [64, 128)
	return e<<(subBits-1) + int(v>>e)
}

// bucketRange is the values bucket i holds: [lo, lo+width).
func bucketRange(i int) (lo, width uint64) {
	const half = 1 << (subBits - 1)
	if i < 1<<subBits {
		return uint64(i), 1
	}
	e := i/half - 1
	m := uint64(i - e*half)
	return m << e, 1 << e
}

// Add records one sample; a negative one counts as 0.
func (h *Hist) Add(d time.Duration) {
	v := uint64(max(d, 0))
	if h.n == 0 || v < h.min {
		h.min = v
	}
	h.max = max(h.max, v)
	h.n++
	h.sum += float64(v)
	h.counts[bucketOf(v)]++
}

// Quantile returns the nearest-rank q-quantile (0 < q <= 1): the value of the
// ceil(q*n)-th smallest sample, to within 1/128, clamped to [min, max]; the
// smallest and largest exactly. It is 0 with no samples.
func (h *Hist) Quantile(q float64) time.Duration {
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

// Mean is the mean of the samples (0 with none).
func (h *Hist) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / float64(h.n))
}

// Reset forgets every sample.
func (h *Hist) Reset() { *h = Hist{} }

// Agg aggregates the stats of acknowledged epochs: over one status line's
// second, or over the whole run for the summary. It is not safe for
// concurrent use.
type Agg struct {
	Epochs   uint64
	Pause    Hist
	Ack      Hist
	Parts    [NParts]time.Duration // sums of the pause's parts
	Wait     time.Duration         // back-pressure wait, summed
	Dirty    uint64
	Zero     uint64
	Raw      uint64
	Wire     uint64
	Oversize uint64
	Audited  uint64
	First    uint64 // first epoch seen
	Last     *replicate.EpochStats
	Transfer Hist // from the pause's end to the end record's write
	Period   Hist // from the previous epoch's pause to this one's
	// The engine's CPU time on the epochs, primary side and backup side
	// (EpochStats.CPU, BackupCPU); with Dirty, the cost per page.
	CPU, BackupCPU time.Duration
	// prevStart is the last epoch's pause start; Reset keeps it, so the
	// period of a second's first epoch is known.
	prevStart time.Time

	// Lazy capture: the pages protected in the pause and copied behind the
	// guest, the guest's faults on them, the pages the VMM's own writes had
	// copied first, the protect time (part of the pauses), and how long the
	// copies behind the guest took.
	LazyPages, Faults, Guarded uint64
	Protect                    time.Duration
	Behind                     Hist
	// VCPUHost sums the vCPU threads' time outside guest mode
	// (EpochStats.VCPUHost) over the HostEpochs epochs that measured it.
	VCPUHost   time.Duration
	HostEpochs int

	// The disk: write records mirrored (in epoch 1, the sync's residual
	// blocks), their data, their messages on the wire.
	DiskWrites, DiskBytes, DiskWire uint64
}

// The parts of a pause, in EpochStats order.
const (
	PartKick = iota
	PartHarvest
	PartSave
	PartStall
	PartCopy
	PartGates
	PartResume
	PartAudit
	NParts
)

// PartNames names the parts of a pause, indexed by PartKick and the rest.
var PartNames = [NParts]string{"kick", "harvest", "save", "stall", "copy", "gates", "resume", "audit"}

// Add counts epoch s in.
func (a *Agg) Add(s *replicate.EpochStats) {
	if a.Epochs == 0 {
		a.First = s.Epoch
	}
	a.Epochs++
	a.Pause.Add(s.Pause)
	a.Ack.Add(s.AckLatency)
	a.Transfer.Add(s.Transfer)
	if !a.prevStart.IsZero() && s.Start.After(a.prevStart) {
		a.Period.Add(s.Start.Sub(a.prevStart))
	}
	a.prevStart = s.Start
	a.CPU += s.CPU
	a.BackupCPU += s.BackupCPU
	for i, d := range [NParts]time.Duration{s.Kick, s.Harvest, s.Save, s.Stall, s.Copy, s.Gates, s.Resume, s.Audit} {
		a.Parts[i] += d
	}
	a.Wait += s.Wait
	if s.VCPUHost != 0 {
		a.VCPUHost += s.VCPUHost
		a.HostEpochs++
	}
	if s.LazyPages > 0 {
		a.LazyPages += uint64(s.LazyPages)
		a.Faults += uint64(s.Faults)
		a.Guarded += uint64(s.GuardedPages)
		a.Protect += s.Protect
		a.Behind.Add(s.Behind)
	}
	a.Dirty += uint64(s.DirtyPages)
	a.Zero += uint64(s.ZeroPages)
	a.Raw += s.RawBytes
	a.Wire += s.WireBytes
	if s.Oversize {
		a.Oversize++
	}
	if s.Audited {
		a.Audited++
	}
	a.DiskWrites += uint64(s.StreamRecords)
	a.DiskBytes += s.StreamBytes
	a.DiskWire += s.StreamWireBytes
	a.Last = s
}

// Reset starts a new window; the last epoch's start is kept for Period.
func (a *Agg) Reset() { *a = Agg{prevStart: a.prevStart} }

// CPUPerPage is the engine's mean CPU time per dirty page, primary and
// backup side; 0, 0 without pages.
func (a *Agg) CPUPerPage() (primary, backup time.Duration) {
	if a.Dirty == 0 {
		return 0, 0
	}
	return a.CPU / time.Duration(a.Dirty), a.BackupCPU / time.Duration(a.Dirty)
}

// MeanPart is the mean of pause part i per epoch.
func (a *Agg) MeanPart(i int) time.Duration {
	if a.Epochs == 0 {
		return 0
	}
	return a.Parts[i] / time.Duration(a.Epochs)
}

// MeanDirty is the mean number of dirty pages per epoch.
func (a *Agg) MeanDirty() float64 {
	if a.Epochs == 0 {
		return 0
	}
	return float64(a.Dirty) / float64(a.Epochs)
}

// Ratio is the compression ratio of memory, wire bytes over raw bytes (1
// with no raw bytes). The disk's messages are left out: they are part of the
// wire bytes, not of the raw pages.
func (a *Agg) Ratio() float64 {
	if a.Raw == 0 {
		return 1
	}
	return float64(a.Wire-a.DiskWire) / float64(a.Raw)
}

// Count is the number of samples.
func (h *Hist) Count() uint64 { return h.n }

// Max is the largest sample (0 with none), exactly.
func (h *Hist) Max() time.Duration { return time.Duration(h.max) }
