package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/replicate"
)

// Namespace is the prefix of every metric's name.
const Namespace = "repagent"

// Buckets are the histograms' bucket bounds in seconds: 100µs doubling to
// 3.2768s, 16 buckets. Pauses are a few milliseconds, acks and transfers
// tens, hold times up to an epoch interval and its ack; what is longer falls
// in +Inf.
var Buckets = prometheus.ExponentialBuckets(100e-6, 2, 16)

// PauseParts are the values of the part label of
// repagent_epoch_pause_part_seconds, the fields of replicate.EpochStats the
// pause is made of.
var PauseParts = [...]string{"kick", "harvest", "save", "stall", "copy", "gates", "resume", "audit"}

const partAudit = 7

// DropReasons are the values of the reason label of
// repagent_gate_dropped_frames_total, for ebpf.EpochStats's DroppedRingFull,
// DroppedTooBig and DroppedHoldLimit.
var DropReasons = [...]string{"ring_full", "too_big", "hold_limit"}

// gateOutcomes are the values of the outcome label of
// repagent_gate_epochs_total, in ebpf.Outcome's order from
// ebpf.OutcomeCommitted.
var gateOutcomes = [...]ebpf.Outcome{ebpf.OutcomeCommitted, ebpf.OutcomeDiscarded, ebpf.OutcomeReleased, ebpf.OutcomeClosed}

// PrimaryCollector holds the metrics of a primary: its epochs, its output
// gates and whether the VM is protected. It is a prometheus.Collector: the
// embedder registers it in a registry of its own (it registers nothing
// itself) and calls its Observe methods from the engine's callbacks. The
// methods are safe for concurrent use, allocate nothing, and a nil
// *PrimaryCollector ignores them, so that an agent without metrics can call
// them all the same.
type PrimaryCollector struct {
	epochs    prometheus.Counter
	lastAcked prometheus.Gauge
	pause     prometheus.Histogram
	parts     [len(PauseParts)]prometheus.Observer
	wait      prometheus.Histogram
	transfer  prometheus.Histogram
	ack       prometheus.Histogram
	oversize  prometheus.Counter

	dirtyPages, zeroPages, lz4Pages      prometheus.Counter
	rawBytes, wireBytes, stateBytes      prometheus.Counter
	diskWrites, diskBytes, diskWireBytes prometheus.Counter
	cpuPrimary, cpuBackup                prometheus.Counter

	protected    prometheus.Gauge
	backupLosses prometheus.Counter

	gateEpochs     *prometheus.CounterVec
	gateOutcome    [len(gateOutcomes)]prometheus.Counter
	gateHeld       prometheus.Counter
	gateHeldBytes  prometheus.Counter
	gateReleased   prometheus.Counter
	gateDropped    [len(DropReasons)]prometheus.Counter
	gateDiscarded  prometheus.Counter
	gateFailed     prometheus.Counter
	gateHoldMedian prometheus.Histogram
	gateHoldMax    prometheus.Histogram

	all []prometheus.Collector
}

// NewPrimaryCollector returns a primary's metrics, all at zero.
func NewPrimaryCollector() *PrimaryCollector {
	c := &PrimaryCollector{}
	counter := func(name, help string) prometheus.Counter {
		m := prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help})
		c.all = append(c.all, m)
		return m
	}
	gauge := func(name, help string) prometheus.Gauge {
		m := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help})
		c.all = append(c.all, m)
		return m
	}
	histogram := func(name, help string) prometheus.Histogram {
		m := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: Namespace, Name: name, Help: help, Buckets: Buckets})
		c.all = append(c.all, m)
		return m
	}

	c.epochs = counter("epochs_total", "Epochs the backup acknowledged.")
	c.lastAcked = gauge("last_acked_epoch", "The latest epoch the backup acknowledged.")
	c.pause = histogram("epoch_pause_seconds", "How long each acknowledged epoch stopped the vCPUs.")
	parts := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: "epoch_pause_part_seconds",
		Help: "The parts of each epoch's pause (audit only in the epochs that audited memory).", Buckets: Buckets}, []string{"part"})
	c.all = append(c.all, parts)
	for i, p := range PauseParts {
		c.parts[i] = parts.WithLabelValues(p)
	}
	c.wait = histogram("epoch_wait_seconds", "Back-pressure wait before each epoch's pause (the guest ran on).")
	c.transfer = histogram("epoch_transfer_seconds", "From the end of each epoch's pause to its end record written.")
	c.ack = histogram("ack_latency_seconds", "From each epoch's end record written to the backup's ack.")
	c.oversize = counter("oversize_epochs_total", "Epochs whose pages did not fit in staging and were sent during the pause.")
	c.dirtyPages = counter("dirty_pages_total", "Dirty pages captured in acknowledged epochs.")
	c.zeroPages = counter("zero_pages_total", "Captured pages that were all zero.")
	c.lz4Pages = counter("lz4_pages_total", "Captured pages sent LZ4-compressed.")
	c.rawBytes = counter("raw_bytes_total", "Size of the captured pages.")
	c.wireBytes = counter("wire_bytes_total", "Bytes acknowledged epochs took on the wire (pages, state, disk, headers).")
	c.stateBytes = counter("state_bytes_total", "Machine state sent in acknowledged epochs.")
	c.diskWrites = counter("disk_writes_total", "Disk write records mirrored in acknowledged epochs.")
	c.diskBytes = counter("disk_bytes_total", "Data of the mirrored disk writes.")
	c.diskWireBytes = counter("disk_wire_bytes_total", "Wire bytes of the mirrored disk writes (part of repagent_wire_bytes_total).")
	cpu := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "engine_cpu_seconds_total",
		Help: "The replication engine's CPU time on acknowledged epochs, by side."}, []string{"side"})
	c.all = append(c.all, cpu)
	c.cpuPrimary, c.cpuBackup = cpu.WithLabelValues("primary"), cpu.WithLabelValues("backup")
	c.protected = gauge("protected", "1 while the backup holds an acknowledged checkpoint and is reachable, else 0.")
	c.backupLosses = counter("backup_losses_total", "Times the backup was lost and the VM went on unprotected.")

	c.gateEpochs = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "gate_epochs_total",
		Help: "Output gate epochs ended, by how their held frames left."}, []string{"outcome"})
	c.all = append(c.all, c.gateEpochs)
	for i, o := range gateOutcomes {
		c.gateOutcome[i] = c.gateEpochs.WithLabelValues(o.String())
	}
	c.gateHeld = counter("gate_held_frames_total", "Frames the output gates held until their epoch was acknowledged.")
	c.gateHeldBytes = counter("gate_held_bytes_total", "Bytes of the held frames.")
	c.gateReleased = counter("gate_released_frames_total", "Held frames sent on once their epoch was acknowledged (or the gate released).")
	dropped := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "gate_dropped_frames_total",
		Help: "Frames the output gates dropped for lack of room, by reason."}, []string{"reason"})
	c.all = append(c.all, dropped)
	for i, r := range DropReasons {
		c.gateDropped[i] = dropped.WithLabelValues(r)
	}
	c.gateDiscarded = counter("gate_discarded_frames_total", "Held frames discarded (their epoch was abandoned, or the gate closed).")
	c.gateFailed = counter("gate_failed_frames_total", "Held frames whose release the kernel refused.")
	c.gateHoldMedian = histogram("gate_epoch_hold_median_seconds", "Each gate epoch's median hold time of its released frames (the latency output commit adds).")
	c.gateHoldMax = histogram("gate_epoch_hold_max_seconds", "Each gate epoch's longest hold time of its released frames.")
	return c
}

