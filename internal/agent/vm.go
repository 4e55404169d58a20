package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/repagent/repagent/testvm"
)

// maxRehash is the largest counter the summary re-hashes on the host. Hashing
// is as slow as the guest's own stepping (about 1.7s per 1e9 steps, the vCPUs
// in parallel), so this caps the check at a few seconds.
const maxRehash = 4e9

// readyTimeout bounds how long a new guest may take to report READY.
const readyTimeout = 30 * time.Second

// Run builds or restores the machine, runs it, and prints the summary. It
// calls stopSignals once the Run is over, so that a second Ctrl-C during a
// long verification kills the process.
func (o *VMJob) Run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) error {
	defer func() {
		if o.TapFile != nil {
			o.TapFile.Close() // deferred first, so after the machine's Close
		}
		if o.DiskFile != nil {
			o.DiskFile.Close()
		}
	}()
	m, err := o.machine(stdout, stderr)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.Start(); err != nil {
		return err
	}
	// A restored guest counts as ready already; WaitReady returns at once.
	rctx, cancel := context.WithTimeout(ctx, readyTimeout)
	err = m.WaitReady(rctx)
	cancel()
	if err != nil {
		return err
	}
	first := totals(m)
	t0 := time.Now()
	if err := o.watch(ctx, m, t0, stdout); err != nil {
		return err
	}
	stopSignals()
	if err := m.Pause(); err != nil {
		return err
	}
	if err := summarize(stdout, m, first, time.Since(t0)); err != nil {
		return err
	}
	if o.Save != "" {
		if err := m.WriteSnapshot(o.Save); err != nil {
			return err
		}
		disk := ""
		if o.Disk != "" {
			disk = fmt.Sprintf("; its disk is %s as it is now: restore with --disk %s", o.Disk, o.Disk)
		}
		fmt.Fprintf(stdout, "saved snapshot %s (%s guest%s)\n", o.Save, testvm.FormatSize(m.Config().MemSize), disk)
	}
	return nil
}

// machine builds a new machine, or restores the one in o.restore after
// checking that the config flags given match it.
func (o *VMJob) machine(stdout, stderr io.Writer) (*testvm.Machine, error) {
	if o.Tap != "" {
		f, err := testvm.OpenTap(o.Tap)
		if err != nil {
			return nil, err
		}
		o.TapFile = f
	}
	if o.Restore == "" {
		cfg := o.Guest
		cfg.Console, cfg.Tap = stderr, o.TapFile
		if cfg.Disk != nil {
			f, err := openDisk(o.Disk, cfg.Disk.Blocks)
			if err != nil {
				return nil, err
			}
			o.DiskFile = f
			if cfg.Workload == testvm.Disk {
				if err := eraseDisk(f, int64(cfg.Disk.Blocks*testvm.DiskBlockSize)); err != nil {
					return nil, err
				}
			}
			cfg.DiskIO = f
		}
		return testvm.New(cfg)
	}
	// Check the flags against the snapshot's config before copying its memory.
	saved, err := testvm.ReadSnapshotConfig(o.Restore)
	if err != nil {
		return nil, err
	}
	if err := o.CheckSnapshot(saved); err != nil {
		return nil, err
	}
	// The image is the disk as the saved guest left it: not erased.
	opts := testvm.RestoreOptions{Console: stderr, Tap: o.TapFile}
	if saved.Disk != nil {
		f, err := openDisk(o.Disk, saved.Disk.Blocks)
		if err != nil {
			return nil, err
		}
		o.DiskFile, opts.DiskIO = f, f
	}
	state, memf, err := testvm.ReadSnapshot(o.Restore)
	if err != nil {
		return nil, err
	}
	m, err := testvm.Restore(state, memf, opts)
	if err != nil {
		memf.Close()
		return nil, err
	}
	c := m.Config()
	fmt.Fprintf(stdout, "restored %s: %s\n", o.Restore, describe(c))
	for i := 0; i < m.NumVCPUs(); i++ {
		st := m.Status(i)
		line := fmt.Sprintf("  vcpu %d: %d %s", i, st.Iterations, opName(c.Workload))
		if c.Workload == testvm.Counter {
			line += fmt.Sprintf(", counter %d hash %#016x", st.Counter, st.Hash)
		}
		fmt.Fprintln(stdout, line)
	}
	return m, nil
}

