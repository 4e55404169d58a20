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
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/repagent/repagent/internal/procout"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// FailoverRun is one failover.
type FailoverRun struct {
	Signal    string  `json:"signal"`
	Epoch     uint64  `json:"epoch"`
	DetectMS  float64 `json:"detect_ms"`  // signal to the backup deciding the primary is lost
	VerifyMS  float64 `json:"verify_ms"`  // digesting the replica
	RestoreMS float64 `json:"restore_ms"` // testvm.Restore and Start
	FirstMS   float64 `json:"first_ms"`   // Start to the guest's first progress
	TotalMS   float64 `json:"total_ms"`   // signal to the guest's first progress
	Error     string  `json:"error,omitempty"`

	// Mem is the guest's memory size. With VerifyReplica the backup
	// digested its whole replica before resuming it (backup
	// --verify-replica), in VerifyMS.
	Mem           uint64 `json:"mem"`
	VerifyReplica bool   `json:"verify_replica,omitempty"`
}

// FailoverResult is the failover figure: every run, and each size's
// summary. KillP50MS, KillMaxMS and FrozenMS are the first measured size's.
type FailoverResult struct {
	Rate        uint64        `json:"rate"`
	HeartbeatMS float64       `json:"heartbeat_timeout_ms"`
	Runs        []FailoverRun `json:"runs"`
	KillP50MS   float64       `json:"kill_p50_ms"`
	KillMaxMS   float64       `json:"kill_max_ms"`
	FrozenMS    float64       `json:"frozen_ms"`

	Sizes []FailoverSize `json:"sizes"`
	// SizeRatio is the last size's SIGKILL p50 over the first's, and
	// AfterRatio the same after detection (0 unless both were measured).
	SizeRatio  float64 `json:"last_over_first"`
	AfterRatio float64 `json:"after_detect_last_over_first"`
}

// FailoverSize is one guest size's SIGKILL failovers (Skipped says why
// there are none).
type FailoverSize struct {
	Mem     uint64 `json:"mem"`
	Skipped string `json:"skipped,omitempty"`
	Kills   int    `json:"kills"`
	// The total (signal to the guest's progress on the backup): p50 and
	// max; the p50s of its detection and of what follows it (verify,
	// restore, first write).
	KillP50MS   float64 `json:"kill_p50_ms"`
	KillMaxMS   float64 `json:"kill_max_ms"`
	DetectP50MS float64 `json:"detect_p50_ms"`
	AfterP50MS  float64 `json:"after_detect_p50_ms"`
	// The extra run with the whole replica digested first (0: failed).
	VerifiedMS       float64 `json:"verify_replica_total_ms,omitempty"`
	VerifiedDigestMS float64 `json:"verify_replica_digest_ms,omitempty"`
}

// setupTimeoutFor is how long a guest of mem bytes may take to boot,
// sync and be acknowledged a few epochs: setupTimeout, longer for a guest
// that takes longer to sync at setupRate.
func setupTimeoutFor(mem uint64) time.Duration {
	return max(setupTimeout, time.Duration(float64(mem)/setupRate*float64(time.Second)))
}

// failoverTimeout is the failover backup's heartbeat timeout: the flag, or
// the engine's default at the failover primary's interval.
func (b *runner) failoverTimeout() time.Duration {
	if b.HeartbeatTimeout != 0 {
		return b.HeartbeatTimeout
	}
	return max(5*FailoverInterval, replicate.MinHeartbeatTimeout)
}

