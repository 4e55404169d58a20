package main

import (
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
	"time"
	"unicode"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/netlab"
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

// Guest network defaults: the guest's address in the job's network.
const (
	defaultGuestMAC = netlab.GuestMAC
	defaultGuestIP  = netlab.GuestIP
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
		size, err := agent.DiskImageSize("--disk", g.disk)
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
		return testvm.Config{}, usagef("%w", err)
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
		return usagef("%w", err)
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
func parseVMArgs(args []string) (*agent.VMJob, error) {
	f := newVMFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return nil, err
	}
	o := &agent.VMJob{Duration: f.duration, Save: f.save, Restore: f.restore, Quiet: f.quiet, Changed: map[string]bool{}}
	// The flags that describe the guest; with --restore they must match the snapshot.
	for _, name := range guestFlagNames {
		o.Changed[name] = f.fs.Changed(name)
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
	o.Guest = cfg
	o.Tap = f.guestFlags.tap
	o.Disk = f.guestFlags.disk
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
