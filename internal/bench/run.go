package bench

// Run and the rate modes (none, floor, replicated) that every section builds on.

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/internal/epochstat"
	"github.com/repagent/repagent/internal/track"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// readyTimeout bounds how long a new guest may take to report READY, as in
// the commands.
const readyTimeout = 30 * time.Second

// backupResult is what an in-process backup's Handle or Serve returned.
type backupResult struct {
	fo  *replicate.Failover
	err error
}

// Fixed settings of the bench.
const (
	floorHarvest     = 100 * time.Millisecond // the floor's harvest period
	FailoverInterval = 100 * time.Millisecond // the failover primary's interval
	check10kPages    = 10000                  // the 10k check's working set
	check10kInterval = 300 * time.Millisecond // 10k pages at >= 34k writes/s
	check10kMinMem   = 64 << 20               // room for 10000 pages in the region
	warmEpochs       = 3                      // epochs acknowledged after the sync before measuring
	failoverEpochs   = 5                      // checkpoints the backup holds before the primary dies
	// modeHeartbeatTimeout is the heartbeat timeout of the measuring modes:
	// it only decides when a silent side counts as lost, so it is generous,
	// so that a descheduled process on a busy machine does not end a mode.
	modeHeartbeatTimeout = 5 * time.Second
	setupTimeout         = 60 * time.Second // readiness, sync, first epochs
	setupRate            = 32 << 20         // bytes/s: a large guest's setup may take mem/rate (setupTimeoutFor)
	MaxEchoRate          = 10000            // the largest Options.EchoRate
)

// Goals the figures are compared with (not assertions).
const (
	// The 10k check's pause p99 over the median of its epochs' kick +
	// harvest + save + copy.
	goalPauseRatio    = 1.5
	goalGuestVsFloor  = 0.90
	goalFailoverExtra = 500 * time.Millisecond
	// The failover's time after detection is the same at every guest size
	// (the last of --failover-sizes within goalFailoverSame times the first,
	// or goalFailoverSlack more), and at most goalFailoverAfter.
	goalFailoverSame  = 1.25
	goalFailoverSlack = 10 * time.Millisecond
	goalFailoverAfter = 60 * time.Millisecond
)

// Options is what a run measures: the bench command's flags fill it.
type Options struct {
	Mem       uint64          // guest memory of every test VM (--mem)
	VCPUs     int             // vCPUs of every test VM but the 10k check's
	Rates     []uint64        // the dirty workload's rates, page writes/s per vCPU (0: full speed)
	Pattern   testvm.Pattern  // the dirty workload's page order
	Intervals []time.Duration // the replicated modes' checkpoint intervals
	ModeTime  time.Duration   // how long each mode measures, after its warm-up
	// Failovers is the primaries killed at each of FailoverSizes (0: no
	// failover section).
	Failovers     int
	FailoverSizes []uint64
	DirtyTrack    dirtylog.Mechanism // Auto picks per mode
	// HeartbeatTimeout is the failover backup's and primary's (0: the
	// engine's default at FailoverInterval).
	HeartbeatTimeout time.Duration
	Net              bool     // measure the network section (needs root)
	Disk             bool     // measure the disk section
	DiskSize         uint64   // the disk throughput image
	DiskSyncSize     uint64   // the disk sync image
	EchoRate         int      // the echo client's requests per second
	StreamRate       uint64   // the stream guest's datagrams per second
	Capture          bool     // measure the capture section (eager, lazy, auto)
	Link             bool     // measure the link section (plaintext and TLS)
	Sync             bool     // measure the large guest's initial sync
	SyncSizes        []uint64 // its guest sizes
	// Fence measures fenced failovers (etcd) after the failover section.
	Fence bool
	// MigrateSizes are the guest sizes the migration section moves, each
	// at 20,000 writes/s and at full speed (none: no migration section).
	MigrateSizes []uint64
	Quiet        bool // no progress lines

	// Executable is the repagent binary whose primary command the failover
	// runs; empty means this program (os.Executable). Tests, whose
	// executable is the test binary, set it to a built repagent.
	Executable string
	// VMM is how the replicated modes' primaries name their VMM.
	VMM string
	// Log is the engine's logger (nil: warnings and errors as text on the
	// progress writer).
	Log *slog.Logger
}

