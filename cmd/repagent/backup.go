package main

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
//	owner: vm=NAME id=ID revision=R at=UNIXNANO     (with --etcd)
//	failover: epoch=N digest=DIGEST verified=true|false
//	resumed vcpu=I iterations=N writes=N counter=N hash=HASH
//
// With --etcd the failover first waits to own the VM (fence.Claim): the
// owner line says it won the owner key at revision R, at UNIXNANO (ns since
// the epoch, this host's clock). If the standby record in etcd does not
// name the session whose replica this backup holds, it refuses instead
// ("repagent backup: claim the VM: ... stale ...", exit code 1). While the
// resumed VM runs, losing the key pauses it and prints the primary's
// fenced line (below), exit code 4.
//
// One resumed line per vCPU, I from 0: the guest's status at the checkpoint,
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
// A session that ends before its first checkpoint (refused, lost, stopped)
// is a log line on stderr ("session ended with nothing to fail over;
// waiting for the next primary", or "refused connection" with the reason),
// and the backup serves on. With --once it ends instead, and a primary lost
// before its first checkpoint completed gives, on stderr, "repagent backup:
// primary lost before its first checkpoint: ..." and exit code 3. Other
// errors exit with 1, usage errors with 2. Messages of the replication
// engine go to stderr (log/slog text).
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
// UNPROTECTED: CAUSE" on stderr and go on (exit code 0).
//
// With --etcd, the primary prints, once it owns the VM, before replicating,
// the owner line above; with a backup lost it tries it every second, and
// when it answers, "backup reachable again at ADDR: protecting the VM again
// (a new session, from a new sync)". When it fences:
//
//	fenced: vm=NAME last-released-epoch=N last-release=UNIXNANO at=UNIXNANO cause="CAUSE"
//
// with "FENCED" in a log line on stderr, and exit code 4: no output was
// released after last-release (0: none under the lease), nor from at on,
// and the VM is paused. REPAGENT_FAULT, which
// kills either side at an exact point, is described in options.go.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

const backupUsage = `Usage: repagent backup --listen ADDR [flags]

Receive a primary's checkpoints (repagent primary --backup ADDR) into a
replica of its memory. When the primary is lost (its connection drops or it
is silent for --heartbeat-timeout) after its first checkpoint, resume the VM
from the last complete checkpoint, run it for --run-after-failover, then pause
it and verify the guest. With --tap, the resumed guest's network device uses
that tap, and a gratuitous ARP announces the guest's MAC and IP there. With
--disk, the backup's disk image follows the primary's --disk checkpoint by
checkpoint (an initial sync sends only the blocks that differ) and is the
resumed guest's disk; a guest that runs the disk workload has it checked
block by block against its own records before it resumes.

Between hosts, give the link TLS (--tls-cert, --tls-key, --tls-ca and
--tls-allow; repagent certs DIR makes a lab set): a backup on an address
other hosts can reach refuses to run without it unless --insecure. The
backup serves on through connections it refuses (each logged, with the
reason) and sessions that end before their first checkpoint; only a primary
that reached a checkpoint can make it fail over or stop (see SECURITY.md).

Between hosts, also fence through etcd (--etcd, --name; the same on the
primary): the backup then resumes the VM only once it owns it in etcd (the
primary's lease expired) and only the session the primary last recorded
there, so a partition cannot leave two copies running. While it waits, a
primary that reconnects is served instead, from a new sync.

With --reprotect-to HOST:PORT, the resumed VM is protected in turn, as a
primary protects its VM (with its output gate on --tap and its disk
mirrored), to the backup there: a second failover resumes it on that host.
The sync and status lines are then a primary's, and the verification comes
at the end of --run-after-failover (or Ctrl-C), after a planned stop.

Exit code 0 when the primary stopped on purpose or the resumed guest
verified, 1 when it did not or on a runtime error, 2 on a usage error, and,
with --once, 3 when the primary was lost before its first checkpoint
(nothing to resume); 4 when, with --etcd, the resumed VM lost its ownership
and was paused.

Flags:
`

// exitNoCheckpoint is the backup's exit code when the primary was lost
// before its first checkpoint.
const exitNoCheckpoint = 3

