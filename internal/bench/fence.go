package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/repagent/repagent/internal/etcdtest"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/procout"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/fence"
	"github.com/repagent/repagent/replicate/protect"
	"github.com/repagent/repagent/testvm"
)

// The fenced failover section: a primary (a separate process) fenced
// through a real etcd (Debian's etcd-server, as its own process) is killed,
// or frozen, and a protect.Backup in this process takes over. Its time from
// the signal to the resumed guest running is split into: detection (the
// backup decides the primary is lost), lease expiry (from then until etcd
// deletes the owner key: what the old lease had left), acquisition (from the
// deletion to the backup owning the VM and the standby checked) and
// restore (testvm.Restore and Start).

// FenceTTL is the fenced primary's lease TTL.
const FenceTTL = 2 * time.Second

// FenceRun is one fenced failover.
type FenceRun struct {
	Signal    string  `json:"signal"`
	Epoch     uint64  `json:"epoch"`
	DetectMS  float64 `json:"detect_ms"`
	ExpiryMS  float64 `json:"lease_expiry_ms"`
	AcquireMS float64 `json:"acquire_ms"`
	RestoreMS float64 `json:"restore_ms"`
	TotalMS   float64 `json:"total_ms"`
	Error     string  `json:"error,omitempty"`
}

// FenceResult is the fenced failover section.
type FenceResult struct {
	Mem   uint64     `json:"mem"`
	TTLMS float64    `json:"lease_ttl_ms"`
	HBMS  float64    `json:"heartbeat_timeout_ms"`
	Runs  []FenceRun `json:"runs"`
	// Skipped says why the section did not run.
	Skipped string `json:"skipped,omitempty"`
}

// measureFence runs Failovers fenced failovers by SIGKILL and one by
// SIGSTOP at the first of FailoverSizes. Without the etcd binary the
// section is skipped, and says so.
func (b *runner) measureFence(ctx context.Context) (*FenceResult, error) {
	if _, err := os.Stat(privileged.EtcdBinary); err != nil {
		return &FenceResult{Skipped: fmt.Sprintf("no etcd server (%v): make deps installs etcd-server", err)}, nil
	}
	exe := b.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("find this program to run its primary command: %w", err)
		}
	}
	dir, err := os.MkdirTemp("", "repagent-bench-etcd-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	ep, stop, out, err := etcdtest.Launch(dir)
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	defer stop()
	client, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w (%s)", err, out)
	}
	defer client.Close()
	fr := &FenceResult{Mem: b.FailoverSizes[0], TTLMS: toMS(FenceTTL), HBMS: toMS(b.failoverTimeout())}
	sigs := make([]syscall.Signal, 0, b.Failovers+1)
	for range b.Failovers {
		sigs = append(sigs, syscall.SIGKILL)
	}
	sigs = append(sigs, syscall.SIGSTOP)
	for i, sig := range sigs {
		b.progressf("fenced failover %d/%d at %s: %v", i+1, len(sigs), testvm.FormatSize(fr.Mem), sig)
		run, err := b.fenceOnce(ctx, exe, client, ep, fmt.Sprintf("bench-%d-%d", os.Getpid(), i), sig)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			run.Error = err.Error()
			b.progressf("fenced failover: %v", err)
		}
		fr.Runs = append(fr.Runs, run)
	}
	return fr, nil
}

