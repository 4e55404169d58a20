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
	parts     []prometheus.Observer // by PauseParts
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
	gateOutcome    []prometheus.Counter // by gateOutcomes
	gateHeld       prometheus.Counter
	gateHeldBytes  prometheus.Counter
	gateReleased   prometheus.Counter
	gateDropped    []prometheus.Counter // by DropReasons
	gateDiscarded  prometheus.Counter
	gateFailed     prometheus.Counter
	gateHoldMedian prometheus.Histogram
	gateHoldMax    prometheus.Histogram

	group
}

// NewPrimaryCollector returns a primary's metrics, all at zero.
func NewPrimaryCollector() *PrimaryCollector {
	c := &PrimaryCollector{}
	c.epochs = c.counter("epochs_total", "Epochs the backup acknowledged.")
	c.lastAcked = c.gauge("last_acked_epoch", "The latest epoch the backup acknowledged.")
	c.pause = c.histogram("epoch_pause_seconds", "How long each acknowledged epoch stopped the vCPUs.")
	c.parts = c.histograms("epoch_pause_part_seconds", "The parts of each epoch's pause (audit only in the epochs that audited memory).",
		"part", PauseParts[:]...)
	c.wait = c.histogram("epoch_wait_seconds", "Back-pressure wait before each epoch's pause (the guest ran on).")
	c.transfer = c.histogram("epoch_transfer_seconds", "From the end of each epoch's pause to its end record written.")
	c.ack = c.histogram("ack_latency_seconds", "From each epoch's end record written to the backup's ack.")
	c.oversize = c.counter("oversize_epochs_total", "Epochs whose pages did not fit in staging and were sent during the pause.")
	c.dirtyPages = c.counter("dirty_pages_total", "Dirty pages captured in acknowledged epochs.")
	c.zeroPages = c.counter("zero_pages_total", "Captured pages that were all zero.")
	c.lz4Pages = c.counter("lz4_pages_total", "Captured pages sent LZ4-compressed.")
	c.rawBytes = c.counter("raw_bytes_total", "Size of the captured pages.")
	c.wireBytes = c.counter("wire_bytes_total", "Bytes acknowledged epochs took on the wire (pages, state, disk, headers).")
	c.stateBytes = c.counter("state_bytes_total", "Machine state sent in acknowledged epochs.")
	c.diskWrites = c.counter("disk_writes_total", "Disk write records mirrored in acknowledged epochs.")
	c.diskBytes = c.counter("disk_bytes_total", "Data of the mirrored disk writes.")
	c.diskWireBytes = c.counter("disk_wire_bytes_total", "Wire bytes of the mirrored disk writes (part of repagent_wire_bytes_total).")
	_, cpu := c.counters("engine_cpu_seconds_total", "The replication engine's CPU time on acknowledged epochs, by side.",
		"side", "primary", "backup")
	c.cpuPrimary, c.cpuBackup = cpu[0], cpu[1]
	c.protected = c.gauge("protected", "1 while the backup holds an acknowledged checkpoint and is reachable, else 0.")
	c.backupLosses = c.counter("backup_losses_total", "Times the backup was lost and the VM went on unprotected.")

	var outcomes []string
	for _, o := range gateOutcomes {
		outcomes = append(outcomes, o.String())
	}
	c.gateEpochs, c.gateOutcome = c.counters("gate_epochs_total", "Output gate epochs ended, by how their held frames left.",
		"outcome", outcomes...)
	c.gateHeld = c.counter("gate_held_frames_total", "Frames the output gates held until their epoch was acknowledged.")
	c.gateHeldBytes = c.counter("gate_held_bytes_total", "Bytes of the held frames.")
	c.gateReleased = c.counter("gate_released_frames_total", "Held frames sent on once their epoch was acknowledged (or the gate released).")
	_, c.gateDropped = c.counters("gate_dropped_frames_total", "Frames the output gates dropped for lack of room, by reason.",
		"reason", DropReasons[:]...)
	c.gateDiscarded = c.counter("gate_discarded_frames_total", "Held frames discarded (their epoch was abandoned, or the gate closed).")
	c.gateFailed = c.counter("gate_failed_frames_total", "Held frames whose release the kernel refused.")
	c.gateHoldMedian = c.histogram("gate_epoch_hold_median_seconds", "Each gate epoch's median hold time of its released frames (the latency output commit adds).")
	c.gateHoldMax = c.histogram("gate_epoch_hold_max_seconds", "Each gate epoch's longest hold time of its released frames.")
	return c
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
	c.diskWrites.Add(float64(s.StreamRecords))
	c.diskBytes.Add(float64(s.StreamBytes))
	c.diskWireBytes.Add(float64(s.StreamWireBytes))
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