// Describe implements prometheus.Collector.
func (c *PrimaryCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.all {
		m.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (c *PrimaryCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.all {
		m.Collect(ch)
	}
}

// ObserveEpoch records an acknowledged epoch (replicate.Config.OnEpoch) and
// sets repagent_protected to 1: the backup holds a checkpoint.
func (c *PrimaryCollector) ObserveEpoch(s *replicate.EpochStats) {
	if c == nil {
		return
	}
	c.epochs.Inc()
	c.lastAcked.Set(float64(s.Epoch))
	c.pause.Observe(s.Pause.Seconds())
	for i, d := range [...]float64{s.Kick.Seconds(), s.Harvest.Seconds(), s.Save.Seconds(), s.Stall.Seconds(),
		s.Copy.Seconds(), s.Gates.Seconds(), s.Resume.Seconds()} {
		c.parts[i].Observe(d)
	}
	if s.Audited {
		c.parts[partAudit].Observe(s.Audit.Seconds())
	}
	c.wait.Observe(s.Wait.Seconds())
	c.transfer.Observe(s.Transfer.Seconds())
	c.ack.Observe(s.AckLatency.Seconds())
	if s.Oversize {
		c.oversize.Inc()
	}
	c.dirtyPages.Add(float64(s.DirtyPages))
	c.zeroPages.Add(float64(s.ZeroPages))
	c.lz4Pages.Add(float64(s.LZ4Pages))
	c.rawBytes.Add(float64(s.RawBytes))
	c.wireBytes.Add(float64(s.WireBytes))
	c.stateBytes.Add(float64(s.StateBytes))
	c.diskWrites.Add(float64(s.DiskWrites))
	c.diskBytes.Add(float64(s.DiskBytes))
	c.diskWireBytes.Add(float64(s.DiskWireBytes))
	c.cpuPrimary.Add(s.CPU.Seconds())
	c.cpuBackup.Add(s.BackupCPU.Seconds())
	c.protected.Set(1)
}

// ObserveGateEpoch records an output gate's epoch (ebpf.Config.OnEpoch).
// The hold time histograms get one observation per epoch that released
// frames.
func (c *PrimaryCollector) ObserveGateEpoch(s ebpf.EpochStats) {
	if c == nil {
		return
	}
	if i := int(s.Outcome) - int(ebpf.OutcomeCommitted); i >= 0 && i < len(c.gateOutcome) {
		c.gateOutcome[i].Inc()
	} else {
		c.gateEpochs.WithLabelValues(s.Outcome.String()).Inc()
	}
	c.gateHeld.Add(float64(s.Held.Frames))
	c.gateHeldBytes.Add(float64(s.Held.Bytes))
	c.gateReleased.Add(float64(s.Released.Frames))
	for i, n := range [...]uint64{s.DroppedRingFull.Frames, s.DroppedTooBig.Frames, s.DroppedHoldLimit.Frames} {
		c.gateDropped[i].Add(float64(n))
	}
	c.gateDiscarded.Add(float64(s.Discarded.Frames))
	c.gateFailed.Add(float64(s.Failed.Frames))
	if s.Released.Frames > 0 {
		c.gateHoldMedian.Observe(s.LatencyP50.Seconds())
		c.gateHoldMax.Observe(s.LatencyMax.Seconds())
	}
}

// ObserveBackupLost records that the backup was lost (Primary.Run returned
// replicate.ErrBackupLost): the VM runs on unprotected.
func (c *PrimaryCollector) ObserveBackupLost() {
	if c == nil {
		return
	}
	c.backupLosses.Inc()
	c.protected.Set(0)
}

// SetProtected sets repagent_protected: an agent clears it when
// replication stops on purpose, for the backup no longer follows the VM.
func (c *PrimaryCollector) SetProtected(protected bool) {
	if c == nil {
		return
	}
	v := 0.0
	if protected {
		v = 1
	}
	c.protected.Set(v)
}