func (b *runner) fenceOnce(ctx context.Context, exe string, client *clientv3.Client, ep, name string, sig syscall.Signal) (run FenceRun, err error) {
	run.Signal = map[syscall.Signal]string{syscall.SIGKILL: "SIGKILL", syscall.SIGSTOP: "SIGSTOP"}[sig]
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return run, err
	}
	defer ln.Close()
	type resumed struct{ called, started time.Time }
	res := make(chan resumed, 1)
	var machine *testvm.Machine
	log := slog.New(slog.NewTextHandler(b.stderr, &slog.HandlerOptions{Level: slog.LevelError})).With("side", "fenced backup")
	var sh shells
	defer sh.close()
	bk, err := protect.NewBackup(protect.BackupConfig{
		Engine: replicate.BackupConfig{NewMemory: testvm.NewMemFile, HeartbeatTimeout: b.HeartbeatTimeout, Log: log, Prepare: sh.prepare},
		Restore: func(cp *replicate.Checkpoint, _ protect.Devices) (*protect.Restored, error) {
			called := time.Now()
			m, err := sh.restore(cp)
			if err != nil {
				cp.Memory.Close()
				return nil, err
			}
			return &protect.Restored{Start: func() error {
				if err := m.Start(); err != nil {
					m.Close()
					return err
				}
				machine = m
				res <- resumed{called, time.Now()}
				return nil
			}}, nil
		},
		Fence: &protect.Fence{Config: fence.Config{Client: client, Name: name, ID: "bench-backup", TTL: FenceTTL, Log: log}},
	})
	if err != nil {
		return run, err
	}
	defer func() {
		if machine != nil {
			machine.Close()
		}
		bk.Close()
	}()
	bctx, bcancel := context.WithCancel(ctx)
	defer bcancel()
	bdone := make(chan backupResult, 1)
	go func() {
		fo, err := bk.Serve(bctx, ln)
		bdone <- backupResult{fo, err}
	}()
	// The owner key's deletion, as etcd reports it.
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	deleted := make(chan time.Time, 1)
	go func() {
		for wr := range client.Watch(wctx, fence.Key(name)) {
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypeDelete {
					deleted <- time.Now()
					return
				}
			}
		}
	}()

	args := []string{"primary", "--backup", ln.Addr().String(), "--mem", strconv.FormatUint(b.FailoverSizes[0], 10),
		"--workload", "dirty", "--rate", strconv.FormatUint(b.Rates[0], 10), "--interval", FailoverInterval.String(), "--quiet",
		"--etcd", ep, "--name", name, "--lease-ttl", FenceTTL.String()}
	if b.HeartbeatTimeout != 0 {
		args = append(args, "--heartbeat-timeout", b.HeartbeatTimeout.String())
	}
	cmd := exec.Command(exe, args...)
	var out procout.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return run, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	deadline := time.Now().Add(setupTimeoutFor(b.FailoverSizes[0]))
	for {
		if epoch, _ := bk.Engine().LastCheckpoint(); epoch >= failoverEpochs {
			break
		}
		if time.Now().After(deadline) {
			return run, fmt.Errorf("no checkpoint %d in time; primary: %s", failoverEpochs, out.String())
		}
		select {
		case werr := <-exited:
			exited <- werr
			return run, fmt.Errorf("the primary exited (%v): %s", werr, out.String())
		case <-time.After(5 * time.Millisecond):
		}
	}
	t0 := time.Now()
	if err := cmd.Process.Signal(sig); err != nil {
		return run, err
	}
	var br backupResult
	select {
	case br = <-bdone:
	case <-time.After(b.failoverTimeout() + 4*FenceTTL + 30*time.Second):
		return run, errors.New("the backup did not fail over")
	}
	if br.err != nil || br.fo == nil {
		return run, fmt.Errorf("backup: %+v, %v", br.fo, br.err)
	}
	rs := <-res
	var del time.Time
	select {
	case del = <-deleted:
	default:
		return run, errors.New("etcd reported no deletion of the owner key")
	}
	fo := br.fo
	claimEnd := rs.called.Add(-fo.Verify)
	detected := claimEnd.Add(-fo.Claim)
	run.Epoch = fo.Epoch
	run.DetectMS = toMS(detected.Sub(t0))
	// A frozen primary's lease may expire before the heartbeat timeout
	// detects it: then the expiry added nothing after detection.
	from := del
	if del.Before(detected) {
		from = detected
	}
	run.ExpiryMS = toMS(from.Sub(detected))
	run.AcquireMS = toMS(claimEnd.Sub(from))
	run.RestoreMS = toMS(rs.started.Sub(rs.called))
	run.TotalMS = toMS(rs.started.Sub(t0))
	return run, nil
}

func printFence(w io.Writer, fr *FenceResult) {
	if fr.Skipped != "" {
		fmt.Fprintf(w, "Fenced failover: skipped: %s\n", fr.Skipped)
		return
	}
	fmt.Fprintf(w, "Fenced failover: a %s primary process fenced through etcd (lease TTL %v), killed or frozen; backup heartbeat timeout %v:\n\n",
		testvm.FormatSize(fr.Mem), time.Duration(fr.TTLMS*float64(time.Millisecond)), time.Duration(fr.HBMS*float64(time.Millisecond)))
	var rows [][]string
	f := func(x float64) string { return fmt.Sprintf("%.1f", x) }
	for i, r := range fr.Runs {
		if r.Error != "" {
			rows = append(rows, []string{strconv.Itoa(i + 1), r.Signal, "-", "-", "-", "-", "-", "-", "FAILED: " + r.Error})
			continue
		}
		rows = append(rows, []string{strconv.Itoa(i + 1), r.Signal, strconv.FormatUint(r.Epoch, 10), f(r.DetectMS), f(r.ExpiryMS),
			f(r.AcquireMS), f(r.RestoreMS), f(r.TotalMS), ""})
	}
	withNotes(w, []string{"run", "signal", "epoch", "detect ms", "lease expiry ms", "acquire ms", "restore ms", "total ms", ""}, rows)
}
