package replicatetest_test

import (
	"errors"
	"io"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
)

// stillVM is a VM whose guest never writes: the smallest thing a pair can
// replicate, checkpoints of no pages.
type stillVM struct{ mem []byte }

func newStillVM() *stillVM { return &stillVM{mem: make([]byte, 64*replicate.PageSize)} }

func (v *stillVM) DirtySlots() []dirtylog.Slot {
	return []dirtylog.Slot{{Size: uint64(len(v.mem)), Host: v.mem}}
}
func (v *stillVM) DirtySource(dirtylog.Mechanism) (dirtylog.Source, error) { return stillSource{}, nil }
func (v *stillVM) NumVCPUs() int                                           { return 1 }
func (v *stillVM) Pause() error                                            { return nil }
func (v *stillVM) Resume() error                                           { return nil }
func (v *stillVM) Save() ([]byte, error)                                   { return []byte("still"), nil }

type stillSource struct{}

func (stillSource) Start() error                                  { return nil }
func (stillSource) Stop() error                                   { return nil }
func (stillSource) Mechanism() dirtylog.Mechanism                 { return dirtylog.Manual }
func (stillSource) Harvest(*dirtylog.Set) (dirtylog.Stats, error) { return dirtylog.Stats{}, nil }

var cfg = replicate.Config{VM: newStillVM(), Interval: 10 * time.Millisecond}

// resumeInto is a Resume that sends the epoch it resumed.
func resumeInto(ch chan<- uint64) func(*replicate.Checkpoint) error {
	return func(cp *replicate.Checkpoint) error {
		cp.Memory.Close()
		ch <- cp.Epoch
		return nil
	}
}

func TestPairKillPrimary(t *testing.T) {
	resumed := make(chan uint64, 1)
	p := replicatetest.NewPair(t, cfg, replicate.BackupConfig{Resume: resumeInto(resumed)})
	p.WaitAcked(5)
	p.KillPrimary()
	if err := p.PrimaryErr(); !errors.Is(err, replicate.ErrBackupLost) {
		t.Fatalf("primary: %v, want ErrBackupLost", err)
	}
	fo, err := p.BackupResult()
	if err != nil {
		t.Fatalf("backup: %v, want a failover", err)
	}
	if fo.Epoch < p.Primary.LastAcked() || <-resumed != fo.Epoch {
		t.Fatalf("failover to epoch %d, primary had %d acknowledged", fo.Epoch, p.Primary.LastAcked())
	}
}

func TestPairKillBackup(t *testing.T) {
	p := replicatetest.NewPair(t, cfg, replicate.BackupConfig{})
	p.WaitAcked(3)
	p.KillBackup()
	if err := p.PrimaryErr(); !errors.Is(err, replicate.ErrBackupLost) {
		t.Fatalf("primary: %v, want ErrBackupLost", err)
	}
	if fo, err := p.BackupResult(); fo != nil || err == nil {
		t.Fatalf("backup: %+v, %v; want its context's end", fo, err)
	}
}

// Stop is a clean stop: no failover, even through a proxy.
func TestPairStopThroughProxy(t *testing.T) {
	p := replicatetest.NewUnstartedPair(t, cfg, replicate.BackupConfig{})
	var relayed atomic.Int64
	p.Proxy = func(from io.Reader, to io.Writer) {
		io.Copy(countingWriter{to, &relayed}, from)
	}
	p.Start()
	p.WaitAcked(3)
	if relayed.Load() == 0 {
		t.Fatal("epochs acknowledged, but nothing went through the proxy")
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if _, err := p.BackupResult(); !errors.Is(err, replicate.ErrPrimaryStopped) {
		t.Fatalf("backup: %v, want ErrPrimaryStopped", err)
	}
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// A backup without a Resume refuses to fail over, and says why.
func TestPairDefaultResume(t *testing.T) {
	p := replicatetest.NewPair(t, cfg, replicate.BackupConfig{})
	p.WaitAcked(3)
	p.KillPrimary()
	if fo, err := p.BackupResult(); fo == nil || !errors.Is(err, replicatetest.ErrNoResume) {
		t.Fatalf("backup: %+v, %v; want an attempted failover failing with ErrNoResume", fo, err)
	}
}

// A proxy that cuts the link is a dead primary.
func TestPairProxyCut(t *testing.T) {
	resumed := make(chan uint64, 1)
	p := replicatetest.NewUnstartedPair(t, cfg, replicate.BackupConfig{Resume: resumeInto(resumed)})
	cut := make(chan struct{})
	p.Proxy = func(from io.Reader, to io.Writer) {
		go func() { io.Copy(to, from) }()
		<-cut
	}
	p.Start()
	p.WaitAcked(3)
	close(cut)
	if _, err := p.BackupResult(); err != nil {
		t.Fatalf("backup: %v, want a failover", err)
	}
	if !errors.Is(p.PrimaryErr(), replicate.ErrBackupLost) {
		t.Fatal("primary did not lose its backup")
	}
}

// The helper is for any VMM: it knows neither testvm nor a device.
func TestPairDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/repagent/repagent/replicate/replicatetest").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	for _, p := range []string{
		"github.com/repagent/repagent/testvm",
		"github.com/repagent/repagent/ebpf",
		"github.com/repagent/repagent/diskmirror",
	} {
		if slices.Contains(deps, p) {
			t.Errorf("replicatetest depends on %s", p)
		}
	}
}
