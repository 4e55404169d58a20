package agent

// The backup command's output is read by tests and scripts (a randomized
// kill test among them), so these lines are stable. On stdout, in order:
//
//	listening on ADDR
//
// once, first: the address actually bound (so --listen 127.0.0.1:0 works).
// With --metrics, next:
//
//	metrics on http://ADDR/metrics
//
// with the address bound, likewise.
// While epochs arrive, unless --quiet, a line per second:
//
//	  3.0s  epoch 42  10.0 epochs/s  5.12k pages/epoch
//
// On failover, after restoring the VM and before starting it:
//
//	failover: epoch=N digest=DIGEST verified=true|false
//	resumed vcpu=I iterations=N writes=N counter=N hash=HASH
//
// one resumed line per vCPU, I from 0: the guest's status at the checkpoint,
// exact because the vCPUs have not run yet; DIGEST and HASH are 16 lower-case
// hex digits (DIGEST as in the primary's --stats file, HASH as in its note).
// verified=true (with --verify-replica) means the whole replica's memory was
// digested at failover and matched DIGEST; without it the replica is what
// every epoch's checks made it as it arrived (each page against its CRC, the
// epoch against its checksum and the primary's digest), and verified=false.
//
// With --disk, between the failover line and the resumed lines, when the
// guest runs the disk workload:
//
//	disk verified at epoch N: B blocks, W written, newest version V, guest writes G, batch in flight C completed P pending (X ms)
//
// the backup image checked, every block of the working set, against the
// guest's own record of its disk in the checkpoint's memory
// (testvm.VerifyDiskImage); if it does not match, the backup says "repagent
// backup: resume epoch N: disk image FILE does not hold the disk of epoch N,
// refusing to resume: verify disk: ..." on stderr, resumes nothing and exits
// with 1. For other workloads, which keep no record, and with --skip-verify,
// the line is "disk at epoch N: image FILE brought to the checkpoint (not
// verified: WHY)". After the resumed lines, for the disk workload:
//
//	resumed disk writes=N reads=N flushes=N errors=N
//
// the guest's block writes, verified reads, flushes and errors at the
// checkpoint; its progress lines then carry "verified reads N  errors N",
// and the summary checks the image again after the guest ran on.
//
// Then, once the VM runs:
//
//	failover took X ms (verify Y ms, restore Z ms)
//
// then progress lines as `repagent vm` prints them, and after
// --run-after-failover (or at Ctrl-C) the summary of `repagent vm`, which
// checks the guest (its pages, or its counters' hash chains), and last:
//
//	verification passed
//
// or, on stderr, "repagent backup: verify ...: ..." and exit code 1.
//
// Without a failover the last line is one of:
//
//	primary stopped replication; nothing to fail over    (exit code 0)
//	stopped before any failover                          (Ctrl-C; exit code 0)
//
// and a primary lost before its first checkpoint completed gives, on stderr,
// "repagent backup: primary lost before its first checkpoint: ..." and exit
// code 3. Other errors exit with 1, usage errors with 2. Messages of the
// replication engine go to stderr (log/slog text).
//
// What a test compares these lines with comes from the primary (primary.go):
// its --stats file has one JSON object per line for each acknowledged epoch,
// in epoch order, written and flushed when the ack arrives (see
// replicate.EpochStats.MarshalJSON), among them "epoch", "digest" (16 hex
// digits, as DIGEST above) and "note": one object per vCPU with "vcpu",
// "iterations", "writes", "counter" and "hash" (16 hex digits), read in the
// epoch's pause, so equal to the resumed lines of a failover to that epoch.
// A failover resumes an epoch no older than the last line. Losing the backup
// makes the primary print "repagent primary: backup lost: VM running
// UNPROTECTED: CAUSE" on stderr and go on (exit code 0). REPAGENT_FAULT, which
// kills either side at an exact point, is described in options.go.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/faultpoint"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/metrics"
	"github.com/repagent/repagent/replicate/protect"
	"github.com/repagent/repagent/testvm"
)

// testVMShape is the shape a primary running the test VM with mem bytes and
// vcpus vCPUs declares: the test VM's memory slots, as its DirtySlots lists
// them (the engine's VM contract). It builds such a VM, without running it, to
// read them: the slot layout is testvm's to decide.
func testVMShape(mem uint64, vcpus int) (replicate.Shape, error) {
	m, err := testvm.New(testvm.Config{MemSize: mem, VCPUs: vcpus, Workload: testvm.Idle})
	if err != nil {
		return replicate.Shape{}, fmt.Errorf("expected shape: %w", err)
	}
	defer m.Close()
	s := replicate.Shape{VCPUs: uint32(m.NumVCPUs())}
	for _, slot := range m.DirtySlots() {
		s.Regions = append(s.Regions, replicate.Region{Slot: slot.ID, GPA: slot.GPA, Size: slot.Size})
		s.MemSize += slot.Size
	}
	return s, nil
}