type backupFlags struct {
	fs               *pflag.FlagSet
	listen           string
	expectMem        string
	expectVCPUs      int
	heartbeatTimeout time.Duration
	runAfter         time.Duration
	skipVerify       bool
	verifyReplica    bool
	quiet            bool
	tap              string
	disk             string
	metrics          string
	tls              tlsFlags
	etcd             etcdFlags
	insecure, once   bool
	reprotectTo      string
	reprotectEvery   time.Duration
}

func newBackupFlags() *backupFlags {
	f := &backupFlags{fs: newFlagSet("backup")}
	fs := f.fs
	fs.StringVar(&f.listen, "listen", "", "`address` to accept the primary on, host:port (port 0 picks one); required")
	fs.StringVar(&f.expectMem, "expect-mem", "", "accept only a primary whose test VM has this memory `size` (with --expect-vcpus)")
	fs.IntVar(&f.expectVCPUs, "expect-vcpus", 0, "accept only a primary whose test VM has this many vCPUs (with --expect-mem)")
	fs.DurationVar(&f.heartbeatTimeout, "heartbeat-timeout", 0,
		"silence from the primary that means it is lost (default 0: 5 of its intervals, at least 2s)")
	fs.DurationVar(&f.runAfter, "run-after-failover", 0, "how long to run the resumed VM before verifying it (default 0: until Ctrl-C or SIGTERM)")
	fs.BoolVar(&f.verifyReplica, "verify-replica", false,
		"at failover, digest the whole replica and refuse to resume it unless it matches its checkpoint (failover then grows with memory; every epoch is verified page by page as it arrives either way)")
	fs.BoolVar(&f.skipVerify, "skip-verify", false, "resume without checking the disk image against the guest's records first (faster failover, unchecked)")
	fs.BoolVar(&f.quiet, "quiet", false, "print no per-second lines, and log only warnings")
	fs.StringVar(&f.tap, "tap", "", "at failover, give the resumed guest's network device the tap called `name` (opened in this process's network namespace) and announce its MAC and IP there")
	fs.StringVar(&f.disk, "disk", "", "the backup's disk image `file`, required when the primary has --disk and of the same size: kept equal to the primary's disk at the checkpoint held, it is the resumed guest's disk at failover (checked first against the guest's records when it runs the disk workload)")
	fs.StringVar(&f.metrics, "metrics", "", agent.MetricsHelp)
	f.tls.register(fs, "the primary")
	f.etcd.register(fs, false)
	fs.StringVar(&f.reprotectTo, "reprotect-to", "", "after a failover, protect the resumed VM in turn: replicate it to the backup at this `host:port` (a chain: another failover resumes it there); with TLS, --tls-allow must also name that backup")
	fs.DurationVar(&f.reprotectEvery, "reprotect-interval", replicate.DefaultInterval, "the epoch interval of --reprotect-to's replication")
	fs.BoolVar(&f.insecure, "insecure", false, "serve a --listen address other hosts can reach without TLS: anyone who reaches it can then feed this backup a VM to resume, or replace the replica it protects")
	fs.BoolVar(&f.once, "once", false, "exit after the first session however it ends (exit 3 if the primary was lost before its first checkpoint); by default a session that ends before its first checkpoint leaves the backup waiting for the next primary")
	return f
}

