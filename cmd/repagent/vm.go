package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/testvm"
)

const vmUsage = `Usage: repagent vm [flags]

Run the test VM: a KVM guest whose vCPUs run a workload the host can check
(idle, dirty pages, or a counter with a running hash of its history). It prints
a progress line every second and a summary when --duration is over or on
Ctrl-C; the summary verifies the guest's memory (dirty) or re-hashes its
counters (counter). --save writes a snapshot of the paused machine at the end;
--restore continues a saved machine instead of booting a new one, and then the
config flags, if given, must match the snapshot.

With --disk the guest has a block device over a raw image file. The disk
workload writes stamped blocks to it, reads earlier ones back and checks
them, and keeps a record of every block in guest memory; the summary checks
the whole image against that record. A snapshot does not hold the disk:
restore it with --disk and the image as the saved guest left it.

Flags:
`

// maxRehash is the largest counter the summary re-hashes on the host. Hashing
// is as slow as the guest's own stepping (about 1.7s per 1e9 steps, the vCPUs
// in parallel), so this caps the check at a few seconds.
const maxRehash = 4e9

// readyTimeout bounds how long a new guest may take to report READY.
const readyTimeout = 30 * time.Second

// vmOptions is what the vm command was asked to do.
type vmOptions struct {
	cfg      testvm.Config
	duration time.Duration
	save     string
	restore  string
	quiet    bool
	tap      string          // --tap: the network device's tap
	tapFile  *os.File        // opened by machine, closed after the machine
	disk     string          // --disk: the block device's image
	diskFile *os.File        // opened by machine, closed after the machine
	changed  map[string]bool // config flags given on the command line
}

// usageError is a problem with what the user asked for (exit code 2).
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// guestFlags are the flags that describe the test VM. The vm command, the
// main job and the primary command share them.
type guestFlags struct {
	mem, workload, pattern, content string
	vcpus                           int
	workingSet, rate, seed          uint64

	// The network device.
	tap, mac, ip, service string
	port                  uint16
	streamRate            uint64
	streamBytes           uint32

	// The block device: --disk (vm and primary), or the main job's own
	// image of diskBlocks blocks.
	disk       string
	diskBlocks uint64
}

// guestFlagNames are the guest flags' names, in the order usage lists them.
var guestFlagNames = []string{"mem", "vcpus", "workload", "pattern", "content", "working-set", "rate", "seed",
	"tap", "mac", "ip", "port", "net-service", "stream-rate", "stream-bytes", "disk"}

// Guest network defaults.
const (
	defaultGuestMAC = "52:54:00:00:00:02"
	defaultGuestIP  = "10.77.0.2"
)

// register adds the guest flags to fs.
func (g *guestFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&g.mem, "mem", testvm.FormatSize(testvm.DefaultMemSize),
		"guest memory `size`: a multiple of 2MiB with a unit (256MiB, 256M, 1GiB, 4096KiB) or plain bytes")
	fs.IntVar(&g.vcpus, "vcpus", 1, fmt.Sprintf("number of vCPUs, 1 to %d", testvm.MaxVCPUs))
	fs.StringVar(&g.workload, "workload", "dirty", "what each vCPU runs: idle, dirty, counter, udp-echo, udp-stream or disk (the network ones and disk on vCPU 0, the others idle; disk needs a block device)")
	fs.StringVar(&g.pattern, "pattern", "random", "the dirty workload's page order: seq, random or hotcold")
	fs.StringVar(&g.content, "content", "stamp", "what a dirty workload write puts in its page: stamp (every byte changes; incompressible), text (compressible text-like words) or sparse (one 64-byte line changes, the rest keeps its bytes)")
	fs.Uint64Var(&g.workingSet, "working-set", 0, "4KiB `pages` each vCPU's dirty workload writes (default 0: its whole region)")
	fs.Uint64Var(&g.rate, "rate", 0, "page writes per second per vCPU for the dirty workload, block writes per second for the disk workload (default 0: full speed)")
	fs.Uint64Var(&g.seed, "seed", 1, "seed of the random and hotcold patterns")
	fs.StringVar(&g.tap, "tap", "", "give the guest a network device on the tap called `name` (opened in this process's network namespace, created if missing)")
	fs.StringVar(&g.mac, "mac", defaultGuestMAC, "the guest's MAC address")
	fs.StringVar(&g.ip, "ip", defaultGuestIP, "the guest's IPv4 address")
	fs.Uint16Var(&g.port, "port", testvm.DefaultNetPort, "the UDP port the guest's network service listens on")
	fs.StringVar(&g.service, "net-service", "", "udp-echo or udp-stream: vCPU 0 also serves the network between its workload's operations")
	fs.Uint64Var(&g.streamRate, "stream-rate", testvm.DefaultStreamRate, "udp-stream: datagrams per second")
	fs.Uint32Var(&g.streamBytes, "stream-bytes", testvm.DefaultStreamBytes, fmt.Sprintf("udp-stream: UDP payload `bytes` per datagram, 16 to %d", testvm.MaxStreamBytes))
}

