package metrics

import (
	"sync/atomic"

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
	serve       *serveStats

	group
}

// serveStats collects what Backup.Serve did with the connections it
// accepted (replicate.ServeStats), read at each scrape.
type serveStats struct {
	desc  *prometheus.Desc
	stats atomic.Pointer[func() replicate.ServeStats]
}

func (s *serveStats) Describe(ch chan<- *prometheus.Desc) { ch <- s.desc }

func (s *serveStats) Collect(ch chan<- prometheus.Metric) {
	f := s.stats.Load()
	if f == nil {
		return
	}
	st := (*f)()
	for _, o := range []struct {
		outcome string
		n       uint64
	}{{"accepted", st.Accepted}, {"evicted", st.RefusedFull}, {"busy", st.RefusedBusy}, {"failed", st.Failed},
		{"session", st.Sessions}, {"early", st.Early}} {
		ch <- prometheus.MustNewConstMetric(s.desc, prometheus.CounterValue, float64(o.n), o.outcome)
	}
}

// NewBackupCollector returns a backup's metrics, all at zero.
func NewBackupCollector() *BackupCollector {
	c := &BackupCollector{}
	c.checkpoints = c.counter("backup_checkpoints_total", "Checkpoints received, verified and applied to the replica.")
	c.epoch = c.gauge("backup_checkpoint_epoch", "The epoch of the latest checkpoint applied (the one a failover resumes).")
	c.applied = c.counter("backup_applied_bytes_total", "Guest memory received in checkpoints and applied to the replica (pages of 4096 bytes).")
	c.failovers = c.counter("failovers_total", "Failovers: the primary was lost and the VM resumed here.")
	c.failover = c.gauge("failover_duration_seconds", "How long the latest failover took, from detecting the loss to the VM resumed.")
	c.serve = &serveStats{desc: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "", "backup_connections_total"),
		"Connections the backup accepted, and what became of them: evicted (the oldest in its handshake when too many were), busy (a session was running), failed (its handshake: TLS, the hello, the deadline), session (a session started), early (a session that ended with nothing to fail over: refused, or before its first checkpoint).",
		[]string{"outcome"}, nil)}
	c.add(c.serve)
	return c
}

// WatchServe has the collector report stats (Backup.ServeStats) at each
// scrape.
func (c *BackupCollector) WatchServe(stats func() replicate.ServeStats) {
	if c == nil {
		return
	}
	c.serve.stats.Store(&stats)
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
