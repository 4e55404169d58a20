package main

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/faultpoint"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// replFlags are the replication flags the main job and the primary command
// share.
type replFlags struct {
	interval, heartbeatTimeout, duration time.Duration
	dirtyTrack, stats, staging, compress string
	capture                              string
	workers, copyThreads, syncThreshold  int
	auditEvery                           uint64
	syncPause, captureCalib              time.Duration
	quiet, noThrottle                    bool
	holdLimit, pcap                      string
	metrics                              string
}

func (r *replFlags) register(fs *pflag.FlagSet) {
	fs.DurationVar(&r.interval, "interval", replicate.DefaultInterval,
		fmt.Sprintf("checkpoint interval (epoch length), %v to %v", replicate.MinInterval, replicate.MaxInterval))
	fs.StringVar(&r.dirtyTrack, "dirty-track", "auto",
		"dirty page tracking: auto, bitmap, manual or ring (auto picks from the workload's expected dirty rate)")
	fs.StringVar(&r.stats, "stats", "", "write one JSON line per acknowledged epoch to `file`")
	fs.DurationVar(&r.heartbeatTimeout, "heartbeat-timeout", 0,
		"silence from the backup that means it is lost (default 0: 5 intervals, at least 2s)")
	fs.IntVar(&r.workers, "workers", 0, "compression goroutines (default 0: one per CPU, at most 4)")
	fs.StringVar(&r.compress, "compress", "auto",
		"LZ4 compression of pages: auto (where a probe finds it pays, per 2MiB of memory), always or never")
	fs.StringVar(&r.capture, "capture", "eager",
		"how a checkpoint's dirty pages are captured: eager (copied in the pause), lazy (write-protected in the pause with userfaultfd and copied behind the running guest) or auto (per run of pages, from the costs measured on this host)")
	fs.DurationVar(&r.captureCalib, "capture-calibration", 0,
		"with --capture auto: how long every page is copied in the pause at the start, to measure what eager capture costs the guest before lazy capture is priced against it; at least 8 epochs (default 0: 2s)")
	fs.IntVar(&r.copyThreads, "copy-threads", 0,
		"at most this many goroutines copy an epoch's pages during its pause, 1 to 4; more than 1 are used only when they pay for waking them (default 0: one per CPU, at most 4)")
	fs.IntVar(&r.syncThreshold, "sync-threshold", 0,
		"end the initial memory sync once a round leaves at most this many dirty `pages` (default 0: 1024)")
	fs.DurationVar(&r.syncPause, "sync-pause", replicate.DefaultSyncPause,
		"the longest pause the first checkpoint may take to copy what the initial sync leaves; while rounds stop shrinking with more left, the vCPUs are throttled")
	fs.BoolVar(&r.noThrottle, "no-throttle", false, "never throttle the vCPUs during the initial sync: a guest that out-dirties the link gets a first pause as long as it takes")
	fs.StringVar(&r.staging, "staging", "",
		"memory `size` for captured pages not yet sent (default 0: the guest memory size, at most 1GiB)")
	fs.Uint64Var(&r.auditEvery, "audit-every", 0,
		"digest all of guest memory in every `N`th pause and check it against the replicated pages (default 0: never)")
	fs.DurationVar(&r.duration, "duration", 0, "how long to run (default 0: until Ctrl-C or SIGTERM)")
	fs.BoolVar(&r.quiet, "quiet", false, "print no sync or per-second status lines, and log only warnings")
	fs.StringVar(&r.holdLimit, "hold-limit", "", fmt.Sprintf("memory `size` for the guest's held network frames; past it frames are dropped, never released early (default %s)", testvm.FormatSize(ebpf.DefaultHoldLimit)))
	fs.StringVar(&r.pcap, "pcap", "", "write the guest's released network frames to `file` (pcap)")
	fs.StringVar(&r.metrics, "metrics", "", agent.MetricsHelp)
}