// measureFailover kills --failovers primaries at each of --failover-sizes
// (skipping a size that does not fit in memory), freezes one at the first
// size measured, and kills one more at each size whose backup digests its
// replica first.
func (b *runner) measureFailover(ctx context.Context) (*FailoverResult, error) {
	exe := b.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("find this program to run its primary command: %w", err)
		}
	}
	fo := &FailoverResult{Rate: b.Rates[0], HeartbeatMS: toMS(b.failoverTimeout())}
	// once runs one failover, keeps it and returns its total (0: failed).
	once := func(what string, mem uint64, sig syscall.Signal, verify bool) (time.Duration, error) {
		run, err := b.failoverOnce(ctx, exe, sig, mem, verify)
		if err != nil {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			run.Error = err.Error()
			b.progressf("%s: %v", what, err)
		}
		fo.Runs = append(fo.Runs, run)
		if err != nil {
			return 0, nil
		}
		return time.Duration(run.TotalMS * float64(time.Millisecond)), nil
	}
	measured := 0
	for _, mem := range b.FailoverSizes {
		sz := FailoverSize{Mem: mem}
		why, err := fits(mem)
		if err != nil {
			return nil, err
		}
		if why != "" {
			sz.Skipped = why
			b.progressf("failover at %s: skipped: %s", testvm.FormatSize(mem), why)
			fo.Sizes = append(fo.Sizes, sz)
			continue
		}
		var kills, detect, after []time.Duration
		for i := 0; i < b.Failovers; i++ {
			what := fmt.Sprintf("failover %d/%d at %s: SIGKILL", i+1, b.Failovers, testvm.FormatSize(mem))
			b.progressf("%s", what)
			d, err := once(what, mem, syscall.SIGKILL, false)
			if err != nil {
				return nil, err
			}
			if d > 0 {
				r := fo.Runs[len(fo.Runs)-1]
				kills = append(kills, d)
				detect = append(detect, time.Duration(r.DetectMS*float64(time.Millisecond)))
				after = append(after, time.Duration((r.TotalMS-r.DetectMS)*float64(time.Millisecond)))
			}
		}
		if len(kills) == 0 {
			return fo, fmt.Errorf("no failover succeeded at %s; the first: %s", testvm.FormatSize(mem), fo.Runs[len(fo.Runs)-b.Failovers].Error)
		}
		sz.Kills = len(kills)
		sz.KillMaxMS = toMS(slices.Max(kills))
		sz.KillP50MS = toMS(median(kills))
		sz.DetectP50MS = toMS(median(detect))
		sz.AfterP50MS = toMS(median(after))
		if measured++; measured == 1 {
			fo.KillP50MS, fo.KillMaxMS = sz.KillP50MS, sz.KillMaxMS
			what := fmt.Sprintf("failover at %s: SIGSTOP (frozen host)", testvm.FormatSize(mem))
			b.progressf("%s", what)
			d, err := once(what, mem, syscall.SIGSTOP, false)
			if err != nil {
				return nil, err
			}
			fo.FrozenMS = toMS(d)
		}
		what := fmt.Sprintf("failover at %s: SIGKILL, the backup digesting its replica first (--verify-replica)", testvm.FormatSize(mem))
		b.progressf("%s", what)
		d, err := once(what, mem, syscall.SIGKILL, true)
		if err != nil {
			return nil, err
		}
		if d > 0 {
			sz.VerifiedMS, sz.VerifiedDigestMS = toMS(d), fo.Runs[len(fo.Runs)-1].VerifyMS
		}
		fo.Sizes = append(fo.Sizes, sz)
	}
	fo.compareSizes()
	return fo, nil
}

// compareSizes sets SizeRatio and AfterRatio: the last size against the
// first, when both were measured.
func (fo *FailoverResult) compareSizes() {
	if first, last := fo.Sizes[0], fo.Sizes[len(fo.Sizes)-1]; len(fo.Sizes) > 1 && first.Kills > 0 && last.Kills > 0 {
		fo.SizeRatio = ratio(last.KillP50MS, first.KillP50MS)
		fo.AfterRatio = ratio(last.AfterP50MS, first.AfterP50MS)
	}
}

// resumedVM is what the failover backup's Resume did.
type resumedVM struct {
	called, started time.Time
	progress        chan time.Time // the guest's first progress (zero: none seen)
	m               *testvm.Machine
}