// CheckSnapshot reports, as a usage error, every config flag given on the
// command line that differs from the snapshot's config c.
func (o *VMJob) CheckSnapshot(c testvm.Config) error {
	var bad []string
	differs := func(flag string, give, have any, what string) {
		if o.Changed[flag] && give != have {
			bad = append(bad, fmt.Sprintf("--%s %v does not match the snapshot's %s", flag, give, fmt.Sprintf(what, have)))
		}
	}
	differs("mem", testvm.FormatSize(o.Guest.MemSize), testvm.FormatSize(c.MemSize), "%s guest")
	differs("vcpus", o.Guest.VCPUs, c.VCPUs, "%d vCPUs")
	differs("workload", o.Guest.Workload, c.Workload, "%s workload")
	differs("pattern", o.Guest.Pattern, c.Pattern, "%s pattern")
	differs("working-set", o.Guest.WorkingSet, c.WorkingSet, "working set of %d pages (0: whole region)")
	differs("rate", o.Guest.Rate, c.Rate, "rate of %d writes/s (0: full speed)")
	differs("seed", o.Guest.Seed, c.Seed, "seed %d")
	// The guest's network identity is in the snapshot; its tap is not.
	var give, have testvm.NetConfig
	if o.Guest.Net != nil {
		give = *o.Guest.Net
	}
	if c.Net != nil {
		have = *c.Net
	}
	differs("mac", give.MAC.String(), have.MAC.String(), "MAC %q")
	differs("ip", give.IP, have.IP, "IP %v")
	differs("port", give.Port, have.Port, "port %d")
	differs("net-service", give.Service, have.Service, "network service %v")
	differs("stream-rate", give.StreamRate, have.StreamRate, "stream rate %d")
	differs("stream-bytes", give.StreamBytes, have.StreamBytes, "stream datagrams of %d bytes")
	// The disk's contents are not in the snapshot: the image must be given.
	switch {
	case c.Disk != nil && o.Disk == "":
		bad = append(bad, fmt.Sprintf("the snapshot's guest has a disk of %d blocks: give --disk with the image it was left in", c.Disk.Blocks))
	case c.Disk == nil && o.Disk != "":
		bad = append(bad, "--disk: the snapshot's guest has no block device")
	case c.Disk != nil && o.Guest.Disk != nil && o.Guest.Disk.Blocks != c.Disk.Blocks:
		bad = append(bad, fmt.Sprintf("--disk %s has %d blocks, the snapshot's disk %d", o.Disk, o.Guest.Disk.Blocks, c.Disk.Blocks))
	}
	if len(bad) > 0 {
		return UsageError{errors.New(strings.Join(bad, "; "))}
	}
	return nil
}

// describe names a guest config, e.g. "counter workload, 2 vCPUs, 64MiB",
// or "disk workload, 1 vCPU, 64MiB, 64MiB disk" with a block device.
func describe(c testvm.Config) string {
	vcpus := "vCPUs"
	if c.VCPUs == 1 {
		vcpus = "vCPU"
	}
	wl := c.Workload.String()
	if c.Workload == testvm.Dirty && c.Content != testvm.Stamp && c.Content != 0 {
		wl += " (" + c.Content.String() + " pages)"
	}
	s := fmt.Sprintf("%s workload, %d %s, %s", wl, c.VCPUs, vcpus, testvm.FormatSize(c.MemSize))
	if c.Disk != nil {
		s += fmt.Sprintf(", %s disk", testvm.FormatSize(c.Disk.Blocks*testvm.DiskBlockSize))
	}
	return s
}