// options checks the replication flags; any error is a usage error.
func (r *replFlags) options() (agent.Repl, error) {
	o := agent.Repl{Interval: r.interval, HeartbeatTimeout: r.heartbeatTimeout, Workers: r.workers,
		CopyThreads: r.copyThreads, SyncThreshold: r.syncThreshold, SyncPause: r.syncPause, NoThrottle: r.noThrottle,
		AuditEvery: r.auditEvery, Stats: r.stats, Duration: r.duration, Quiet: r.quiet, Pcap: r.pcap, Metrics: r.metrics}
	if r.interval < replicate.MinInterval || r.interval > replicate.MaxInterval {
		return o, usagef("--interval %v: want %v to %v", r.interval, replicate.MinInterval, replicate.MaxInterval)
	}
	mech, err := dirtylog.ParseMechanism(r.dirtyTrack)
	if err != nil {
		return o, usagef("--dirty-track: %w", err)
	}
	o.Mech = mech
	// The engine's heartbeat period is the interval, at most 100ms; the
	// timeout must cover two of them.
	if hb := min(r.interval, 100*time.Millisecond); r.heartbeatTimeout != 0 && r.heartbeatTimeout < 2*hb {
		return o, usagef("--heartbeat-timeout %v: want 0 (the default) or at least %v (two heartbeats at this interval)", r.heartbeatTimeout, 2*hb)
	}
	if r.workers < 0 {
		return o, usagef("--workers %d: must not be negative", r.workers)
	}
	if o.Compress, err = replicate.ParseCompression(r.compress); err != nil {
		return o, usagef("--compress: %w", err)
	}
	if o.Capture, err = replicate.ParseCapture(r.capture); err != nil {
		return o, usagef("--capture: %w", err)
	}
	if r.captureCalib < 0 {
		return o, usagef("--capture-calibration %v: must not be negative", r.captureCalib)
	}
	o.CaptureCalib = r.captureCalib
	if r.copyThreads < 0 || r.copyThreads > replicate.MaxCopyThreads {
		return o, usagef("--copy-threads %d: want 0 (the default) or 1 to %d", r.copyThreads, replicate.MaxCopyThreads)
	}
	if r.syncThreshold < 0 {
		return o, usagef("--sync-threshold %d: must not be negative", r.syncThreshold)
	}
	if r.syncPause < time.Millisecond {
		return o, usagef("--sync-pause %v: want at least 1ms", r.syncPause)
	}
	if r.staging != "" {
		if o.Staging, err = parseSize(r.staging); err != nil {
			return o, usagef("--staging: %w", err)
		}
	}
	if least := uint64(64 * replicate.PageSize); o.Staging != 0 && o.Staging < least {
		return o, usagef("--staging %s: want 0 (the default) or at least %s", r.staging, testvm.FormatSize(least))
	}
	if r.duration < 0 {
		return o, usagef("--duration %v: must not be negative", r.duration)
	}
	if r.stats != "" {
		if err := checkDir("--stats", r.stats); err != nil {
			return o, err
		}
	}
	if r.holdLimit != "" {
		if o.HoldLimit, err = parseSize(r.holdLimit); err != nil {
			return o, usagef("--hold-limit: %w", err)
		}
		if o.HoldLimit < ebpf.MinHoldLimit || o.HoldLimit > ebpf.MaxHoldLimit {
			return o, usagef("--hold-limit %s: want %s to %s", r.holdLimit, testvm.FormatSize(ebpf.MinHoldLimit), testvm.FormatSize(ebpf.MaxHoldLimit))
		}
	}
	if r.pcap != "" {
		if err := checkDir("--pcap", r.pcap); err != nil {
			return o, err
		}
	}
	if err := agent.CheckMetricsAddr(r.metrics); err != nil {
		return o, err
	}
	return o, nil
}

// jobFlags is the main job's flag set: the guest and replication flags.
type jobFlags struct {
	fs *pflag.FlagSet
	guestFlags
	replFlags
	noNet      bool
	clientRate int
	noDisk     bool
	tls        bool
}

func newJobFlags() *jobFlags {
	f := &jobFlags{fs: newFlagSet("repagent")}
	f.guestFlags.register(f.fs)
	f.replFlags.register(f.fs)
	f.registerJob()
	return f
}