func toUS(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
func toMS(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// runner is one run of the bench command.
type runner struct {
	*Options
	stdout, stderr io.Writer
	log            *slog.Logger
	copySrc        []byte // the plain copy's source pages (cpu.go)
}

// progressf prints a progress line on stderr unless --quiet.
func (b *runner) progressf(format string, args ...any) {
	if !b.Quiet {
		fmt.Fprintf(b.stderr, "bench: "+format+"\n", args...)
	}
}

// warmup is how long every mode's guest runs before its window opens.
func (b *runner) warmup() time.Duration {
	return min(max(b.ModeTime/3, 200*time.Millisecond), time.Second)
}

// guestConfig is the dirty workload at rate on a VM of the bench's shape.
func (b *runner) guestConfig(rate uint64) testvm.Config {
	return testvm.Config{MemSize: b.Mem, VCPUs: b.VCPUs, Workload: testvm.Dirty, Pattern: b.Pattern, Rate: rate, Seed: 1}
}

// Run runs every measurement of o, printing each section's tables on
// stdout as it is measured and the goal lines last, progress on stderr
// (unless o.Quiet), and returns the results. It fails on the first
// measurement that cannot run; the goals do not decide its error.
func Run(ctx context.Context, o Options, stdout, stderr io.Writer) (*Result, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	b := &runner{Options: &o, stdout: stdout, stderr: stderr, log: o.Log}
	res := &Result{Started: time.Now()}
	res.Config = Config{Mem: o.Mem, VCPUs: o.VCPUs, Pattern: o.Pattern.String(), Rates: o.Rates,
		ModeTimeS: o.ModeTime.Seconds(), Failovers: o.Failovers, DirtyTrack: o.DirtyTrack.String(), HeartbeatMS: toMS(b.failoverTimeout()),
		Net: o.Net, Disk: o.Disk, DiskSize: o.DiskSize, DiskSync: o.DiskSyncSize, EchoRate: o.EchoRate, StreamRate: o.StreamRate,
		FailSizes: o.FailoverSizes, Sync: o.Sync, SyncSizes: o.SyncSizes}
	for _, iv := range o.Intervals {
		res.Config.IntervalsMS = append(res.Config.IntervalsMS, toMS(iv))
	}
	fmt.Fprintf(stdout, "repagent bench: dirty workload, %s pattern, %s, %d vCPU(s); each mode %v after a %v warm-up; dirty tracking %v\n",
		o.Pattern, testvm.FormatSize(o.Mem), o.VCPUs, o.ModeTime, b.warmup(), o.DirtyTrack)
	for _, rate := range o.Rates {
		rr, err := b.measureRate(ctx, rate)
		if err != nil {
			return nil, err
		}
		res.Rates = append(res.Rates, *rr)
		fmt.Fprintln(stdout)
		printRate(stdout, rr)
	}

	b.progressf("10k check: seq over %d pages, full speed, %v", check10kPages, check10kInterval)
	cfg := testvm.Config{MemSize: max(o.Mem, check10kMinMem), VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq,
		WorkingSet: check10kPages, Seed: 1}
	cm, err := b.measureReplicated(ctx, cfg, check10kInterval)
	if err != nil {
		return nil, fmt.Errorf("10k check: %w", err)
	}
	b.progressf("10k check: the same, the pause's copy on one goroutine (copy threads 1)")
	one, err := b.measureReplicatedCopy(ctx, cfg, check10kInterval, 1)
	if err != nil {
		return nil, fmt.Errorf("10k check, one copy goroutine: %w", err)
	}
	res.Check10k, res.Check = cm, summarize10k(cm)
	res.Check10kOne, res.Copy = one, summarizeCopy(cm, one)
	fmt.Fprintln(stdout)
	print10k(stdout, cfg, cm, res.Check)
	fmt.Fprintln(stdout)
	printCopy(stdout, cm, one, res.Copy)

	tr, err := b.measureTails(ctx)
	if err != nil {
		return nil, fmt.Errorf("pause tails: %w", err)
	}
	res.Tails = tr
	fmt.Fprintln(stdout)
	printTails(stdout, tr)

	if o.Capture {
		cr, err := b.measureCapture(ctx)
		if err != nil {
			return nil, fmt.Errorf("capture: %w", err)
		}
		res.Capture = cr
		fmt.Fprintln(stdout)
		printCapture(stdout, cr)
	}

	if o.Link {
		lr, err := b.measureLink(ctx)
		if err != nil {
			return nil, fmt.Errorf("link: %w", err)
		}
		res.Link = lr
		fmt.Fprintln(stdout)
		printLink(stdout, lr)
	}

	if o.Failovers > 0 {
		fo, err := b.measureFailover(ctx)
		if err != nil {
			return nil, fmt.Errorf("failover: %w", err)
		}
		res.Failover = fo
		fmt.Fprintln(stdout)
		printFailover(stdout, fo)
		if o.Fence {
			fr, err := b.measureFence(ctx)
			if err != nil {
				return nil, fmt.Errorf("fenced failover: %w", err)
			}
			res.Fence = fr
			fmt.Fprintln(stdout)
			printFence(stdout, fr)
		}
	}

	if len(o.MigrateSizes) > 0 {
		mr, err := b.measureMigrate(ctx)
		if err != nil {
			return nil, fmt.Errorf("migration: %w", err)
		}
		res.Migrate = mr
		fmt.Fprintln(stdout)
		printMigrate(stdout, mr)
	}

	if o.Sync {
		sr, err := b.measureSync(ctx)
		if err != nil {
			return nil, fmt.Errorf("sync: %w", err)
		}
		res.Sync = sr
		fmt.Fprintln(stdout)
		printSync(stdout, sr, o.Pattern, o.ModeTime)
	}

	if o.Disk {
		dr, err := b.measureDisk(ctx)
		if err != nil {
			return nil, fmt.Errorf("disk: %w", err)
		}
		res.Disk = dr
		fmt.Fprintln(stdout)
		printDisk(stdout, dr, o.ModeTime, b.warmup())
	}

	if o.Net {
		nr, err := b.measureNet(ctx)
		if err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
		res.Net = nr
		fmt.Fprintln(stdout)
		printNet(stdout, nr, o.ModeTime)
	}

	res.Goals = b.goals(res)
	fmt.Fprintln(stdout)
	fmt.Fprintln(stdout, "Goals:")
	for _, g := range res.Goals {
		fmt.Fprintln(stdout, "  "+g.Text)
	}
	res.TookSecs = time.Since(res.Started).Seconds()
	fmt.Fprintf(stdout, "\nbench took %.0fs\n", res.TookSecs)
	return res, nil
}

// measureRate measures every mode at one rate.
func (b *runner) measureRate(ctx context.Context, rate uint64) (*Rate, error) {
	rr := &Rate{Rate: rate}
	cfg := b.guestConfig(rate)
	b.progressf("rate %s: none", rateName(rate))
	none, err := b.measureNone(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("rate %s, none: %w", rateName(rate), err)
	}
	b.progressf("rate %s: floor", rateName(rate))
	floor, err := b.measureFloor(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("rate %s, floor: %w", rateName(rate), err)
	}
	rr.Modes = append(rr.Modes, none, floor)
	for _, iv := range b.Intervals {
		b.progressf("rate %s: replicated at %v", rateName(rate), iv)
		m, err := b.measureReplicated(ctx, cfg, iv)
		if err != nil {
			return nil, fmt.Errorf("rate %s, replicated at %v: %w", rateName(rate), iv, err)
		}
		rr.Modes = append(rr.Modes, m)
	}
	for _, m := range rr.Modes {
		m.VsNone = ratio(m.GuestRate, none.GuestRate)
		m.VsFloor = ratio(m.GuestRate, floor.GuestRate)
	}
	return rr, nil
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// rateName names a rate for messages: "10000/s" or "full speed".
func rateName(rate uint64) string {
	if rate == 0 {
		return "full speed"
	}
	return fmt.Sprintf("%d/s", rate)
}

// resolveTrack picks the dirty tracking mechanism for a VM about to be built
// with cfg and harvested every interval, as the primary command does, and
// sizes its dirty ring.
// bootTracked picks the dirty tracking for cfg at interval and boots the
// guest; the caller closes it.
func (b *runner) bootTracked(ctx context.Context, cfg testvm.Config, interval time.Duration) (*testvm.Machine, time.Time, dirtylog.Mechanism, error) {
	cfg, mech, err := b.resolveTrack(cfg, interval)
	if err != nil {
		return nil, time.Time{}, 0, err
	}
	m, ready, err := boot(ctx, cfg)
	return m, ready, mech, err
}

func (b *runner) resolveTrack(cfg testvm.Config, interval time.Duration) (testvm.Config, dirtylog.Mechanism, error) {
	cfg.DirtyRingEntries = 0
	switch b.DirtyTrack {
	case dirtylog.Ring:
		cfg.DirtyRingEntries = track.RingEntries
		return cfg, dirtylog.Ring, nil
	case dirtylog.Auto:
		mech, entries, err := track.Recommend(cfg, interval)
		if err != nil {
			return cfg, 0, err
		}
		cfg.DirtyRingEntries = entries
		return cfg, mech, nil
	}
	return cfg, b.DirtyTrack, nil
}

// boot builds and starts a test VM and waits for its guest.
func boot(ctx context.Context, cfg testvm.Config) (*testvm.Machine, time.Time, error) {
	m, err := testvm.New(cfg)
	if err != nil {
		return nil, time.Time{}, err
	}
	if err := m.Start(); err != nil {
		m.Close()
		return nil, time.Time{}, err
	}
	rctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	if err := m.WaitReady(rctx); err != nil {
		m.Close()
		return nil, time.Time{}, err
	}
	return m, time.Now(), nil
}

// guestWrites is the dirty workload's page writes, all vCPUs.
func guestWrites(m *testvm.Machine) uint64 {
	var n uint64
	for i := 0; i < m.NumVCPUs(); i++ {
		n += m.Status(i).Writes
	}
	return n
}

// sleepFor sleeps for d, or until ctx ends or the machine stops.
func sleepFor(ctx context.Context, m *testvm.Machine, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-m.Done():
		return errStopped(m)
	case <-t.C:
		return nil
	}
}

func errStopped(m *testvm.Machine) error {
	if err := m.Err(); err != nil {
		return fmt.Errorf("machine stopped: %w", err)
	}
	return errors.New("machine stopped unexpectedly")
}

// window measures the guest's writes over --mode-time.
func (b *runner) window(ctx context.Context, m *testvm.Machine, r *Mode) (t0, t1 time.Time, err error) {
	return b.windowFor(ctx, m, r, b.ModeTime)
}

// windowFor measures the guest's writes over d.
func (b *runner) windowFor(ctx context.Context, m *testvm.Machine, r *Mode, d time.Duration) (t0, t1 time.Time, err error) {
	w0, t0 := guestWrites(m), time.Now()
	if err := sleepFor(ctx, m, d); err != nil {
		return t0, t0, err
	}
	w1, t1 := guestWrites(m), time.Now()
	r.Seconds = t1.Sub(t0).Seconds()
	r.Writes = w1 - w0
	r.GuestRate = float64(r.Writes) / r.Seconds
	return t0, t1, nil
}

// measureNone is the guest alone: no dirty tracking.
func (b *runner) measureNone(ctx context.Context, cfg testvm.Config) (*Mode, error) {
	m, _, err := boot(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	if err := sleepFor(ctx, m, b.warmup()); err != nil {
		return nil, err
	}
	r := &Mode{Mode: "none", Track: "off"}
	if _, _, err := b.window(ctx, m, r); err != nil {
		return nil, err
	}
	return r, nil
}

// measureFloor is dirty logging alone: a harvest every floorHarvest while the
// guest runs, no pause, nothing copied.
func (b *runner) measureFloor(ctx context.Context, cfg testvm.Config) (*Mode, error) {
	m, _, mech, err := b.bootTracked(ctx, cfg, floorHarvest)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	tr, err := m.DirtyTracker(mech, false)
	if err != nil {
		return nil, err
	}
	if err := tr.Start(); err != nil {
		return nil, err
	}
	defer tr.Stop()
	r := &Mode{Mode: "floor", Track: tr.Mechanism().String(), IntervalMS: toMS(floorHarvest)}

	var (
		mu       sync.Mutex
		from, to time.Time // the window, once known
		herr     error
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		set := tr.NewSet()
		tick := time.NewTicker(floorHarvest)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			set.Clear()
			st, err := tr.Harvest(set)
			now := time.Now()
			mu.Lock()
			if err != nil {
				herr = err
				mu.Unlock()
				return
			}
			if !from.IsZero() && now.After(from) && (to.IsZero() || now.Before(to)) {
				r.Harvests++
				r.harvestTotal += st.Total
				r.HarvestPages += float64(set.Count())
			}
			mu.Unlock()
		}
	}()
	defer func() { close(stop); <-done }()
	if err := sleepFor(ctx, m, b.warmup()); err != nil {
		return nil, err
	}
	mu.Lock()
	from = time.Now()
	mu.Unlock()
	_, t1, err := b.window(ctx, m, r)
	mu.Lock()
	to = t1
	if herr != nil && err == nil {
		err = fmt.Errorf("harvest: %w", herr)
	}
	mu.Unlock()
	if err != nil {
		return nil, err
	}
	mu.Lock()
	if r.Harvests > 0 {
		r.HarvestMeanUS = toUS(r.harvestTotal / time.Duration(r.Harvests))
		r.HarvestPages /= float64(r.Harvests)
	}
	mu.Unlock()
	r.RingFullExits = tr.RingFullExits()
	return r, nil
}

// measureReplicated replicates a fresh VM at interval to a backup in this
// process over loopback TCP and measures the epochs that start in the
// window: --mode-time, but at least two intervals (a short --mode-time
// would otherwise catch no epoch of a long interval, such as the 10k
// check's).
func (b *runner) measureReplicated(ctx context.Context, cfg testvm.Config, interval time.Duration) (*Mode, error) {
	return b.measureReplicatedCopy(ctx, cfg, interval, 0)
}

// measureReplicatedCopy is measureReplicated with the engine's
// Config.CopyThreads set to copyThreads (0: the engine's default).
func (b *runner) measureReplicatedCopy(ctx context.Context, cfg testvm.Config, interval time.Duration, copyThreads int) (*Mode, error) {
	return b.measureReplicatedWith(ctx, cfg, interval, repl{copyThreads: copyThreads})
}

// measureReplicatedWith is measureReplicated with the engine settings of rp
// (copyThreads, capture); the rest of rp is filled here.
func (b *runner) measureReplicatedWith(ctx context.Context, cfg testvm.Config, interval time.Duration, rp repl) (*Mode, error) {
	m, ready, mech, err := b.bootTracked(ctx, cfg, interval)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	r := &Mode{Mode: interval.String(), IntervalMS: toMS(interval), Track: mech.String()}
	rp.interval, rp.mech, rp.warmup = interval, mech, max(rp.warmup, b.warmup())
	rp.measure = func(ctx context.Context) (time.Time, time.Time, error) {
		return b.windowFor(ctx, m, r, max(b.ModeTime, 2*interval))
	}
	err = b.runReplicated(ctx, m, ready, rp, r)
	if err != nil {
		return nil, err
	}
	// The floor of its CPU per page, in this process while the guest runs
	// on, as it did in the window.
	b.cpuPerPage(r, cfg.MemSize)
	return r, nil
}

// repl is how runReplicated replicates a running VM and what it measures.
type repl struct {
	interval time.Duration
	mech     dirtylog.Mechanism
	gates    []replicate.OutputGate // the engine's Config.Gates
	// copyThreads is the engine's Config.CopyThreads (0: its default),
	// capture its Config.Capture.
	copyThreads int
	capture     replicate.Capture
	// tlsClient and tlsServer are the link's TLS (Config.TLS and
	// BackupConfig.TLS); nil: plaintext.
	tlsClient, tlsServer *tls.Config
	warmup               time.Duration // the least time since the guest was ready before the window
	// measure runs the window, once the warm-up is over, and returns its
	// bounds: the epochs whose pause starts between them are measured.
	measure func(ctx context.Context) (t0, t1 time.Time, err error)

	// The disk, if any: the engine's Config.Disk, the backup's image
	// (BackupConfig.NewSink) and Config.OnStreamSync.
	disk       *diskmirror.Mirror
	backupDisk diskmirror.Disk
	onDiskSync func(replicate.StreamSyncProgress)
	// onRun, if set, is called just before Primary.Run; onBackupEpoch with
	// every checkpoint the backup applies (BackupConfig.OnEpoch).
	onRun         func()
	onBackupEpoch func(epoch uint64)
	// onSync and onEpoch, if set, see the engine's Config.OnSync and
	// Config.OnEpoch reports too.
	onSync  func(replicate.SyncProgress)
	onEpoch func(*replicate.EpochStats)
	// setup bounds the warm-up (0: setupTimeout).
	setup time.Duration
}

// runReplicated replicates the running m at rp.interval to a backup in this
// process over loopback TCP (the backup never resumes a VM), warms up (the
// sync done, warmEpochs acknowledged, rp.warmup since ready), runs
// rp.measure, stops replication and fills r's epoch figures with the epochs
// that started in the window.
func (b *runner) runReplicated(ctx context.Context, m *testvm.Machine, ready time.Time, rp repl, r *Mode) error {
	interval, mech := rp.interval, rp.mech
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the backup: %w", err)
	}
	defer ln.Close()
	bcfg := replicate.BackupConfig{
		NewMemory: testvm.NewMemFile,
		// No failover in these modes: a loss is an error, reported below.
		Resume:           func(cp *replicate.Checkpoint) error { return cp.Memory.Close() },
		HeartbeatTimeout: modeHeartbeatTimeout,
		Log:              b.log.With("side", "backup"),
		TLS:              rp.tlsServer,
	}
	if rp.backupDisk != nil {
		bcfg.NewSink = diskmirror.NewSink(rp.backupDisk, diskmirror.ReplicaConfig{})
	}
	if f := rp.onBackupEpoch; f != nil {
		bcfg.OnEpoch = func(epoch uint64, _ int, _ uint64) { f(epoch) }
	}
	bk, err := replicate.NewBackup(bcfg)
	if err != nil {
		return err
	}
	var stream replicate.Stream
	if rp.disk != nil {
		if stream, err = diskmirror.NewSource(rp.disk, diskmirror.SourceConfig{}); err != nil {
			return err
		}
	}
	defer bk.Close()
	bctx, bcancel := context.WithCancel(context.Background())
	bdone := make(chan backupResult, 1)
	go func() {
		// One session (Handle, not Serve): a session the backup refuses
		// ends it instead of waiting for another primary.
		conn, err := ln.Accept()
		if err != nil {
			bdone <- backupResult{nil, err}
			return
		}
		fo, err := bk.Handle(bctx, conn)
		bdone <- backupResult{fo, err}
	}()
	served := false
	defer func() {
		bcancel()
		ln.Close()
		if !served {
			<-bdone
		}
	}()

	var (
		mu       sync.Mutex
		epochs   []replicate.EpochStats
		maxEpoch uint64
		synced   time.Time
		syncTook time.Duration
	)
	p, err := replicate.NewPrimary(replicate.Config{
		VM:               m,
		Interval:         interval,
		DirtyTrack:       mech,
		HeartbeatTimeout: modeHeartbeatTimeout,
		Gates:            rp.gates,
		CopyThreads:      rp.copyThreads,
		Capture:          rp.capture,
		TLS:              rp.tlsClient,
		OnEpoch: func(s *replicate.EpochStats) {
			if rp.onEpoch != nil {
				rp.onEpoch(s)
			}
			mu.Lock()
			epochs = append(epochs, *s)
			maxEpoch = max(maxEpoch, s.Epoch)
			mu.Unlock()
		},
		OnSync: func(s replicate.SyncProgress) {
			if rp.onSync != nil {
				rp.onSync(s)
			}
			if s.Done {
				mu.Lock()
				synced, syncTook = time.Now(), s.Elapsed
				mu.Unlock()
			}
		},
		Stream:       stream,
		OnStreamSync: rp.onDiskSync,
		VMM:          b.VMM,
		Log:          b.log.With("side", "primary"),
	})
	if err != nil {
		return err
	}
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return fmt.Errorf("connect to the backup: %w", err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	perr := make(chan error, 1)
	if rp.onRun != nil {
		rp.onRun()
	}
	go func() { perr <- p.Run(runCtx, conn) }()
	running := true
	defer func() {
		cancel()
		if running {
			<-perr
		}
	}()

	// Warm up: the sync done, a few epochs acknowledged, and at least the
	// warm-up since the guest was ready.
	limit := cmp.Or(rp.setup, setupTimeout)
	deadline := time.Now().Add(limit)
	for {
		mu.Lock()
		ok := !synced.IsZero()
		mu.Unlock()
		if ok && p.LastAcked() >= warmEpochs && time.Since(ready) >= rp.warmup {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not warmed up in %v: sync done %v, %d epochs acknowledged", limit, ok, p.LastAcked())
		}
		select {
		case err := <-perr:
			running = false
			return fmt.Errorf("replication stopped during the warm-up: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-m.Done():
			return errStopped(m)
		case <-time.After(5 * time.Millisecond):
		}
	}
	t0, t1, err := rp.measure(ctx)
	if err != nil {
		return err
	}
	select {
	case err := <-perr:
		running = false
		return fmt.Errorf("replication stopped while measuring: %w", err)
	default:
	}
	cancel()
	running = false
	if err := <-perr; err != nil {
		return fmt.Errorf("replication: %w", err)
	}
	// The engine may report the last acknowledged epoch just after Run
	// returns (OnEpoch runs on its reader after the ack is counted).
	for wait := time.Now().Add(time.Second); ; {
		mu.Lock()
		got := maxEpoch
		mu.Unlock()
		if got >= p.LastAcked() || time.Now().After(wait) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case br := <-bdone:
		served = true
		switch {
		case br.fo != nil:
			return fmt.Errorf("the backup failed over (cause: %v)", br.fo.Cause)
		case errors.Is(br.err, replicate.ErrPrimaryStopped):
		default:
			// A protocol error here (the backup refusing how the session
			// ended) is a P5 regression, not noise: the primary says bye
			// only once every epoch it captured is acknowledged.
			return fmt.Errorf("backup: %w", br.err)
		}
	case <-time.After(modeHeartbeatTimeout + 5*time.Second):
		return errors.New("the backup did not see the primary stop")
	}

	mu.Lock()
	defer mu.Unlock()
	r.SyncSeconds = syncTook.Seconds()
	for _, s := range epochs {
		if !s.Start.Before(t0) && s.Start.Before(t1) {
			r.epochs = append(r.epochs, s)
			r.agg.Add(&s)
		}
	}
	slices.SortFunc(r.epochs, func(a, b replicate.EpochStats) int { return cmp.Compare(a.Epoch, b.Epoch) })
	a := &r.agg
	r.Epochs = a.Epochs
	if a.Epochs == 0 {
		return nil
	}
	r.PauseP50US, r.PauseP99US, r.PauseMaxUS = toUS(a.Pause.Quantile(0.5)), toUS(a.Pause.Quantile(0.99)), toUS(a.Pause.Max())
	r.KickUS, r.HarvestUS, r.SaveUS = toUS(a.MeanPart(epochstat.PartKick)), toUS(a.MeanPart(epochstat.PartHarvest)), toUS(a.MeanPart(epochstat.PartSave))
	r.CopyUS, r.StallUS, r.GatesUS, r.ResumeUS = toUS(a.MeanPart(epochstat.PartCopy)), toUS(a.MeanPart(epochstat.PartStall)), toUS(a.MeanPart(epochstat.PartGates)), toUS(a.MeanPart(epochstat.PartResume))
	r.WaitUS = toUS(a.Wait / time.Duration(a.Epochs))
	r.DirtyPages = a.MeanDirty()
	r.RawKiB = float64(a.Raw) / float64(a.Epochs) / 1024
	r.WireKiB = float64(a.Wire) / float64(a.Epochs) / 1024
	r.WireRatio = a.Ratio()
	r.WireMBps = float64(a.Wire) / r.Seconds / 1e6
	r.AckP50US = toUS(a.Ack.Quantile(0.5))
	r.Oversize = a.Oversize
	return nil
}

// summarize10k compares the 10k check's pause p99 with the median of
// kick + harvest + save + copy over the same epochs (each epoch's sum).
func summarize10k(r *Mode) Check10k {
	c := Check10k{DirtyPages: r.DirtyPages, PauseP99US: r.PauseP99US}
	var base []time.Duration
	for _, s := range r.epochs {
		base = append(base, s.Kick+s.Harvest+s.Save+s.Copy)
	}
	if len(base) == 0 {
		return c
	}
	c.BaseP50US = toUS(median(base))
	c.Ratio = ratio(c.PauseP99US, c.BaseP50US)
	return c
}

// median is the median of ds (the mean of the middle two for an even count); it sorts ds.
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	n := len(ds)
	if n%2 == 1 {
		return ds[n/2]
	}
	return (ds[n/2-1] + ds[n/2]) / 2
}