// watch prints a progress line every second until the duration is over, ctx
// ends or the machine stops (an error).
func (o *VMJob) watch(ctx context.Context, m *testvm.Machine, t0 time.Time, stdout io.Writer) error {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var end <-chan time.Time
	if o.Duration > 0 {
		t := time.NewTimer(o.Duration)
		defer t.Stop()
		end = t.C
	}
	prev, prevT := totals(m), t0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-end:
			return nil
		case <-m.Done():
			if err := m.Err(); err != nil {
				return fmt.Errorf("machine stopped: %w", err)
			}
			return errors.New("machine stopped unexpectedly")
		case now := <-tick.C:
			cur := totals(m)
			if !o.Quiet {
				p := progress{elapsed: now.Sub(t0), workload: m.Config().Workload, vcpus: m.NumVCPUs(),
					rate: float64(cur.ops-prev.ops) / now.Sub(prevT).Seconds(), total: cur.ops, counters: cur.counters,
					diskReads: cur.diskReads, diskErrors: cur.diskErrors}
				fmt.Fprintln(stdout, p)
			}
			prev, prevT = cur, now
		}
	}
}

// snapshot is the guest's operation counts at one moment.
type snapshot struct {
	ops        uint64   // operations of all vCPUs
	perVCPU    []uint64 // operations of each vCPU
	counters   []uint64 // the counter workload's counter of each vCPU
	diskReads  uint64   // the disk workload's blocks read back and verified
	diskErrors uint64   // and its failed requests and reads that did not verify
}

func totals(m *testvm.Machine) snapshot {
	var s snapshot
	for i := 0; i < m.NumVCPUs(); i++ {
		st := m.Status(i)
		s.ops += st.Iterations
		s.perVCPU = append(s.perVCPU, st.Iterations)
		if m.Config().Workload == testvm.Counter {
			s.counters = append(s.counters, st.Counter)
		}
		if i == 0 && m.Config().Workload == testvm.Disk {
			s.diskReads, s.diskErrors = st.DiskReads, st.DiskErrors
		}
	}
	return s
}

// progress is one progress line.
type progress struct {
	elapsed  time.Duration
	workload testvm.Workload
	vcpus    int
	rate     float64  // operations per second of all vCPUs over the last interval
	total    uint64   // operations of all vCPUs since the guest booted
	counters []uint64 // counter workload: each vCPU's counter

	diskReads, diskErrors uint64 // disk workload: reads verified, errors
}

// String formats the line, e.g. "  3.0s  dirty    2.31M writes/s  total 6.90M  vcpus 2",
// or for the disk workload, with the guest's exact count of blocks it read
// back and verified and of its errors,
// "  3.0s  disk     41.2k block writes/s  total 124k  verified reads 15234  errors 0  vcpus 1".
func (p progress) String() string {
	s := fmt.Sprintf("%6.1fs  %-7s  %s %s/s", p.elapsed.Seconds(), p.workload, si(p.rate), opName(p.workload))
	if p.workload == testvm.Counter {
		s += "  counters"
		for _, c := range p.counters {
			s += " " + si(float64(c))
		}
		return s
	}
	s += fmt.Sprintf("  total %s", si(float64(p.total)))
	if p.workload == testvm.Disk {
		s += fmt.Sprintf("  verified reads %d  errors %d", p.diskReads, p.diskErrors)
	}
	return s + fmt.Sprintf("  vcpus %d", p.vcpus)
}

// opName names the workload's operations.
func opName(w testvm.Workload) string {
	switch w {
	case testvm.Dirty:
		return "writes"
	case testvm.Counter:
		return "steps"
	case testvm.UDPEcho:
		return "echoes"
	case testvm.UDPStream:
		return "datagrams"
	case testvm.Disk:
		return "block writes"
	}
	return "ticks"
}