// parseBackupArgs parses and checks the backup command's arguments and the
// values of REPAGENT_FAULT and REPAGENT_FAULT_KILL_PID. It returns
// pflag.ErrHelp for --help, and otherwise any error is a usage error.
func parseBackupArgs(args []string, faultEnv, killPID string) (*agent.BackupJob, error) {
	f := newBackupFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return nil, err
	}
	o := &agent.BackupJob{Listen: f.listen, ExpectVCPUs: f.expectVCPUs, HeartbeatTimeout: f.heartbeatTimeout,
		RunAfter: f.runAfter, SkipVerify: f.skipVerify, VerifyReplica: f.verifyReplica, Quiet: f.quiet, Tap: f.tap, Disk: f.disk, Metrics: f.metrics}
	if f.listen == "" {
		return nil, usagef("--listen is required: the address to accept the primary on, e.g. --listen :7070")
	}
	if _, _, err := net.SplitHostPort(f.listen); err != nil {
		return nil, usagef("--listen %s: %w", f.listen, err)
	}
	if f.fs.Changed("expect-mem") != f.fs.Changed("expect-vcpus") {
		return nil, usagef("--expect-mem and --expect-vcpus go together: the VM's shape is its memory layout and its vCPUs")
	}
	if f.fs.Changed("expect-mem") {
		mem, err := parseSize(f.expectMem)
		if err != nil {
			return nil, usagef("--expect-mem: %w", err)
		}
		if f.expectVCPUs < 1 || f.expectVCPUs > testvm.MaxVCPUs {
			return nil, usagef("--expect-vcpus %d: want 1 to %d", f.expectVCPUs, testvm.MaxVCPUs)
		}
		if err := (testvm.Config{MemSize: mem, VCPUs: f.expectVCPUs}).Validate(); err != nil {
			return nil, usagef("--expect-mem: %w", err)
		}
		o.ExpectMem = mem
	}
	if f.heartbeatTimeout < 0 {
		return nil, usagef("--heartbeat-timeout %v: must not be negative", f.heartbeatTimeout)
	}
	if f.runAfter < 0 {
		return nil, usagef("--run-after-failover %v: must not be negative", f.runAfter)
	}
	if err := agent.CheckMetricsAddr(f.metrics); err != nil {
		return nil, err
	}
	if f.fs.Changed("tap") && (f.tap == "" || len(f.tap) >= 16 || strings.ContainsAny(f.tap, "/ \t\n:")) {
		return nil, usagef("--tap %q: not a network interface name (1 to 15 bytes, no '/', ':' or spaces)", f.tap)
	}
	if f.fs.Changed("disk") {
		// The primary's image has the same size, so the same checks hold.
		if _, err := agent.DiskImageSize("--disk", f.disk); err != nil {
			return nil, err
		}
	}
	tl, err := f.tls.load()
	if err != nil {
		return nil, err
	}
	if tl == nil && !f.insecure && !loopbackOnly(f.listen) {
		return nil, usagef("--listen %s is reachable from other hosts, and without TLS anyone who reaches it can feed this backup a VM to resume or replace its replica: give --tls-cert, --tls-key and --tls-ca (repagent certs DIR makes a lab set), listen on a loopback address, or accept that with --insecure", f.listen)
	}
	o.TLS, o.Once = serverTLS(tl), f.once
	flt, err := parseFault(faultEnv, killPID, backupFaultPoints)
	if err != nil {
		return nil, err
	}
	o.Fault = flt
	if o.Fencing, err = f.etcd.load(f.fs); err != nil {
		return nil, err
	}
	if f.reprotectTo != "" {
		if _, _, err := net.SplitHostPort(f.reprotectTo); err != nil {
			return nil, usagef("--reprotect-to %s: %w", f.reprotectTo, err)
		}
		if f.reprotectEvery < replicate.MinInterval || f.reprotectEvery > replicate.MaxInterval {
			return nil, usagef("--reprotect-interval %v: want %v to %v", f.reprotectEvery, replicate.MinInterval, replicate.MaxInterval)
		}
		o.ReprotectTo, o.ReprotectInterval, o.ReprotectTLS = f.reprotectTo, f.reprotectEvery, clientTLS(tl)
	} else if f.fs.Changed("reprotect-interval") {
		return nil, usagef("--reprotect-interval is about --reprotect-to: give it too")
	}
	return o, nil
}

// runBackup is the backup command.
func runBackup(args []string, stdout, stderr io.Writer) int {
	o, err := parseBackupArgs(args, os.Getenv(envFault), os.Getenv(envFaultKillPID))
	help := func(w io.Writer) { fmt.Fprint(w, backupUsage+newBackupFlags().fs.FlagUsages()) }
	code := func(err error) int {
		if errors.Is(err, replicate.ErrNoCheckpoint) {
			return exitNoCheckpoint
		}
		if errors.Is(err, replicate.ErrFenced) {
			return agent.ExitFenced
		}
		return 1
	}
	return execute("repagent backup", o, err, help, code, stdout, stderr)
}
