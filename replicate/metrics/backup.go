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

	group
}

// NewBackupCollector returns a backup's metrics, all at zero.
func NewBackupCollector() *BackupCollector {
	c := &BackupCollector{}
	c.checkpoints = c.counter("backup_checkpoints_total", "Checkpoints received, verified and applied to the replica.")
	c.epoch = c.gauge("backup_checkpoint_epoch", "The epoch of the latest checkpoint applied (the one a failover resumes).")
	c.applied = c.counter("backup_applied_bytes_total", "Guest memory received in checkpoints and applied to the replica (pages of 4096 bytes).")
	c.failovers = c.counter("failovers_total", "Failovers: the primary was lost and the VM resumed here.")
	c.failover = c.gauge("failover_duration_seconds", "How long the latest failover took, from detecting the loss to the VM resumed.")
	return c
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