// registerJob adds the flags only the main job has.
func (f *jobFlags) registerJob() {
	f.fs.BoolVar(&f.noNet, "no-net", false, "do not build the job's own network (namespaces, bridge, tap, client): no output commit")
	f.fs.IntVar(&f.clientRate, "client-rate", 200, "the job's client: UDP echo requests per second to the guest")
	f.fs.BoolVar(&f.tls, "tls", false, "replicate over TLS 1.3 with mutual authentication, as primary and backup on two hosts would, with certificates made in memory (default: plaintext on the job's loopback link)")
	f.fs.BoolVar(&f.noDisk, "no-disk", false, fmt.Sprintf("do not give the guest a block device: by default it has a %s disk whose writes are mirrored to the backup (temporary primary and backup images, removed at exit; --workload disk writes it)",
		testvm.FormatSize(agent.JobDiskSize)))
}

// parseJobArgs parses and checks the main job's arguments. It returns
// pflag.ErrHelp for --help, and otherwise any error is a usage error.
func parseJobArgs(args []string) (*agent.Job, error) {
	f := newJobFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return nil, err
	}
	if f.tap != "" {
		return nil, usagef("--tap: the main job builds its own tap; run `repagent primary --tap` to use yours")
	}
	if f.clientRate < 1 || f.clientRate > 100000 {
		return nil, usagef("--client-rate %d: want 1 to 100000 requests per second", f.clientRate)
	}
	wl, _ := testvm.ParseWorkload(f.workload)
	if !f.noNet && f.service == "" && !wl.IsNet() {
		f.service = "udp-echo" // vCPU 0 answers the job's client
	}
	if !f.noNet && (wl == testvm.UDPStream || f.service == "udp-stream") {
		return nil, usagef("the main job's client speaks udp-echo; run udp-stream with `repagent primary --tap` and a client of your own")
	}
	if f.noDisk && wl == testvm.Disk {
		return nil, usagef("--no-disk: the disk workload needs the job's disk")
	}
	if !f.noDisk {
		f.diskBlocks = agent.JobDiskSize / testvm.DiskBlockSize
	}
	cfg, repl, err := f.configs()
	if err != nil {
		return nil, err
	}
	if f.noNet && (repl.Pcap != "" || repl.HoldLimit != 0) {
		return nil, usagef("--pcap and --hold-limit are about the job's network: drop --no-net")
	}
	if f.noNet && cfg.Net != nil {
		return nil, usagef("--no-net: the guest's network workload or service needs the job's network")
	}
	return &agent.Job{Guest: cfg, Repl: repl, Net: !f.noNet, ClientRate: f.clientRate, Disk: !f.noDisk, TLS: f.tls}, nil
}

// configs checks the guest and replication flags, once parsed.
func (f *jobFlags) configs() (testvm.Config, agent.Repl, error) {
	cfg, err := f.guestFlags.config()
	if err != nil {
		return cfg, agent.Repl{}, err
	}
	repl, err := f.replFlags.options()
	repl.Tap, repl.Disk = f.guestFlags.tap, f.guestFlags.disk
	return cfg, repl, err
}

type primaryFlags struct {
	jobFlags
	backup         string
	connectTimeout time.Duration
	tls            tlsFlags
	etcd           etcdFlags
	// switchoverAfter is the migrate command's --switchover-after.
	switchoverAfter time.Duration
	destFlag        string // "backup" or "to": the flag that names the backup
}

func newPrimaryFlags() *primaryFlags {
	f := newDestFlags("primary", "backup", "the backup")
	f.etcd.register(f.fs, true)
	f.registerGuest("the backup")
	return f
}

// newDestFlags are the flags of a command that replicates a test VM to a
// backup: the primary (--backup) and migrate (--to, the destination).
// registerGuest adds the guest's and the replication's after the
// command's own.
func newDestFlags(cmd, dest, peer string) *primaryFlags {
	f := &primaryFlags{jobFlags: jobFlags{fs: newFlagSet(cmd)}, destFlag: dest}
	f.fs.StringVar(&f.backup, dest, "", peer+"'s `host:port` (repagent backup --listen); required")
	f.fs.DurationVar(&f.connectTimeout, "connect-timeout", 10*time.Second, "how long to keep trying to reach "+peer)
	f.tls.register(f.fs, peer)
	return f
}

func (f *primaryFlags) registerGuest(peer string) {
	f.guestFlags.register(f.fs)
	f.guestFlags.registerDisk(f.fs, "its writes are mirrored to "+peer+", whose --disk must be an image of the same size")
	f.replFlags.register(f.fs)
}