// summarize prints what the paused machine did since first, and verifies it:
// every vCPU's pages for the dirty workload, every counter's hash chain for
// the counter workload.
func summarize(w io.Writer, m *testvm.Machine, first snapshot, d time.Duration) error {
	c := m.Config()
	last := totals(m)
	op := opName(c.Workload)
	fmt.Fprintf(w, "ran %.1fs: %s\n", d.Seconds(), describe(c))
	for i, n := range last.perVCPU {
		run := n - first.perVCPU[i]
		fmt.Fprintf(w, "  vcpu %d: %d %s (%d this run, %s/s)\n", i, n, op, run, si(float64(run)/d.Seconds()))
	}
	fmt.Fprintf(w, "  total: %d %s this run, %s/s\n", last.ops-first.ops, op, si(float64(last.ops-first.ops)/d.Seconds()))
	if m.HasNet() {
		st, ds := m.Status(0), m.NetStats()
		fmt.Fprintf(w, "  network: guest sequence %d, %d frames sent, %d received, %d ignored; device tx %d rx %d, %d dropped (RX ring full), %d kicks\n",
			st.NetSeq, st.NetTx, st.NetRx, st.NetIgnored, ds.TxFrames, ds.RxFrames, ds.RxDropped, ds.Kicks)
	}
	if c.Disk != nil {
		ds := m.DiskStats()
		fmt.Fprintf(w, "  disk device: %s, %d reads (%d blocks), %d writes (%d blocks, %d FUA), %d flushes, %d I/O errors, %d bad requests\n",
			testvm.FormatSize(c.Disk.Blocks*testvm.DiskBlockSize), ds.Reads, ds.BlocksRead, ds.Writes, ds.BlocksWritten, ds.FUAWrites,
			ds.Flushes, ds.IOErrors, ds.BadRequests)
	}
	switch c.Workload {
	case testvm.Disk:
		return verifyDisk(w, m)
	case testvm.Dirty:
		for i := 0; i < m.NumVCPUs(); i++ {
			rep, err := m.VerifyPages(i)
			if err != nil {
				fmt.Fprintf(w, "  vcpu %d: pages NOT verified: %v\n", i, err)
				return fmt.Errorf("verify pages: %w", err)
			}
			fmt.Fprintf(w, "  vcpu %d: pages verified: %d written, newest version %d\n", i, rep.Written, rep.MaxVersion)
		}
	case testvm.Counter:
		return verifyCounters(w, m)
	}
	return nil
}

// verifyDisk reports the disk workload's own checks (its verified reads and
// its errors) and checks the paused machine's disk image, block by block,
// against the guest's record of it.
func verifyDisk(w io.Writer, m *testvm.Machine) error {
	st := m.Status(0)
	fmt.Fprintf(w, "  disk workload: %d block writes, %d verified reads, %d flushes, %d errors\n", st.DiskWrites, st.DiskReads, st.DiskFlushes, st.DiskErrors)
	if st.DiskErrors != 0 || st.State == testvm.GuestFailed {
		what := "a read that did not verify"
		if st.DiskBadStatus != 0 {
			what = fmt.Sprintf("a request failed with status %d", st.DiskBadStatus)
		}
		fmt.Fprintf(w, "  disk NOT verified: the guest stopped at %s (block %d)\n", what, int64(st.DiskBadBlock)-1)
		return fmt.Errorf("verify disk: the guest found %s at block %d", what, int64(st.DiskBadBlock)-1)
	}
	rep, err := m.VerifyDisk()
	if err != nil {
		fmt.Fprintf(w, "  disk NOT verified: %v\n", err)
		return err
	}
	fmt.Fprintf(w, "  disk verified: %s\n", diskReportString(rep))
	return nil
}

// verifyCounters re-hashes each vCPU's counter chain from 0 (in parallel) and
// checks it against the hash the guest reports.
func verifyCounters(w io.Writer, m *testvm.Machine) error {
	n := m.NumVCPUs()
	want := make([]uint64, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		if c := m.Status(i).Counter; c <= maxRehash {
			wg.Add(1)
			go func() {
				defer wg.Done()
				want[i] = testvm.CounterHash(testvm.CounterStart, 0, c)
			}()
		}
	}
	wg.Wait()
	var bad []int
	for i := 0; i < n; i++ {
		st := m.Status(i)
		line := fmt.Sprintf("  vcpu %d: counter %d hash %#016x", i, st.Counter, st.Hash)
		switch {
		case st.Counter > maxRehash:
			line += " (not re-hashed: too long)"
		case st.Hash == want[i]:
			line += " (verified)"
		default:
			line += fmt.Sprintf(" (NOT verified: re-hashing gives %#016x)", want[i])
			bad = append(bad, i)
		}
		fmt.Fprintln(w, line)
	}
	if len(bad) > 0 {
		return fmt.Errorf("verify counters: vCPUs %v report hashes their counters do not give", bad)
	}
	return nil
}
