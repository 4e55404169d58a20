package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/repagent/repagent/replicate"
)

// BackupCollector holds the metrics of a backup: the checkpoints it applied
// and its failovers. Like PrimaryCollector it is a prometheus.Collector the
// embedder registers itself; its methods are safe for concurrent use, and a
// nil *BackupCollector ignores them.
type BackupCollector struct {
	checkpoints prometheus.Counter
	epoch       prometheus.Gauge
	applied     prometheus.Counter
	failovers   prometheus.Counter
	failover    prometheus.Gauge

	all []prometheus.Collector
}

// NewBackupCollector returns a backup's metrics, all at zero.
func NewBackupCollector() *BackupCollector {
	c := &BackupCollector{
		checkpoints: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "backup_checkpoints_total",
			Help: "Checkpoints received, verified and applied to the replica."}),
		epoch: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "backup_checkpoint_epoch",
			Help: "The epoch of the latest checkpoint applied (the one a failover resumes)."}),
		applied: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "backup_applied_bytes_total",
			Help: "Guest memory received in checkpoints and applied to the replica (pages of 4096 bytes)."}),
		failovers: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "failovers_total",
			Help: "Failovers: the primary was lost and the VM resumed here."}),
		failover: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "failover_duration_seconds",
			Help: "How long the latest failover took, from detecting the loss to the VM resumed."}),
	}
	c.all = []prometheus.Collector{c.checkpoints, c.epoch, c.applied, c.failovers, c.failover}
	return c
}

// Describe implements prometheus.Collector.
func (c *BackupCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.all {
		m.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (c *BackupCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.all {
		m.Collect(ch)
	}
}

// ObserveCheckpoint records a checkpoint applied. Its signature is
// replicate.BackupConfig.OnEpoch's.
func (c *BackupCollector) ObserveCheckpoint(epoch uint64, pages int, _ uint64) {
	if c == nil {
		return
	}
	c.checkpoints.Inc()
	c.epoch.Set(float64(epoch))
	c.applied.Add(float64(pages) * replicate.PageSize)
}

// ObserveFailover records a failover (what Backup.Serve returned).
func (c *BackupCollector) ObserveFailover(fo *replicate.Failover) {
	if c == nil || fo == nil {
		return
	}
	c.failovers.Inc()
	c.failover.Set(fo.Took.Seconds())
}