// job checks what the primary and migrate commands share and makes their
// job: the backup's address, the guest, the replication, the link's TLS.
func (f *primaryFlags) job() (*agent.PrimaryJob, error) {
	if f.backup == "" {
		return nil, usagef("--%s is required: the address a backup listens on (repagent backup --listen ADDR)", f.destFlag)
	}
	if _, _, err := net.SplitHostPort(f.backup); err != nil {
		return nil, usagef("--%s %s: %w", f.destFlag, f.backup, err)
	}
	if f.connectTimeout <= 0 {
		return nil, usagef("--connect-timeout %v: must be positive", f.connectTimeout)
	}
	cfg, repl, err := f.configs()
	if err != nil {
		return nil, err
	}
	if repl.Tap == "" && (repl.Pcap != "" || repl.HoldLimit != 0) {
		return nil, usagef("--pcap and --hold-limit are about the guest's network: they need --tap")
	}
	tl, err := f.tls.load()
	if err != nil {
		return nil, err
	}
	repl.TLS = clientTLS(tl)
	return &agent.PrimaryJob{Guest: cfg, Repl: repl, Backup: f.backup, ConnectTimeout: f.connectTimeout}, nil
}

// parsePrimaryArgs parses and checks the primary command's arguments, and
// faultEnv, the value of REPAGENT_FAULT. It returns pflag.ErrHelp for
// --help, and otherwise any error is a usage error.
func parsePrimaryArgs(args []string, faultEnv string) (*agent.PrimaryJob, error) {
	f := newPrimaryFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return nil, err
	}
	o, err := f.job()
	if err != nil {
		return nil, err
	}
	if o.Fault, err = parseFault(faultEnv, "", primaryFaultPoints); err != nil {
		return nil, err
	}
	if o.Fencing, err = f.etcd.load(f.fs); err != nil {
		return nil, err
	}
	return o, nil
}

// agent.Fault injection for tests. The environment variable REPAGENT_FAULT, when
// set, makes a process die (or, on the backup, kill another) at an exact
// point of replication, as a host that loses power would:
//
//   - primary: REPAGENT_FAULT=POINT:N with POINT one of sync, pause, send,
//     sent (internal/faultpoint: Sync, Pause, Send, Sent) and N the
//     epoch (for sync: the pre-copy round). When the engine reaches POINT in
//     epoch N, the primary flushes its --stats file and sends itself SIGKILL.
//   - backup: REPAGENT_FAULT=apply:N with REPAGENT_FAULT_KILL_PID=PID. When
//     half of epoch N's pages are applied to the replica, the backup sends
//     SIGKILL to PID (the primary), sleeps 100ms and goes on applying: the
//     primary dies while the backup is mid-apply.
//
// It is deliberately not in --help: it exists for tests.
const (
	envFault        = "REPAGENT_FAULT"
	envFaultKillPID = "REPAGENT_FAULT_KILL_PID"
)

var (
	primaryFaultPoints = []string{faultpoint.Sync, faultpoint.Pause, faultpoint.Send, faultpoint.Sent}
	backupFaultPoints  = []string{faultpoint.Apply}
)

// parseFault parses REPAGENT_FAULT's value env (and, when needed,
// REPAGENT_FAULT_KILL_PID's value pid) for a side whose hook points are
// points. An empty env means no fault. Any error is a usage error.
func parseFault(env, pid string, points []string) (*agent.Fault, error) {
	if env == "" {
		return nil, nil
	}
	point, num, ok := strings.Cut(env, ":")
	want := fmt.Sprintf("want POINT:N with POINT one of %s", strings.Join(points, ", "))
	if !ok {
		return nil, usagef("%s=%q: %s", envFault, env, want)
	}
	known := false
	for _, p := range points {
		known = known || p == point
	}
	if !known {
		return nil, usagef("%s=%q: unknown point %q here (%s)", envFault, env, point, want)
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return nil, usagef("%s=%q: %q is not an epoch number (%s)", envFault, env, num, want)
	}
	f := &agent.Fault{Point: point, N: n}
	if point == faultpoint.Apply {
		if pid == "" {
			return nil, usagef("%s=%q needs %s, the process to kill", envFault, env, envFaultKillPID)
		}
		if f.KillPID, err = strconv.Atoi(pid); err != nil || f.KillPID <= 0 {
			return nil, usagef("%s=%q: want a process id", envFaultKillPID, pid)
		}
	}
	return f, nil
}
