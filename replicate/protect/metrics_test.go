package protect_test

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/metrics"
	"github.com/repagent/repagent/replicate/protect"
)

// TestMetrics: a Primary and a Backup given collectors feed them without
// the embedder's help: epochs and checkpoints count up, protected is 1
// while the backup holds checkpoints, and 0 once replication ends.
func TestMetrics(t *testing.T) {
	pm, bm := metrics.NewPrimaryCollector(), metrics.NewBackupCollector()
	reg := prometheus.NewRegistry()
	reg.MustRegister(pm, bm)
	// Wired by hand, not by replicatetest.NewPair: the engines under test
	// are the ones protect makes from its own configs (Protect, NewBackup),
	// with the collectors they are given.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	backup, err := protect.NewBackup(protect.BackupConfig{
		Engine:  replicate.BackupConfig{NewMemory: newMemory, Log: quiet},
		Metrics: bm,
		Restore: func(cp *replicate.Checkpoint, _ protect.Devices) (*protect.Restored, error) {
			cp.Memory.Close()
			return nil, errors.New("this test does not fail over")
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer backup.Close()
	served := make(chan error, 1)
	go func() { _, err := backup.Serve(context.Background(), ln); served <- err }()

	p, err := protect.NewPrimary(protect.Config{Engine: replicate.Config{Interval: 10 * time.Millisecond, Log: quiet}, Metrics: pm})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	vm := newCounter(make([]byte, 1<<20), 0, io.Discard, image(t))
	engine, err := p.Protect(vm)
	if err != nil {
		t.Fatal(err)
	}
	vm.start()
	defer vm.halt()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, ln.Addr().String()) }()
	deadline := time.Now().Add(30 * time.Second)
	for engine.LastAcked() < 10 {
		if time.Now().After(deadline) {
			t.Fatalf("10 epochs not acknowledged in 30 s (at %d)", engine.LastAcked())
		}
		time.Sleep(time.Millisecond)
	}
	if v := metricValue(t, reg, "repagent_protected"); v != 1 {
		t.Errorf("repagent_protected = %v while the backup holds checkpoints", v)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	if err := <-served; !errors.Is(err, replicate.ErrPrimaryStopped) {
		t.Fatalf("backup: %v, want the primary's bye", err)
	}
	for name, want := range map[string]float64{"repagent_protected": 0, "repagent_failovers_total": 0, "repagent_backup_losses_total": 0} {
		if v := metricValue(t, reg, name); v != want {
			t.Errorf("after the stop, %s = %v, want %v", name, v, want)
		}
	}
	for _, name := range []string{"repagent_epochs_total", "repagent_backup_checkpoints_total"} {
		if v := metricValue(t, reg, name); v < 10 {
			t.Errorf("%s = %v after 10 acknowledged epochs", name, v)
		}
	}
}

// metricValue is the value of the counter or gauge name in reg.
func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name || len(mf.GetMetric()) != 1 {
			continue
		}
		m := mf.GetMetric()[0]
		if c := m.GetCounter(); c != nil {
			return c.GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("no single metric %s", name)
	return 0
}
