package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/epochstat"
	"github.com/repagent/repagent/internal/faultpoint"
	"github.com/repagent/repagent/internal/track"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/metrics"
	"github.com/repagent/repagent/replicate/protect"
	"github.com/repagent/repagent/testvm"
)

// VMMName is how the primary names its VMM to the backup.
const VMMName = "repagent testvm"

// NewLogger returns the engine's logger: text on stderr, info level, or warn
// with --quiet.
func NewLogger(stderr io.Writer, quiet bool) *slog.Logger {
	level := slog.LevelInfo
	if quiet {
		level = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
}

// replicator is the primary side of the main job and of the primary command:
// a test VM protected by a replicate.Primary, with the sync and status lines,
// the stats file and the summary.
type replicator struct {
	o      Repl
	cfg    testvm.Config
	mech   dirtylog.Mechanism // what is asked of the engine (Auto resolved)
	auto   bool               // mech was picked by --dirty-track auto
	stdout io.Writer
	stderr io.Writer
	log    *slog.Logger
	fault  *Fault
	name   string // the command, for messages on stderr: "repagent", "repagent primary"
	// metrics, with --metrics, is fed from the callbacks (nil ignores it).
	metrics *metrics.PrimaryCollector
	// fencer, with --etcd, makes the VM's ownership a lease in etcd, and
	// redial reaches the backup again after it was lost.
	fencer *fencer
	redial func(context.Context) (net.Conn, error)
	// migrate, for the migrate command: the first epoch acknowledged
	// switchoverAfter after the first asks the engine for a handover.
	migrate         bool
	switchoverAfter time.Duration
	firstAck        time.Time
	handoverErr     error // Handover's refusal

	m *testvm.Machine
	p *replicate.Primary

	// prot joins the engine, the output gate on the guest's tap and the
	// mirror on its disk (package protect); gate and mirror are its, nil
	// without a tap or a disk. netDo runs code in the tap's network
	// namespace (nil: this process's); pcap is where released frames go
	// (--pcap).
	prot    *protect.Primary
	netDo   func(func() error) error
	gate    *ebpf.Gate
	pcap    *os.File
	netMu   sync.Mutex
	netWin  netAgg // gate epochs ended this second
	netPrev ebpf.Stats
	client  *echoClient // the main job's client, if it built its network
	first   snapshot    // the guest's counts when replication began
	t0      time.Time

	// The guest's disk, with a block device: its image (o.disk) and the
	// Mirror the guest writes it through.
	diskFile *os.File
	mirror   *diskmirror.Mirror

	mu        sync.Mutex // guards what follows: the engine reports from its goroutines
	window    epochAgg   // acknowledged this second
	total     epochAgg   // acknowledged this run
	initSync  syncAgg
	synced    bool
	syncDone  time.Time // when the initial sync ended
	stats     *os.File
	statsBuf  *bufio.Writer
	statsErr  error
	lastAcked *replicate.EpochStats
	diskSync  []replicate.StreamSyncProgress // the disk sync's phases, in order
}

// syncAgg sums up the initial sync.
type syncAgg struct {
	rounds    int
	pages     uint64
	wire      uint64
	elapsed   time.Duration
	remaining int
}

// newReplicator resolves the dirty tracking mechanism (it fixes how the VM is
// built) and creates the stats file.
func newReplicator(name string, o Repl, cfg testvm.Config, stdout, stderr io.Writer, flt *Fault) (*replicator, error) {
	r := &replicator{name: name, o: o, cfg: cfg, stdout: stdout, stderr: stderr, log: NewLogger(stderr, o.Quiet), fault: flt}
	r.mech, r.cfg.DirtyRingEntries = o.Mech, 0
	switch o.Mech {
	case dirtylog.Ring:
		r.cfg.DirtyRingEntries = track.RingEntries
	case dirtylog.Auto:
		mech, entries, err := track.Recommend(cfg, o.Interval)
		if err != nil {
			return nil, err
		}
		r.mech, r.cfg.DirtyRingEntries, r.auto = mech, entries, true
	}
	if o.Metrics != "" {
		r.metrics = metrics.NewPrimaryCollector()
	}
	if o.Stats != "" {
		f, err := os.Create(o.Stats)
		if err != nil {
			return nil, fmt.Errorf("create stats file: %w", err)
		}
		r.stats, r.statsBuf = f, bufio.NewWriter(f)
	}
	return r, nil
}

// start opens the guest's devices through protect (the tap and its gate in
// the tap's namespace, the disk's mirror), builds the VM over them, starts
// it and waits for its guest to be ready.
func (r *replicator) start(ctx context.Context) error {
	pc := protect.Config{Engine: r.engineConfig(), InNamespace: r.netDo, Metrics: r.metrics}
	if r.o.Tap != "" {
		pc.Tap = r.o.Tap
		pc.Gate = ebpf.Config{HoldLimit: int(r.o.HoldLimit), ReleaseCPU: ebpf.AutoCPU, OnEpoch: r.onGateEpoch}
		if r.o.Pcap != "" {
			f, err := os.Create(r.o.Pcap)
			if err != nil {
				return fmt.Errorf("create pcap file: %w", err)
			}
			r.pcap, pc.Gate.Pcap = f, f
		}
	}
	if r.cfg.Disk != nil {
		f, err := openDisk(r.o.Disk, r.cfg.Disk.Blocks)
		if err != nil {
			return err
		}
		r.diskFile, pc.Disk = f, f
		if r.cfg.Workload == testvm.Disk {
			// A guest that runs the disk workload starts from an empty disk.
			if err := eraseDisk(f, int64(r.cfg.Disk.Blocks*testvm.DiskBlockSize)); err != nil {
				return err
			}
		}
	}
	if r.fencer != nil {
		pc.Fence = &r.fencer.fence
	}
	prot, err := protect.NewPrimary(pc)
	if err != nil {
		return err
	}
	r.prot, r.gate, r.mirror = prot, prot.Gate(), prot.Disk()
	if r.fencer != nil {
		r.fencer.printOwner(r.stdout, prot.Ownership())
	}
	cfg := r.cfg
	cfg.Console = r.stderr
	if r.gate != nil {
		cfg.Tap = prot.Tap()
	}
	if r.mirror != nil {
		cfg.DiskIO = r.mirror
	}
	m, err := testvm.New(cfg)
	if err != nil {
		return err
	}
	r.m = m
	if err := m.Start(); err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	if err := m.WaitReady(rctx); err != nil {
		return err
	}
	how := ""
	if r.auto {
		how = " (auto)"
	}
	if !r.o.Quiet {
		fmt.Fprintf(r.stdout, "guest ready: %s, interval %v, dirty tracking %v%s\n", describe(m.Config()), r.o.Interval, r.mech, how)
	}
	return nil
}

// close closes the VM, the network and the stats file.
func (r *replicator) close() error {
	var err error
	if r.m != nil {
		err = r.m.Close()
	}
	if r.prot != nil {
		err = errors.Join(err, r.prot.Close()) // after the machine, which used the tap
	}
	if r.diskFile != nil {
		r.diskFile.Close() // after the machine, which wrote it
	}
	if r.pcap != nil {
		if cerr := r.pcap.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("write pcap file %s: %w", r.o.Pcap, cerr))
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stats != nil {
		if ferr := r.statsBuf.Flush(); ferr != nil && r.statsErr == nil {
			r.statsErr = ferr
		}
		if cerr := r.stats.Close(); cerr != nil && r.statsErr == nil {
			r.statsErr = cerr
		}
		r.stats = nil
		if r.statsErr != nil && err == nil {
			err = fmt.Errorf("write stats file %s: %w", r.o.Stats, r.statsErr)
		}
	}
	return err
}

// VCPUNote is what the guest of one vCPU had done at an epoch boundary: the
// primary's Config.Note, recorded in the stats file.
type VCPUNote struct {
	VCPU       int    `json:"vcpu"`
	Iterations uint64 `json:"iterations"`
	Writes     uint64 `json:"writes"`
	Counter    uint64 `json:"counter"`
	Hash       string `json:"hash"`
}

// note reads every vCPU's status; the engine calls it in each pause, when the
// status is exact.
func (r *replicator) note() any {
	out := make([]VCPUNote, r.m.NumVCPUs())
	for i := range out {
		st := r.m.Status(i)
		out[i] = VCPUNote{VCPU: i, Iterations: st.Iterations, Writes: st.Writes, Counter: st.Counter, Hash: fmt.Sprintf("%016x", st.Hash)}
	}
	return out
}

// engineConfig is the engine's configuration; protect adds the VM, the gate
// and the disk's stream.
func (r *replicator) engineConfig() replicate.Config {
	cfg := replicate.Config{
		Interval:           r.o.Interval,
		DirtyTrack:         r.mech,
		Workers:            r.o.Workers,
		Compress:           r.o.Compress,
		CopyThreads:        r.o.CopyThreads,
		Capture:            r.o.Capture,
		CaptureCalibration: r.o.CaptureCalib,
		TLS:                r.o.TLS,
		PrecopyThreshold:   r.o.SyncThreshold,
		SyncPause:          r.o.SyncPause,
		NoThrottle:         r.o.NoThrottle,
		StagingBytes:       r.o.Staging,
		HeartbeatTimeout:   r.o.HeartbeatTimeout,
		AuditEvery:         r.o.AuditEvery,
		Note:               r.note,
		OnEpoch:            r.onEpoch,
		OnSync:             r.onSync,
		VMM:                VMMName,
		Log:                r.log,
	}
	if r.cfg.Disk != nil {
		cfg.OnStreamSync = r.onDiskSync
	}
	return cfg
}

// protect makes the engine for the started VM and replicates it over conn
// (replicate), then stops the signals: what a second Ctrl-C interrupts from
// then on is the verification.
func (r *replicator) protect(ctx context.Context, conn net.Conn, stopSignals func()) (lost, err error) {
	if err := r.newPrimary(); err != nil {
		conn.Close()
		return nil, err
	}
	lost, err = r.replicate(ctx, conn)
	stopSignals()
	return lost, err
}

// newPrimary makes the engine for the started VM.
func (r *replicator) newPrimary() error {
	p, err := r.prot.Protect(r.m)
	if err != nil {
		return err
	}
	if r.fault != nil {
		faultpoint.Attach(p, r.hook) // for the process's life: it dies at the point
	}
	r.p = p
	return nil
}

// hook is the fault injection of REPAGENT_FAULT: at its point and epoch the
// process dies at once, as if its host lost power, with the stats file
// flushed so that a test knows what was acknowledged.
func (r *replicator) hook(point string, epoch uint64) {
	if point != r.fault.Point || epoch != r.fault.N {
		return
	}
	r.mu.Lock()
	if r.statsBuf != nil {
		r.statsBuf.Flush()
	}
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // SIGKILL is on its way; nothing else may happen
}

func (r *replicator) onEpoch(s *replicate.EpochStats) {
	if r.migrate {
		// Once synced and protected (and after --switchover-after), the
		// next pause is the last.
		if r.firstAck.IsZero() {
			r.firstAck = time.Now()
		}
		if time.Since(r.firstAck) >= r.switchoverAfter && r.handoverErr == nil {
			if err := r.p.Handover(); err != nil {
				r.handoverErr = err
				fmt.Fprintf(r.stderr, "%s: migration refused: %v; the VM stays here, protected by the destination\n", r.name, err)
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.window.Add(s)
	r.total.Add(s)
	r.lastAcked = s
	if r.statsBuf == nil || r.statsErr != nil {
		return
	}
	b, err := json.Marshal(s)
	if err == nil {
		b = append(b, '\n')
		if _, err = r.statsBuf.Write(b); err == nil {
			err = r.statsBuf.Flush()
		}
	}
	if err != nil {
		r.statsErr = err
		r.log.Error("write stats file: no more epochs are recorded", "file", r.o.Stats, "err", err)
	}
}

func (r *replicator) onSync(s replicate.SyncProgress) {
	r.mu.Lock()
	r.initSync.rounds++
	r.initSync.pages += uint64(s.Pages)
	r.initSync.wire += s.WireBytes
	r.initSync.elapsed = s.Elapsed
	r.initSync.remaining = s.Remaining
	r.synced = s.Done
	if s.Done {
		r.syncDone = time.Now()
	}
	r.mu.Unlock()
	if r.o.Quiet {
		return
	}
	line := fmt.Sprintf("sync round %d: %d pages, %.1f MB (wire %.1f MB), %.1f MB/s, %d dirty remaining",
		s.Round, s.Pages, float64(s.Pages)*replicate.PageSize/1e6, float64(s.WireBytes)/1e6, s.Rate()/1e6, s.Remaining)
	if s.Throttle > 0 {
		line += fmt.Sprintf(", vCPUs throttled %.0f%% (held %s)", 100*s.Throttle, dur(s.Held))
	}
	if s.PauseEstimate > 0 {
		line += fmt.Sprintf(", pause estimate %s", dur(s.PauseEstimate))
	}
	if s.Done {
		line += fmt.Sprintf("; synced in %v (%v), first checkpoint follows", s.Elapsed.Round(time.Millisecond), s.End)
	}
	fmt.Fprintln(r.stdout, line)
}

// onDiskSync records a phase of the disk sync and prints it, e.g.
//
//	disk sync precopy: 64 blocks, 60 identical, 4 sent, 4.19MB (wire 4.19MB), 1 round, 12.3ms, 2 dirty
//	disk sync catch-up: 2 sent, 2.10MB (wire 2.10MB), 1 round, 3.20ms, 1 dirty
//	disk sync residual: 1 sent, 1.05MB (wire 1.05MB), 1 round, 1.10ms
//
// "dirty" is the blocks written meanwhile, left for the next phase.
func (r *replicator) onDiskSync(s replicate.StreamSyncProgress) {
	r.mu.Lock()
	r.diskSync = append(r.diskSync, s)
	r.mu.Unlock()
	if !r.o.Quiet {
		fmt.Fprintln(r.stdout, diskSyncLine(s))
	}
}

// diskSyncLine formats a phase of the disk sync.
func diskSyncLine(s replicate.StreamSyncProgress) string {
	rounds := "rounds"
	if s.Rounds == 1 {
		rounds = "round"
	}
	line := "disk sync " + s.Phase.String() + ": "
	if s.Units > 0 {
		// The pre-copy compares the whole image with the backup's.
		line += fmt.Sprintf("%d blocks, %d identical, ", s.Units, s.Unchanged)
	}
	line += fmt.Sprintf("%d sent, %s (wire %s), %d %s, %s",
		s.Sent, bytesSI(float64(s.Bytes)), bytesSI(float64(s.WireBytes)), s.Rounds, rounds, dur(s.Took))
	if s.Left > 0 {
		line += fmt.Sprintf(", %d dirty", s.Left)
	}
	return line
}

// replicate runs the engine over conn until the duration is over or ctx
// ends, printing a status line every second, then stops replication (the
// engine waits for the acks and says bye). If the backup was lost, it says so
// loudly on stderr, keeps the guest running, unprotected, to the end, and
// returns the loss as lost. err is anything else that went wrong.
func (r *replicator) replicate(ctx context.Context, conn net.Conn) (lost, err error) {
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	r.t0 = time.Now()
	r.first = totals(r.m)
	go func() { done <- r.prot.RunConn(runCtx, conn) }()

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var end <-chan time.Time
	if r.o.Duration > 0 {
		t := time.NewTimer(r.o.Duration)
		defer t.Stop()
		end = t.C
	}
	prev, prevT := r.first, r.t0
	// ownLost is the lease's loss, watched while the VM runs unprotected
	// (before, the engine fences on it).
	var ownLost <-chan struct{}
	// reconn, with fencing, delivers a new connection to the backup after
	// it was lost: the VM is then protected again (a new session).
	var reconn chan net.Conn
	reprotecting := false
	// runEnded handles Run's return: a lost backup is reported and lived with.
	runEnded := func(rerr error) error {
		done = nil
		if fe, ok := errors.AsType[*replicate.FencedError](rerr); ok {
			r.fencer.printFenced(r.stdout, fe)
			return rerr
		}
		if r.machineStopped() != nil {
			return r.machineStopped()
		}
		if r.migrate && rerr == nil && r.p.HandedOver() != nil {
			return errHandedOver
		}
		if he, ok := errors.AsType[*replicate.HandoverError](rerr); ok && he.Unconfirmed {
			return rerr // the VM stays paused: it may run on the destination
		}
		if r.migrate && rerr != nil && !errors.Is(rerr, replicate.ErrBackupLost) {
			// The destination refused: the VM runs on here, as after a
			// lost backup.
			fmt.Fprintf(r.stderr, "%s: migration failed: %v\n", r.name, rerr)
			rerr = &replicate.BackupLostError{Cause: rerr}
		}
		if reprotecting && !errors.Is(rerr, replicate.ErrBackupLost) && rerr != nil {
			// Protecting the VM again failed (the backup refused, or the
			// link broke before the session began): it runs on
			// unprotected, and the next attempt follows.
			fmt.Fprintf(r.stderr, "%s: protecting the VM again failed: %v\n", r.name, rerr)
			rerr = &replicate.BackupLostError{Cause: rerr}
		}
		if errors.Is(rerr, replicate.ErrBackupLost) {
			if own := r.prot.Ownership(); own != nil {
				ownLost = own.Lost()
				if r.redial != nil {
					reconn = make(chan net.Conn, 1)
					go r.reconnect(runCtx, reconn)
				}
			}
			lost = rerr
			fmt.Fprintf(r.stderr, "%s: backup lost: VM running UNPROTECTED: %v\n", r.name, lostCause(rerr))
			return nil
		}
		return rerr
	}
	for running := true; running; {
		select {
		case <-ctx.Done():
			running = false
		case <-end:
			running = false
		case rerr := <-done:
			if err := runEnded(rerr); err != nil {
				if err == errHandedOver {
					return nil, nil
				}
				return lost, err
			}
			if lost == nil {
				// Run returns nil only once runCtx ends, which it has not.
				return nil, errors.New("replication stopped unexpectedly")
			}
		case <-r.m.Done():
			cancel()
			if done != nil {
				<-done
			}
			return lost, r.machineStopped()
		case <-ownLost:
			return lost, r.fenceUnprotected()
		case c := <-reconn:
			reconn = nil
			if err := r.newPrimary(); err != nil {
				c.Close()
				return lost, fmt.Errorf("protect the VM again: %w", err)
			}
			r.mu.Lock()
			r.synced = false
			r.mu.Unlock()
			fmt.Fprintf(r.stdout, "backup reachable again at %s: protecting the VM again (a new session, from a new sync)\n", c.RemoteAddr())
			lost, ownLost, reprotecting = nil, nil, true
			done = make(chan error, 1)
			go func() { done <- r.prot.RunConn(runCtx, c) }()
		case now := <-tick.C:
			cur := totals(r.m)
			secs := now.Sub(prevT).Seconds()
			line := r.statusLine(now, secs, float64(cur.ops-prev.ops)/secs, lost != nil)
			if !r.o.Quiet && line != nil {
				fmt.Fprintln(r.stdout, line)
			}
			prev, prevT = cur, now
		}
	}
	cancel()
	if done != nil {
		if err := runEnded(<-done); err != nil {
			if err == errHandedOver {
				return nil, nil
			}
			return lost, err
		}
	}
	return lost, nil
}

// errHandedOver ends replicate: the VM was handed over (migrate).
var errHandedOver = errors.New("handed over")

// reconnect dials the backup until it answers (or ctx ends) and delivers
// the connection on ch.
// Attempts are a second apart, the first a second after the loss.
func (r *replicator) reconnect(ctx context.Context, ch chan<- net.Conn) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
		if c, err := r.redial(ctx); err == nil {
			ch <- c
			return
		}
	}
}

// fenceUnprotected fences the VM that ran on unprotected (its output
// passing unheld) when its lease is lost: it pauses it and says so.
func (r *replicator) fenceUnprotected() error {
	at := time.Now()
	own := r.prot.Ownership()
	fe := &replicate.FencedError{Cause: fmt.Errorf("lease lost while running unprotected: %w", own.Cause()), LastCommitted: r.p.LastAcked(), At: at}
	r.log.Error("FENCED: pausing the VM, which ran unprotected", "cause", own.Cause())
	if err := r.m.Pause(); err != nil {
		return errors.Join(fe, fmt.Errorf("pause the fenced VM: %w", err))
	}
	r.fencer.printFenced(r.stdout, fe)
	return fe
}

// machineStopped returns why the VM stopped, or nil if it runs.
func (r *replicator) machineStopped() error {
	select {
	case <-r.m.Done():
	default:
		return nil
	}
	if err := r.m.Err(); err != nil {
		return fmt.Errorf("machine stopped: %w", err)
	}
	return errors.New("machine stopped unexpectedly")
}

// lostCause is why the backup was lost, from the error Primary.Run returned.
func lostCause(err error) error {
	if lost, ok := errors.AsType[*replicate.BackupLostError](err); ok {
		return lost.Cause
	}
	return err
}

// statusLine makes the status line of the second that ends at now, and
// starts the next second. It returns nil during the initial sync, which
// reports itself round by round.
func (r *replicator) statusLine(now time.Time, secs, guestRate float64, lost bool) *statusLine {
	r.mu.Lock()
	defer r.mu.Unlock()
	w := &r.window
	defer w.Reset()
	if !r.synced && !lost {
		return nil
	}
	s := &statusLine{
		elapsed:     now.Sub(r.t0),
		epochs:      float64(w.Epochs) / secs,
		n:           w.Epochs,
		p50:         w.Pause.Quantile(0.5),
		p99:         w.Pause.Quantile(0.99),
		xfer:        w.Transfer.Quantile(0.5),
		period:      w.Period.Quantile(0.5),
		dirty:       w.MeanDirty(),
		wireRate:    float64(w.Wire) / secs,
		ratio:       w.Ratio(),
		guest:       guestRate,
		op:          opName(r.cfg.Workload),
		unprotected: lost || (r.lastAcked != nil && !r.p.Protected()),
		net:         r.netSecond(secs),
	}
	s.cpu, s.backupCPU = w.CPUPerPage()
	if r.mirror != nil {
		s.disk = &diskLine{writes: float64(w.DiskWrites) / secs, bytes: float64(w.DiskBytes) / secs}
	}
	if r.o.Capture != replicate.CaptureEager {
		s.lazy = &lazyLine{faults: float64(w.Faults) / secs, behind: w.Behind.Quantile(0.5)}
		if w.Dirty > 0 {
			s.lazy.share = float64(w.LazyPages) / float64(w.Dirty)
		}
	}
	sent, acked := r.p.LastSent(), r.p.LastAcked()
	if sent > acked {
		s.lag = sent - acked
	}
	if r.lastAcked != nil {
		s.ack = r.lastAcked.AckLatency
	}
	return s
}

// statusLine is one per-second status line of a primary.
type statusLine struct {
	elapsed     time.Duration
	epochs      float64       // epochs acknowledged per second
	n           uint64        // epochs acknowledged in the second
	p50, p99    time.Duration // their pauses
	dirty       float64       // their mean dirty pages
	wireRate    float64       // bytes per second they took on the wire
	ratio       float64       // wire bytes over raw bytes
	lag         uint64        // epochs sent and not yet acknowledged
	ack         time.Duration // the latest ack's latency
	xfer        time.Duration // their transfers' median (pause end to end record sent)
	period      time.Duration // their periods' median (pause start to pause start)
	cpu         time.Duration // the engine's CPU per dirty page, primary side
	backupCPU   time.Duration // and backup side
	guest       float64       // the guest's operations per second
	op          string        // what the guest's operations are
	disk        *diskLine     // with a mirrored disk
	net         *netLine      // with an output gate
	lazy        *lazyLine     // with lazy or auto capture
	unprotected bool
}

// lazyLine is the lazy capture part of a status line: the share of the dirty
// pages protected in the pause and copied behind the guest, the guest's
// faults on them per second, and the median time the copy behind took.
type lazyLine struct {
	share, faults float64
	behind        time.Duration
}

func (l *lazyLine) String() string {
	return fmt.Sprintf("  lazy %.0f%% faults %s/s behind %s", 100*l.share, si(l.faults), dur(l.behind))
}

// diskLine is the disk part of a status line: the guest's disk writes the
// acknowledged epochs mirrored (write records, and their data), per second.
type diskLine struct {
	writes, bytes float64
}

func (d *diskLine) String() string {
	return fmt.Sprintf("  disk %s writes/s %s/s", si(d.writes), bytesSI(d.bytes))
}

// String formats the line, e.g.
//
//	"   3.0s  10.0 epochs/s  pause p50 1.23ms p99 2.34ms  dirty 5.12k/epoch  wire 23.4MB/s  ratio 0.412  lag 1 ack 1.20ms  xfer 3.40ms  period 100ms  cpu/page 2.10µs+1.05µs  guest 2.31M writes/s"
//
// xfer is the median time from an epoch's pause to its last byte written
// (its transfer), period the median time from one pause to the next (the
// epoch's real length, which grows past the interval when the link or the
// backup cannot keep up), cpu/page the engine's CPU time per dirty page on
// the primary + on the backup (the memory path: capture, encode and send;
// receive, check and apply). Then, with a mirrored disk, "  disk 12.3k writes/s 50.4MB/s", then the
// network part (netLine) with an output gate, with lazy or auto capture
// "  lazy 78% faults 1.2k/s behind 3.10ms" (lazyLine), and "  UNPROTECTED" at the end while the backup holds no current
// checkpoint. With no epoch in the second, the pause, dirty and ratio fields
// are "-".
func (s statusLine) String() string {
	pause, dirty, ratio, xfer, period, cpu := "p50 - p99 -", "-", "-", "-", "-", "-"
	if s.n > 0 {
		pause = fmt.Sprintf("p50 %s p99 %s", dur(s.p50), dur(s.p99))
		dirty = si(s.dirty)
		ratio = fmt.Sprintf("%.3f", s.ratio)
		xfer = dur(s.xfer)
		if s.period > 0 {
			period = dur(s.period)
		}
		if s.dirty > 0 {
			cpu = dur(s.cpu) + "+" + dur(s.backupCPU)
		}
	}
	line := fmt.Sprintf("%6.1fs  %.1f epochs/s  pause %s  dirty %s/epoch  wire %s/s  ratio %s  lag %d ack %s  xfer %s  period %s  cpu/page %s  guest %s %s/s",
		s.elapsed.Seconds(), s.epochs, pause, dirty, bytesSI(s.wireRate), ratio, s.lag, dur(s.ack), xfer, period, cpu, si(s.guest), s.op)
	if s.disk != nil {
		line += s.disk.String()
	}
	if s.net != nil {
		line += s.net.String()
	}
	if s.lazy != nil {
		line += s.lazy.String()
	}
	if s.unprotected {
		line += "  UNPROTECTED"
	}
	return line
}

// summary prints what replication did over d.
func (r *replicator) summary(w io.Writer, d time.Duration, lost error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := &r.total
	// Rates are over the checkpointing that followed the initial sync.
	secs := d.Seconds()
	if !r.syncDone.IsZero() {
		secs = r.t0.Add(d).Sub(r.syncDone).Seconds()
	}
	fmt.Fprintf(w, "replicated %.1fs: %s, interval %v, dirty tracking %v\n", d.Seconds(), describe(r.m.Config()), r.o.Interval, r.mech)
	fmt.Fprintf(w, "  sync: %d rounds, %d pages, wire %s in %s\n", r.initSync.rounds, r.initSync.pages, bytesSI(float64(r.initSync.wire)), dur(r.initSync.elapsed))
	if !r.synced {
		fmt.Fprintf(w, "  sync: not finished when the run ended (%d rounds done): no checkpoint was taken, the VM was never protected\n", r.initSync.rounds)
	}
	last := uint64(0)
	if t.Last != nil {
		last = t.Last.Epoch
	}
	fmt.Fprintf(w, "  epochs: %d acknowledged (%.1f/s after the sync), last %d, %d oversize, back-pressure wait %s total\n",
		t.Epochs, float64(t.Epochs)/secs, last, t.Oversize, dur(t.Wait))
	fmt.Fprintf(w, "  pause: p50 %s p90 %s p99 %s max %s mean %s\n", dur(t.Pause.Quantile(0.5)), dur(t.Pause.Quantile(0.9)),
		dur(t.Pause.Quantile(0.99)), dur(t.Pause.Max()), dur(t.Pause.Mean()))
	fmt.Fprint(w, "  pause parts (mean):")
	for i, name := range epochstat.PartNames {
		if i == epochstat.PartAudit && t.Audited == 0 {
			continue
		}
		fmt.Fprintf(w, " %s %s", name, dur(t.MeanPart(i)))
	}
	if t.LazyPages > 0 && t.Epochs > 0 {
		fmt.Fprintf(w, " protect %s", dur(t.Protect/time.Duration(t.Epochs)))
	}
	fmt.Fprintln(w)
	if r.o.Capture != replicate.CaptureEager {
		share := 0.0
		if t.Dirty > 0 {
			share = 100 * float64(t.LazyPages) / float64(t.Dirty)
		}
		fmt.Fprintf(w, "  capture %v: %.1f%% of the dirty pages protected and copied behind the guest; %d guest faults, %d pages copied before a VMM write; behind p50 %s p99 %s\n",
			r.o.Capture, share, t.Faults, t.Guarded, dur(t.Behind.Quantile(0.5)), dur(t.Behind.Quantile(0.99)))
	}
	if t.HostEpochs > 0 {
		fmt.Fprintf(w, "  vCPU threads outside the guest (KVM faults, exits, devices): %s/epoch (mean, tick-sampled)\n",
			dur(t.VCPUHost/time.Duration(t.HostEpochs)))
	}
	zero := 0.0
	if t.Dirty > 0 {
		zero = 100 * float64(t.Zero) / float64(t.Dirty)
	}
	fmt.Fprintf(w, "  dirty: %.0f pages/epoch (mean), %.1f%% zero\n", t.MeanDirty(), zero)
	fmt.Fprintf(w, "  shipped: raw %s, wire %s, ratio %.3f, %s/s on the wire\n", bytesSI(float64(t.Raw)), bytesSI(float64(t.Wire)),
		t.Ratio(), bytesSI(float64(t.Wire)/secs))
	fmt.Fprintf(w, "  ack latency: p50 %s p99 %s\n", dur(t.Ack.Quantile(0.5)), dur(t.Ack.Quantile(0.99)))
	fmt.Fprintf(w, "  transfer: p50 %s p99 %s; period: p50 %s p99 %s\n", dur(t.Transfer.Quantile(0.5)), dur(t.Transfer.Quantile(0.99)),
		dur(t.Period.Quantile(0.5)), dur(t.Period.Quantile(0.99)))
	pc, bc := t.CPUPerPage()
	fmt.Fprintf(w, "  engine cpu: primary %s, backup %s per dirty page (%s and %s in all)\n", dur(pc), dur(bc), dur(t.CPU), dur(t.BackupCPU))
	if r.o.AuditEvery > 0 {
		fmt.Fprintf(w, "  audits: %d passed (every %d epochs)\n", t.Audited, r.o.AuditEvery)
	}
	if r.stats != nil {
		fmt.Fprintf(w, "  stats: %d lines in %s\n", t.Epochs, r.o.Stats)
	}
	r.diskSummary(w, secs)
	r.netSummary(w)
	if lost != nil {
		fmt.Fprintf(w, "  UNPROTECTED: the backup was lost after epoch %d: %v\n", r.p.LastAcked(), lostCause(lost))
	}
}

// diskSummary prints the disk sync, phase by phase and in total, and the
// writes the acknowledged epochs mirrored (secs: the seconds after the
// initial sync). With r.mu held.
func (r *replicator) diskSummary(w io.Writer, secs float64) {
	if r.mirror == nil {
		return
	}
	fmt.Fprintf(w, "  disk: %s image %s, mirrored to the backup's\n", testvm.FormatSize(uint64(r.mirror.Size())), r.o.Disk)
	var (
		sent      int
		data, enc uint64
		took      time.Duration
	)
	for _, s := range r.diskSync {
		fmt.Fprintln(w, "  "+diskSyncLine(s))
		sent += s.Sent
		data += uint64(s.Bytes)
		enc += s.WireBytes
		took += s.Took
	}
	fmt.Fprintf(w, "  disk sync total: %d phases, %d blocks sent, %s (wire %s), %s\n", len(r.diskSync), sent, bytesSI(float64(data)), bytesSI(float64(enc)), dur(took))
	t := &r.total
	fmt.Fprintf(w, "  disk mirrored: %d writes, %s (wire %s) in %d epochs, %s writes/s, %s/s\n", t.DiskWrites, bytesSI(float64(t.DiskBytes)),
		bytesSI(float64(t.DiskWire)), t.Epochs, si(float64(t.DiskWrites)/secs), bytesSI(float64(t.DiskBytes)/secs))
}

// finish pauses the VM, prints the replication summary and the guest's, and
// verifies the guest's memory or counters.
func (r *replicator) finish(w io.Writer, lost error) error {
	d := time.Since(r.t0)
	if err := r.m.Pause(); err != nil {
		return err
	}
	r.summary(w, d, lost)
	return summarize(w, r.m, r.first, d)
}

// dialBackup connects to the backup at addr, trying again until timeout.
func dialBackup(ctx context.Context, addr string, timeout time.Duration) (net.Conn, error) {
	conn, err := protect.Dial(ctx, addr, timeout)
	if err != nil && ctx.Err() == nil {
		return nil, fmt.Errorf("%w; is `repagent backup --listen %s` running?", err, addr)
	}
	return conn, err
}