// registerDisk adds --disk to fs; more, if not empty, ends its help.
func (g *guestFlags) registerDisk(fs *pflag.FlagSet, more string) {
	usage := fmt.Sprintf("give the guest a block device over the raw disk image `file`, which must exist and be a whole number of %s blocks; with --workload disk it is erased first (the workload starts from an empty disk and checks every block against its own record)",
		testvm.FormatSize(testvm.DiskBlockSize))
	if more != "" {
		usage += "; " + more
	}
	fs.StringVar(&g.disk, "disk", "", usage)
}

// netConfig returns the guest's network settings, or nil when the guest has
// no network device (no --tap, no network workload or service).
func (g *guestFlags) netConfig(wl testvm.Workload) (*testvm.NetConfig, error) {
	var svc testvm.Workload
	if g.service != "" {
		w, err := testvm.ParseWorkload(g.service)
		if err != nil || !w.IsNet() {
			return nil, usagef("--net-service %q: want udp-echo or udp-stream", g.service)
		}
		svc = w
	}
	if g.tap == "" && svc == 0 && !wl.IsNet() {
		return nil, nil
	}
	if wl.IsNet() {
		if svc != 0 && svc != wl {
			return nil, usagef("--net-service %s with --workload %s: the workload is the service already", svc, wl)
		}
		svc = wl
	}
	mac, err := net.ParseMAC(g.mac)
	if err != nil {
		return nil, usagef("--mac: %w", err)
	}
	ip, err := netip.ParseAddr(g.ip)
	if err != nil {
		return nil, usagef("--ip: %w", err)
	}
	if g.port == 0 {
		return nil, usagef("--port 0: want 1 to 65535")
	}
	if g.streamRate == 0 {
		return nil, usagef("--stream-rate 0: want at least 1 datagram per second")
	}
	return &testvm.NetConfig{MAC: mac, IP: ip, Port: g.port, StreamRate: g.streamRate, StreamBytes: g.streamBytes, Service: svc}, nil
}

// config checks the guest flags and returns the VM config they describe; any
// error is a usage error.
func (g *guestFlags) config() (testvm.Config, error) {
	mem, err := parseSize(g.mem)
	if err != nil {
		return testvm.Config{}, usagef("--mem: %w", err)
	}
	if mem == 0 {
		return testvm.Config{}, usagef("--mem: size must not be 0")
	}
	if g.vcpus < 1 || g.vcpus > testvm.MaxVCPUs {
		return testvm.Config{}, usagef("--vcpus %d: want 1 to %d", g.vcpus, testvm.MaxVCPUs)
	}
	wl, err := testvm.ParseWorkload(g.workload)
	if err != nil {
		return testvm.Config{}, usagef("--workload: %w", err)
	}
	pat, err := testvm.ParsePattern(g.pattern)
	if err != nil {
		return testvm.Config{}, usagef("--pattern: %w", err)
	}
	content, err := testvm.ParseContent(g.content)
	if err != nil {
		return testvm.Config{}, usagef("--content: %w", err)
	}
	cfg := testvm.Config{MemSize: mem, VCPUs: g.vcpus, Workload: wl, Pattern: pat, Content: content,
		WorkingSet: g.workingSet, Rate: g.rate, Seed: g.seed}
	if cfg.Net, err = g.netConfig(wl); err != nil {
		return testvm.Config{}, err
	}
	if g.disk != "" {
		size, err := diskImageSize("--disk", g.disk)
		if err != nil {
			return testvm.Config{}, err
		}
		g.diskBlocks = uint64(size) / testvm.DiskBlockSize
	}
	if g.diskBlocks != 0 {
		cfg.Disk = &testvm.DiskConfig{Blocks: g.diskBlocks}
	}
	if wl == testvm.Disk && cfg.Disk == nil {
		return testvm.Config{}, usagef("--workload disk needs a block device: give --disk with a raw image file (e.g. made by truncate -s 64M disk.img)")
	}
	if err := cfg.Validate(); err != nil {
		return testvm.Config{}, usageError{err}
	}
	return cfg, nil
}