// backupProgress counts the checkpoints applied, for the per-second lines
// (and, with --metrics, for metrics).
type backupProgress struct {
	mu     sync.Mutex
	epochs uint64 // applied in the current second
	pages  uint64
	last   uint64 // the latest epoch applied
	any    bool

	metrics *metrics.BackupCollector // with --metrics; nil ignores it
}

func (p *backupProgress) onEpoch(epoch uint64, pages int, _ uint64) {
	p.mu.Lock()
	p.epochs++
	p.pages += uint64(pages)
	p.last = epoch
	p.any = true
	p.mu.Unlock()
}

// line returns the second's line (nil before the first checkpoint) and
// starts the next second.
func (p *backupProgress) line(elapsed time.Duration, secs float64) *string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.any {
		return nil
	}
	dirty := "-"
	if p.epochs > 0 {
		dirty = si(float64(p.pages) / float64(p.epochs))
	}
	s := fmt.Sprintf("%6.1fs  epoch %d  %.1f epochs/s  %s pages/epoch", elapsed.Seconds(), p.last, float64(p.epochs)/secs, dirty)
	p.epochs, p.pages = 0, 0
	return &s
}

// Run serves primaries until one stops on purpose or is lost; on a loss it
// resumes the VM, runs it and verifies it.
func (o *BackupJob) Run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) error {
	log := NewLogger(stderr, o.Quiet)
	cfg := replicate.BackupConfig{
		NewMemory:        testvm.NewMemFile,
		HeartbeatTimeout: o.HeartbeatTimeout,
		VerifyReplica:    o.VerifyReplica,
		Log:              log,
		TLS:              o.TLS,
		Once:             o.Once,
	}
	pc := protect.BackupConfig{Tap: o.Tap, OnAnnounce: func(tap string, mac net.HardwareAddr, ip netip.Addr, err error) {
		if err != nil {
			log.Error("announce the resumed guest", "tap", tap, "err", err)
			return
		}
		fmt.Fprintf(stdout, "announced mac=%s ip=%s on %s\n", mac, ip, tap)
	}}
	if o.ExpectMem != 0 {
		shape, err := testVMShape(o.ExpectMem, o.ExpectVCPUs)
		if err != nil {
			return err
		}
		cfg.Expect = &shape
	}
	var hook faultpoint.Func
	if f := o.Fault; f != nil {
		hook = func(point string, epoch uint64) {
			if point == f.Point && epoch == f.N {
				log.Warn("fault injection: killing the primary mid-apply", "pid", f.KillPID, "epoch", epoch)
				if err := syscall.Kill(f.KillPID, syscall.SIGKILL); err != nil {
					log.Error("fault injection: kill", "pid", f.KillPID, "err", err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	var (
		resumed *testvm.Machine
		first   snapshot
		shell   *testvm.Shell // built for the current session's failover (Prepare)
	)
	defer func() {
		if shell != nil {
			shell.Close()
		}
	}()
	var disk *os.File
	defer func() {
		if disk != nil {
			disk.Close() // after the backup's Close
		}
	}()
	var (
		fz *fencer
		b  *protect.Backup
	)
	if o.Fencing != nil {
		var err error
		if fz, err = newFencer(o.Fencing, log); err != nil {
			return err
		}
		defer fz.close() // after the backup's Close, which gives the VM up
		pc.Fence = &fz.fence
	}
	// With --reprotect-to, the resumed VM is protected in turn: rp is its
	// replicator, as a primary's, over the VM and the Primary the failover
	// makes.
	var rp *replicator
	if o.ReprotectTo != "" {
		rp = &replicator{name: "repagent backup", stdout: stdout, stderr: stderr, log: log, mech: dirtylog.Auto, fencer: fz,
			o: Repl{Interval: o.ReprotectInterval, Mech: dirtylog.Auto, HeartbeatTimeout: o.HeartbeatTimeout, TLS: o.ReprotectTLS,
				Quiet: o.Quiet, Duration: o.RunAfter}}
		ec := rp.engineConfig()
		ec.OnStreamSync = rp.onDiskSync
		pc.Reprotect = &protect.Config{Engine: ec, Gate: ebpf.Config{ReleaseCPU: ebpf.AutoCPU, OnEpoch: rp.onGateEpoch}}
	}
	if o.Disk != "" {
		var err error
		if disk, err = os.OpenFile(o.Disk, os.O_RDWR, 0); err != nil {
			return fmt.Errorf("open disk image: %w", err)
		}
		pc.Disk = disk
	}
	pc.Restore = func(cp *replicate.Checkpoint, dev protect.Devices) (*protect.Restored, error) {
		st, err := testvm.DecodeState(cp.State)
		if err != nil {
			cp.Memory.Close()
			return nil, err
		}
		opts := testvm.RestoreOptions{Console: stderr}
		if st.Config.Net != nil && dev.Tap != nil {
			opts.Tap = dev.Tap
		} else if st.Config.Net != nil {
			log.Warn("the guest has a network device but no --tap was given: it resumes with its cable unplugged")
		}
		var diskLine string
		if st.Config.Disk != nil {
			// The engine refuses a primary with a disk unless this backup
			// has one: the image now holds the checkpoint's disk.
			if disk == nil {
				cp.Memory.Close()
				return nil, errors.New("the guest has a block device and this backup no --disk")
			}
			if diskLine, err = o.checkDisk(cp, st.Config, disk); err != nil {
				cp.Memory.Close()
				return nil, err
			}
			opts.DiskIO = dev.Disk // the image, or with --reprotect-to the mirror over it
		}
		var m *testvm.Machine
		if sh := shell; sh != nil && sh.Memory() == cp.Memory {
			shell = nil
			m, err = sh.Restore(cp.State, opts) // built while the primary ran
		} else {
			m, err = testvm.Restore(cp.State, cp.Memory, opts)
		}
		if err != nil {
			cp.Memory.Close() // Restore leaves it ours on error
			return nil, err
		}
		if fz != nil {
			fz.printOwner(stdout, b.Ownership())
		}
		fmt.Fprintf(stdout, "failover: epoch=%d digest=%s verified=%s\n", cp.Epoch, replicate.FormatDigest(cp.Digest), strconv.FormatBool(cp.Verified))
		if diskLine != "" {
			fmt.Fprintln(stdout, diskLine)
		}
		for i := 0; i < m.NumVCPUs(); i++ {
			st := m.Status(i)
			fmt.Fprintf(stdout, "resumed vcpu=%d iterations=%d writes=%d counter=%d hash=%016x\n", i, st.Iterations, st.Writes, st.Counter, st.Hash)
		}
		if st.Config.Workload == testvm.Disk {
			s := m.Status(0)
			fmt.Fprintf(stdout, "resumed disk writes=%d reads=%d flushes=%d errors=%d\n", s.DiskWrites, s.DiskReads, s.DiskFlushes, s.DiskErrors)
		}
		first = totals(m)
		r := &protect.Restored{Start: func() error {
			if err := m.Start(); err != nil {
				m.Close()
				return err
			}
			resumed = m
			return nil
		}}
		if n := st.Config.Net; n != nil && opts.Tap != nil {
			// The network learns where the VM is now, before it speaks:
			// switches move its MAC to this port, neighbours refresh their
			// entries.
			r.MAC, r.IP = n.MAC, n.IP
		}
		return r, nil
	}
	progress := &backupProgress{metrics: newBackupMetrics(o.Metrics)}
	cfg.OnEpoch = progress.onEpoch
	// The VM a failover would restore is built once a session's first
	// checkpoint arrives: the failover then only loads its state.
	cfg.Prepare = func(cp *replicate.Checkpoint) error {
		if shell != nil {
			shell.Close()
			shell = nil
		}
		sh, err := testvm.Prepare(cp.State, cp.Memory, testvm.RestoreOptions{Console: stderr})
		if err != nil {
			return err
		}
		shell = sh
		return nil
	}
	pc.Engine, pc.Metrics = cfg, progress.metrics
	var err error
	b, err = protect.NewBackup(pc)
	if err != nil {
		return err
	}
	defer b.Close() // after the resumed machine's: it uses the tap
	if hook != nil {
		defer faultpoint.Attach(b.Engine(), hook)()
	}

	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	fmt.Fprintf(stdout, "listening on %s\n", ln.Addr())
	stopMetrics, err := serveMetrics(ctx, o.Metrics, stdout, progress.metrics)
	if err != nil {
		ln.Close()
		return err
	}
	defer stopMetrics()
	type result struct {
		fo  *replicate.Failover
		err error
	}
	done := make(chan result, 1)
	go func() {
		fo, err := b.Serve(ctx, ln)
		done <- result{fo, err}
	}()
	var res result
	t0 := time.Now()
	prevT := t0
	tick := time.NewTicker(time.Second)
	for waiting := true; waiting; {
		select {
		case res = <-done:
			waiting = false
		case now := <-tick.C:
			if line := progress.line(now.Sub(t0), now.Sub(prevT).Seconds()); line != nil && !o.Quiet {
				fmt.Fprintln(stdout, *line)
			}
			prevT = now
		}
	}
	tick.Stop()
	if resumed != nil {
		defer resumed.Close()
	}
	switch fo, err := res.fo, res.err; {
	case errors.Is(err, replicate.ErrPrimaryStopped):
		fmt.Fprintln(stdout, "primary stopped replication; nothing to fail over")
		return nil
	case err != nil && ctx.Err() != nil && resumed == nil:
		fmt.Fprintln(stdout, "stopped before any failover")
		return nil
	case err != nil:
		return err
	default:
		fmt.Fprintf(stdout, "failover took %s (verify %s, restore %s)\n", ms(fo.Took), ms(fo.Verify), ms(fo.Restore))
	}

	if rp != nil {
		if prim := b.Primary(); prim != nil {
			defer prim.Close() // after the resumed machine's, before the backup's
			if err := o.reprotect(ctx, rp, resumed, prim, stopSignals); err == nil || !errors.Is(err, errNoNextBackup) {
				return err
			}
		}
	}
	vo := &VMJob{Duration: o.RunAfter, Quiet: o.Quiet}
	t1 := time.Now()
	wctx := ctx
	if own := b.Ownership(); own != nil {
		// The resumed VM's output passes unheld: it must stop the moment
		// this backup no longer knows it owns the VM.
		var cancel context.CancelFunc
		wctx, cancel = context.WithCancel(ctx)
		defer cancel()
		go func() {
			select {
			case <-own.Lost():
				cancel()
			case <-wctx.Done():
			}
		}()
	}
	if err := vo.watch(wctx, resumed, t1, stdout); err != nil {
		return err
	}
	if own := b.Ownership(); own != nil && own.Cause() != nil && ctx.Err() == nil {
		fe := &replicate.FencedError{Cause: fmt.Errorf("lease lost while running the resumed VM: %w", own.Cause()), LastCommitted: res.fo.Epoch, At: time.Now()}
		log.Error("FENCED: pausing the resumed VM", "cause", own.Cause())
		if err := resumed.Pause(); err != nil {
			return errors.Join(fe, fmt.Errorf("pause the fenced VM: %w", err))
		}
		fz.printFenced(stdout, fe)
		return fe
	}
	stopSignals()
	if err := resumed.Pause(); err != nil {
		return err
	}
	if err := summarize(stdout, resumed, first, time.Since(t1)); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "verification passed")
	return nil
}

// errNoNextBackup: --reprotect-to's backup did not answer; the resumed VM
// runs unprotected.
var errNoNextBackup = errors.New("the next backup did not answer")

// reprotect protects the resumed VM to --reprotect-to, as the primary
// command protects its VM, until --run-after-failover or Ctrl-C, then stops
// replication and verifies the guest.
func (o *BackupJob) reprotect(ctx context.Context, r *replicator, m *testvm.Machine, prim *protect.Primary, stopSignals func()) error {
	r.m, r.cfg, r.prot, r.gate, r.mirror = m, m.Config(), prim, prim.Gate(), prim.Disk()
	if r.fencer != nil {
		r.redial = func(ctx context.Context) (net.Conn, error) { return dialBackup(ctx, o.ReprotectTo, time.Second) }
	}
	conn, err := dialBackup(ctx, o.ReprotectTo, 10*time.Second)
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		fmt.Fprintf(r.stderr, "repagent backup: protect the resumed VM: %v: it runs UNPROTECTED\n", err)
		return errNoNextBackup
	}
	fmt.Fprintf(r.stdout, "protecting the resumed VM: backup %s\n", o.ReprotectTo)
	lost, err := r.protect(ctx, conn, stopSignals)
	if err != nil {
		return err
	}
	if err := r.finish(r.stdout, lost); err != nil {
		return err
	}
	fmt.Fprintln(r.stdout, "verification passed")
	return nil
}

// checkDisk checks, before the guest of checkpoint cp (with config c)
// resumes, that the disk image holds exactly the disk of the checkpoint: for
// the disk workload, block by block against the guest's records in the
// checkpoint's memory. It returns the line to print, or an error that stops
// the failover.
func (o *BackupJob) checkDisk(cp *replicate.Checkpoint, c testvm.Config, disk *os.File) (string, error) {
	switch {
	case o.SkipVerify:
		return fmt.Sprintf("disk at epoch %d: image %s brought to the checkpoint (not verified: --skip-verify)", cp.Epoch, o.Disk), nil
	case c.Workload != testvm.Disk:
		return fmt.Sprintf("disk at epoch %d: image %s brought to the checkpoint (not verified: the %s workload keeps no record of its disk)",
			cp.Epoch, o.Disk, c.Workload), nil
	}
	t0 := time.Now()
	line, err := verifyDiskLine(cp.Memory, disk)
	if err != nil {
		return "", fmt.Errorf("disk image %s does not hold the disk of epoch %d, refusing to resume: %w", o.Disk, cp.Epoch, err)
	}
	return fmt.Sprintf("disk verified at epoch %d: %s (%s)", cp.Epoch, line, ms(time.Since(t0))), nil
}

// ms formats a duration in milliseconds with one decimal: "12.3 ms".
func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/1e6) }