// failoverOnce runs a primary as a separate process against a backup in this
// process, sends it sig once the backup holds a few checkpoints, and times
// the failover: from the signal to the resumed guest's first progress.
func (b *runner) failoverOnce(ctx context.Context, exe string, sig syscall.Signal, mem uint64, verify bool) (run FailoverRun, err error) {
	run.Signal = map[syscall.Signal]string{syscall.SIGKILL: "SIGKILL", syscall.SIGSTOP: "SIGSTOP"}[sig]
	run.Mem, run.VerifyReplica = mem, verify
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return run, fmt.Errorf("listen for the primary: %w", err)
	}
	defer ln.Close()
	res := make(chan *resumedVM, 1)
	var sh shells
	defer sh.close()
	bk, err := replicate.NewBackup(replicate.BackupConfig{
		NewMemory: testvm.NewMemFile,
		Prepare:   sh.prepare,
		Resume: func(cp *replicate.Checkpoint) error {
			rs := &resumedVM{called: time.Now(), progress: make(chan time.Time, 1)}
			m, err := sh.restore(cp)
			if err != nil {
				cp.Memory.Close()
				return err
			}
			it0 := m.Status(0).Iterations // exact: not started yet
			if err := m.Start(); err != nil {
				m.Close()
				return err
			}
			rs.started, rs.m = time.Now(), m
			go func() {
				limit := time.Now().Add(10 * time.Second)
				for time.Now().Before(limit) {
					if m.Status(0).Iterations > it0 {
						rs.progress <- time.Now()
						return
					}
					time.Sleep(50 * time.Microsecond)
				}
				rs.progress <- time.Time{}
			}()
			res <- rs
			return nil
		},
		HeartbeatTimeout: b.HeartbeatTimeout,
		VerifyReplica:    verify,
		// The backup warns of the primary's loss: expected here.
		Log: slog.New(slog.NewTextHandler(b.stderr, &slog.HandlerOptions{Level: slog.LevelError})).With("side", "failover backup"),
	})
	if err != nil {
		return run, err
	}
	defer bk.Close()
	bctx, bcancel := context.WithCancel(context.Background())
	bdone := make(chan backupResult, 1)
	go func() {
		fo, err := bk.Serve(bctx, ln)
		bdone <- backupResult{fo, err}
	}()
	served := false
	defer func() {
		// Whatever happened: the backup is stopped, and a guest it resumed
		// is closed once its poller is done.
		bcancel()
		if !served {
			<-bdone
		}
		select {
		case rs := <-res:
			<-rs.progress
			rs.m.Close()
		default:
		}
	}()

	args := []string{"primary", "--backup", ln.Addr().String(), "--mem", strconv.FormatUint(mem, 10),
		"--vcpus", strconv.Itoa(b.VCPUs), "--workload", "dirty", "--pattern", b.Pattern.String(),
		"--rate", strconv.FormatUint(b.Rates[0], 10), "--interval", FailoverInterval.String(),
		"--dirty-track", b.DirtyTrack.String(), "--quiet"}
	if b.HeartbeatTimeout != 0 {
		args = append(args, "--heartbeat-timeout", b.HeartbeatTimeout.String())
	}
	cmd := exec.Command(exe, args...)
	var out procout.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return run, fmt.Errorf("start the primary: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	alive := true
	defer func() {
		// Never leave the child behind, stopped or not.
		if alive {
			cmd.Process.Kill()
			<-exited
		}
	}()
	childErr := func(what string, werr error) error {
		return fmt.Errorf("%s: the primary exited (%v): %s", what, werr, out.String())
	}

	limit := setupTimeoutFor(mem)
	deadline := time.Now().Add(limit)
	for {
		if epoch, _ := bk.LastCheckpoint(); epoch >= failoverEpochs {
			break
		}
		if time.Now().After(deadline) {
			return run, fmt.Errorf("the backup holds no checkpoint %d after %v; primary: %s", failoverEpochs, limit, out.String())
		}
		select {
		case werr := <-exited:
			alive = false
			return run, childErr("before the failover", werr)
		case br := <-bdone:
			served = true
			return run, fmt.Errorf("the backup stopped before the primary was signalled: failover %v, %v; primary: %s", br.fo != nil, br.err, out.String())
		case <-ctx.Done():
			return run, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}

	t0 := time.Now()
	if err := cmd.Process.Signal(sig); err != nil {
		return run, fmt.Errorf("signal the primary: %w", err)
	}
	var br backupResult
	select {
	case br = <-bdone:
		served = true
	case <-time.After(b.failoverTimeout() + 30*time.Second):
		return run, errors.New("the backup did not fail over")
	case <-ctx.Done():
		return run, ctx.Err()
	}
	if sig == syscall.SIGSTOP {
		cmd.Process.Kill() // the frozen primary: never leave it behind
	}
	if br.err != nil {
		return run, fmt.Errorf("backup: %w", br.err)
	}
	if br.fo == nil {
		return run, errors.New("the backup returned without failing over")
	}
	rs := <-res
	tp := <-rs.progress
	rs.m.Close()
	if tp.IsZero() {
		return run, errors.New("the resumed guest made no progress in 10s")
	}
	run.Epoch = br.fo.Epoch
	run.DetectMS = toMS(rs.called.Add(-br.fo.Verify).Sub(t0))
	run.VerifyMS = toMS(br.fo.Verify)
	run.RestoreMS = toMS(rs.started.Sub(rs.called))
	run.FirstMS = toMS(tp.Sub(rs.started))
	run.TotalMS = toMS(tp.Sub(t0))
	return run, nil
}

// failoverSizeGoal compares the failover at the last of --failover-sizes
// with the first. What follows detection (verify, restore, first write)
// must not grow with memory: the same at both sizes (within
// goalFailoverSame, or goalFailoverSlack for times too short for a ratio)
// and at most goalFailoverAfter at each. Detection is what the heartbeat
// timeout or the kernel decides (a killed process's connection closes once
// its memory is torn down), so it is shown, not judged.
func failoverSizeGoal(fo *FailoverResult) Goal {
	first, last := fo.Sizes[0], fo.Sizes[len(fo.Sizes)-1]
	name := fmt.Sprintf("failover at %s vs %s", testvm.FormatSize(last.Mem), testvm.FormatSize(first.Mem))
	goal := fmt.Sprintf("(goal after detection: the same at both, within %.0f%% or %.0f ms, and <= %.0f ms)",
		100*(goalFailoverSame-1), toMS(goalFailoverSlack), toMS(goalFailoverAfter))
	if fo.SizeRatio == 0 {
		return Goal{Text: fmt.Sprintf("%s: not measured (a size was skipped or failed) %s: NOT MET", name, goal)}
	}
	same := last.AfterP50MS <= max(goalFailoverSame*first.AfterP50MS, first.AfterP50MS+toMS(goalFailoverSlack))
	ok := same && last.AfterP50MS <= toMS(goalFailoverAfter) && first.AfterP50MS <= toMS(goalFailoverAfter)
	return Goal{Met: ok, Text: fmt.Sprintf("%s: p50 %.0f ms / %.0f ms = %.2fx (detection %.0f ms / %.0f ms), after detection %.1f ms / %.1f ms = %.2fx %s: %s",
		name, last.KillP50MS, first.KillP50MS, fo.SizeRatio, last.DetectP50MS, first.DetectP50MS,
		last.AfterP50MS, first.AfterP50MS, fo.AfterRatio, goal, verdict(ok))}
}

func printFailover(w io.Writer, fo *FailoverResult) {
	fmt.Fprintf(w, "Failover: primary process at rate %s, interval %v, backup heartbeat timeout %v:\n\n", rateName(fo.Rate),
		FailoverInterval, time.Duration(fo.HeartbeatMS*float64(time.Millisecond)))
	var rows [][]string
	for i, r := range fo.Runs {
		sig := r.Signal
		if r.VerifyReplica {
			sig += ", verify"
		}
		if r.Error != "" {
			rows = append(rows, []string{strconv.Itoa(i + 1), testvm.FormatSize(r.Mem), sig, "-", "-", "-", "-", "-", "-", "FAILED: " + r.Error})
			continue
		}
		f := func(x float64) string { return fmt.Sprintf("%.1f", x) }
		rows = append(rows, []string{strconv.Itoa(i + 1), testvm.FormatSize(r.Mem), sig, strconv.FormatUint(r.Epoch, 10), f(r.DetectMS), f(r.VerifyMS),
			f(r.RestoreMS), f(r.FirstMS), f(r.TotalMS - r.DetectMS), f(r.TotalMS)})
	}
	table(w, []string{"run", "mem", "signal", "epoch", "detect ms", "verify ms", "restore ms", "first write ms", "after detect ms", "total ms"}, rows)
	fmt.Fprintln(w)
	frozen := fo.FrozenMS > 0
	for _, sz := range fo.Sizes {
		if sz.Skipped != "" {
			fmt.Fprintf(w, "failover at %s: skipped: %s\n", testvm.FormatSize(sz.Mem), sz.Skipped)
			continue
		}
		fmt.Fprintf(w, "failover (SIGKILL) at %s: p50 %.0f ms, max %.0f ms over %d runs; p50 detection %.1f ms, after it %.1f ms",
			testvm.FormatSize(sz.Mem), sz.KillP50MS, sz.KillMaxMS, sz.Kills, sz.DetectP50MS, sz.AfterP50MS)
		if frozen {
			hb := time.Duration(fo.HeartbeatMS * float64(time.Millisecond))
			fmt.Fprintf(w, "; frozen (SIGSTOP): timeout %v + %.0f ms", hb, fo.FrozenMS-fo.HeartbeatMS)
			frozen = false
		}
		if sz.VerifiedMS > 0 {
			fmt.Fprintf(w, "; with --verify-replica %.0f ms (digest %.1f ms)", sz.VerifiedMS, sz.VerifiedDigestMS)
		}
		fmt.Fprintln(w)
	}
	if fo.SizeRatio > 0 {
		first, last := fo.Sizes[0], fo.Sizes[len(fo.Sizes)-1]
		fmt.Fprintf(w, "failover %s / %s: p50 %.0f ms / %.0f ms = %.2fx; detection %.1f ms / %.1f ms; after detection %.1f ms / %.1f ms = %.2fx\n",
			testvm.FormatSize(last.Mem), testvm.FormatSize(first.Mem), last.KillP50MS, first.KillP50MS, fo.SizeRatio,
			last.DetectP50MS, first.DetectP50MS, last.AfterP50MS, first.AfterP50MS, fo.AfterRatio)
	}
}

// shells builds, as the backup command does, the VM a failover would
// restore once a session's first checkpoint arrives (BackupConfig.Prepare),
// and restores into it: what the failover figures measure is then what
// the backup command does.
type shells struct{ sh *testvm.Shell }

func (s *shells) prepare(cp *replicate.Checkpoint) error {
	s.close()
	sh, err := testvm.Prepare(cp.State, cp.Memory, testvm.RestoreOptions{})
	s.sh = sh
	return err
}

// restore restores cp, into the Shell built for its memory if there is one.
func (s *shells) restore(cp *replicate.Checkpoint) (*testvm.Machine, error) {
	if sh := s.sh; sh != nil && sh.Memory() == cp.Memory {
		s.sh = nil
		return sh.Restore(cp.State, testvm.RestoreOptions{})
	}
	return testvm.Restore(cp.State, cp.Memory, testvm.RestoreOptions{})
}

func (s *shells) close() {
	if s.sh != nil {
		s.sh.Close()
		s.sh = nil
	}
}