// newFlagSet returns a flag set that reports errors instead of printing them
// and lists flags in the order they were added.
func newFlagSet(name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// parseFlags parses args into fs and refuses positional arguments. It returns
// pflag.ErrHelp for --help, and otherwise any error is a usage error.
func parseFlags(fs *pflag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// vmFlags holds the vm command's flag set and the values it parses into.
type vmFlags struct {
	fs *pflag.FlagSet
	guestFlags
	duration      time.Duration
	save, restore string
	quiet         bool
}

func newVMFlags() *vmFlags {
	f := &vmFlags{fs: newFlagSet("vm")}
	fs := f.fs
	f.guestFlags.register(fs)
	f.guestFlags.registerDisk(fs, "with --restore, the image the saved guest's disk was left in")
	fs.DurationVar(&f.duration, "duration", 10*time.Second, "how long to run; 0 runs until Ctrl-C")
	fs.StringVar(&f.save, "save", "", "at the end, pause, verify and write a snapshot to `file`")
	fs.StringVar(&f.restore, "restore", "", "continue the machine saved in snapshot `file` instead of booting a new one")
	fs.BoolVar(&f.quiet, "quiet", false, "print no per-second progress lines, only the summary")
	return f
}

// parseVMArgs parses and checks the vm command's arguments. It returns
// pflag.ErrHelp for --help, and otherwise any error is a usage error.
func parseVMArgs(args []string) (*vmOptions, error) {
	f := newVMFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return nil, err
	}
	o := &vmOptions{duration: f.duration, save: f.save, restore: f.restore, quiet: f.quiet, changed: map[string]bool{}}
	// The flags that describe the guest; with --restore they must match the snapshot.
	for _, name := range guestFlagNames {
		o.changed[name] = f.fs.Changed(name)
	}
	cfg, err := f.guestFlags.config()
	if err != nil {
		return nil, err
	}
	if f.duration < 0 {
		return nil, usagef("--duration %v: must not be negative", f.duration)
	}
	if f.save != "" {
		if err := checkDir("--save", f.save); err != nil {
			return nil, err
		}
	}
	o.cfg = cfg
	o.tap = f.guestFlags.tap
	o.disk = f.guestFlags.disk
	return o, nil
}

// checkDir reports, as a usage error, that the directory of the file a flag
// names does not exist.
func checkDir(flag, file string) error {
	dir := filepath.Dir(file)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return usagef("%s %s: directory %s does not exist", flag, file, dir)
	}
	return nil
}

// parseSize parses a byte count: a whole number with an optional binary unit,
// "256MiB", "256M", "1GiB", "1G", "4096KiB", or plain bytes ("268435456" or
// "268435456B"). Units ignore case; K, M, G and T mean KiB, MiB, GiB and TiB.
func parseSize(s string) (uint64, error) {
	num := strings.TrimRightFunc(s, unicode.IsLetter)
	unit := s[len(num):]
	num = strings.TrimSpace(num)
	var shift uint
	switch strings.ToLower(unit) {
	case "", "b":
	case "k", "kib":
		shift = 10
	case "m", "mib":
		shift = 20
	case "g", "gib":
		shift = 30
	case "t", "tib":
		shift = 40
	default:
		return 0, fmt.Errorf("size %q: unknown unit %q (want B, K, KiB, M, MiB, G, GiB, T or TiB)", s, unit)
	}
	if num == "" {
		return 0, fmt.Errorf("size %q: no number", s)
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if errors.Is(err, strconv.ErrRange) || n > math.MaxUint64>>shift {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	if err != nil {
		return 0, fmt.Errorf("size %q: %q is not a whole number", s, num)
	}
	return n << shift, nil
}

// runVM is the vm command.
func runVM(args []string, stdout, stderr io.Writer) int {
	o, err := parseVMArgs(args)
	help := func(w io.Writer) { fmt.Fprint(w, vmUsage+newVMFlags().fs.FlagUsages()) }
	return execute("repagent vm", o, err, help, nil, stdout, stderr)
}

// run builds or restores the machine, runs it, and prints the summary. It
// calls stopSignals once the run is over, so that a second Ctrl-C during a
// long verification kills the process.
func (o *vmOptions) run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) error {
	defer func() {
		if o.tapFile != nil {
			o.tapFile.Close() // deferred first, so after the machine's Close
		}
		if o.diskFile != nil {
			o.diskFile.Close()
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
	if o.save != "" {
		if err := m.WriteSnapshot(o.save); err != nil {
			return err
		}
		disk := ""
		if o.disk != "" {
			disk = fmt.Sprintf("; its disk is %s as it is now: restore with --disk %s", o.disk, o.disk)
		}
		fmt.Fprintf(stdout, "saved snapshot %s (%s guest%s)\n", o.save, testvm.FormatSize(m.Config().MemSize), disk)
	}
	return nil
}

// machine builds a new machine, or restores the one in o.restore after
// checking that the config flags given match it.
func (o *vmOptions) machine(stdout, stderr io.Writer) (*testvm.Machine, error) {
	if o.tap != "" {
		f, err := testvm.OpenTap(o.tap)
		if err != nil {
			return nil, err
		}
		o.tapFile = f
	}
	if o.restore == "" {
		cfg := o.cfg
		cfg.Console, cfg.Tap = stderr, o.tapFile
		if cfg.Disk != nil {
			f, err := openDisk(o.disk, cfg.Disk.Blocks)
			if err != nil {
				return nil, err
			}
			o.diskFile = f
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
	saved, err := testvm.ReadSnapshotConfig(o.restore)
	if err != nil {
		return nil, err
	}
	if err := o.checkSnapshot(saved); err != nil {
		return nil, err
	}
	// The image is the disk as the saved guest left it: not erased.
	opts := testvm.RestoreOptions{Console: stderr, Tap: o.tapFile}
	if saved.Disk != nil {
		f, err := openDisk(o.disk, saved.Disk.Blocks)
		if err != nil {
			return nil, err
		}
		o.diskFile, opts.DiskIO = f, f
	}
	state, memf, err := testvm.ReadSnapshot(o.restore)
	if err != nil {
		return nil, err
	}
	m, err := testvm.Restore(state, memf, opts)
	if err != nil {
		memf.Close()
		return nil, err
	}
	c := m.Config()
	fmt.Fprintf(stdout, "restored %s: %s\n", o.restore, describe(c))
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

// checkSnapshot reports, as a usage error, every config flag given on the
// command line that differs from the snapshot's config c.
func (o *vmOptions) checkSnapshot(c testvm.Config) error {
	var bad []string
	differs := func(flag string, give, have any, what string) {
		if o.changed[flag] && give != have {
			bad = append(bad, fmt.Sprintf("--%s %v does not match the snapshot's %s", flag, give, fmt.Sprintf(what, have)))
		}
	}
	differs("mem", testvm.FormatSize(o.cfg.MemSize), testvm.FormatSize(c.MemSize), "%s guest")
	differs("vcpus", o.cfg.VCPUs, c.VCPUs, "%d vCPUs")
	differs("workload", o.cfg.Workload, c.Workload, "%s workload")
	differs("pattern", o.cfg.Pattern, c.Pattern, "%s pattern")
	differs("working-set", o.cfg.WorkingSet, c.WorkingSet, "working set of %d pages (0: whole region)")
	differs("rate", o.cfg.Rate, c.Rate, "rate of %d writes/s (0: full speed)")
	differs("seed", o.cfg.Seed, c.Seed, "seed %d")
	// The guest's network identity is in the snapshot; its tap is not.
	var give, have testvm.NetConfig
	if o.cfg.Net != nil {
		give = *o.cfg.Net
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
	case c.Disk != nil && o.disk == "":
		bad = append(bad, fmt.Sprintf("the snapshot's guest has a disk of %d blocks: give --disk with the image it was left in", c.Disk.Blocks))
	case c.Disk == nil && o.disk != "":
		bad = append(bad, "--disk: the snapshot's guest has no block device")
	case c.Disk != nil && o.cfg.Disk != nil && o.cfg.Disk.Blocks != c.Disk.Blocks:
		bad = append(bad, fmt.Sprintf("--disk %s has %d blocks, the snapshot's disk %d", o.disk, o.cfg.Disk.Blocks, c.Disk.Blocks))
	}
	if len(bad) > 0 {
		return usageError{errors.New(strings.Join(bad, "; "))}
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
func (o *vmOptions) watch(ctx context.Context, m *testvm.Machine, t0 time.Time, stdout io.Writer) error {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var end <-chan time.Time
	if o.duration > 0 {
		t := time.NewTimer(o.duration)
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
			if !o.quiet {
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

// syncWriter serialises writes to w: the guest console writes from the vCPU
// threads while the command writes its own errors.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
