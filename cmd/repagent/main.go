// Command repagent replicates a running KVM guest to a backup host.
//
// With no command (`repagent --interval 100ms`) it runs the main job: the
// built-in test VM replicated to a backup in the same process over loopback
// TCP, with a status line per second and a summary. The primary and backup
// commands run the two sides as separate processes; migrate moves a test VM
// live to a backup's host; vm runs the test VM alone; bench measures
// replication (internal/bench).
//
// The command only parses flags, prints and exits: options.go, primary.go,
// backup.go, migrate.go, vm.go and bench.go hold each command's flags and
// usage, and fill a configuration of internal/agent (or internal/bench),
// whose Run does the work on top of replicate/protect.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"github.com/repagent/repagent/testvm"
	"github.com/spf13/pflag"
)

// command is a subcommand: its name, a one-line summary and the function that
// runs it with its arguments and returns the exit code.
type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

// commands returns the subcommands, in the order usage lists them.
func commands() []command {
	return []command{
		{"primary", "run a test VM and replicate it to a backup", runPrimary},
		{"backup", "receive a primary's checkpoints; resume the VM if the primary is lost", runBackup},
		{"migrate", "run a test VM and move it live to a backup's host", runMigrate},
		{"bench", "measure replication: guest throughput, pauses, bytes, failover time", runBench},
		{"vm", "run the test VM, optionally saving or restoring a snapshot", runVM},
		{"certs", "make a lab CA and certificates for TLS between a primary and a backup", runCerts},
	}
}

func main() {
	raiseProcs()
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// raiseProcs gives the Go scheduler a P for every vCPU on top of one per
// CPU, unless GOMAXPROCS is set. A vCPU thread spends its life in KVM_RUN, a
// syscall that keeps its P until the runtime's monitor takes it back, which
// can take up to 10 ms when the monitor has backed off; meanwhile the
// engine's goroutines, the output gate and the network device wait for a P.
// On 2 CPUs that showed as 2 to 3 ms more round trip through output commit
// at 20 ms epochs (`repagent --workload udp-echo --interval 20ms` with and
// without GOMAXPROCS=6). The OS still schedules threads over the real CPUs.
func raiseProcs() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(runtime.NumCPU() + testvm.MaxVCPUs)
	}
}

// run dispatches args to a subcommand and returns the exit code: 0 on success,
// 1 for runtime errors, 2 for usage errors.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return runJob(args, stdout, stderr)
	}
	switch name := args[0]; name {
	case "help", "-h", "--help":
		if len(args) > 1 && name == "help" {
			if c, ok := findCommand(args[1]); ok {
				return c.run([]string{"--help"}, stdout, stderr)
			}
			fmt.Fprintf(stderr, "repagent: unknown command %q\n", args[1])
			return 2
		}
		usage(stdout)
		return 0
	default:
		if strings.HasPrefix(name, "-") {
			return runJob(args, stdout, stderr)
		}
		if c, ok := findCommand(name); ok {
			return c.run(args[1:], stdout, stderr)
		}
		fmt.Fprintf(stderr, "repagent: unknown command %q (run 'repagent help')\n", name)
		return 2
	}
}

// runner is a parsed command, ready to run until ctx ends. It calls
// stopSignals once its run is over, so that a second Ctrl-C during a long
// verification kills the process.
type runner interface {
	Run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) error
}

// execute runs a command whose flags parsed to o (or err) the way every
// command runs: help on pflag.ErrHelp, Ctrl-C and SIGTERM end its context,
// errors are printed after prefix, and the exit code is 2 for usage errors,
// code(err) for others when code is not nil, and 1 otherwise.
func execute(prefix string, o runner, err error, help func(io.Writer), code func(error) int, stdout, stderr io.Writer) int {
	if errors.Is(err, pflag.ErrHelp) {
		help(stdout)
		return 0
	}
	if err == nil {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		err = o.Run(ctx, stop, &syncWriter{w: stdout}, &syncWriter{w: stderr})
	}
	if err == nil {
		return 0
	}
	fmt.Fprintf(stderr, "%s: %v\n", prefix, err)
	switch {
	case errors.As(err, new(usageError)):
		return 2
	case code != nil:
		return code(err)
	}
	return 1
}

func findCommand(name string) (command, bool) {
	for _, c := range commands() {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

const jobUsage = `Usage: repagent [flags]
       repagent <command> [flags]

With no command, repagent runs the main job: a test VM (by default the dirty
workload, 256MiB, 1 vCPU, and a 64MiB disk) replicated to a backup in the
same process over loopback TCP. It prints one line per round of the initial
sync (and per phase of the disk's), then a status line per second (epochs
acknowledged per second, pause p50/p99, dirty pages per epoch, MB/s on the
wire, compression ratio wire/raw, lag in epochs with the latest ack latency,
the guest's own rate, the disk writes mirrored per second, and UNPROTECTED
when the backup holds no current checkpoint), and at Ctrl-C or after
--duration stops replication, prints a summary and verifies the guest's
memory, its disk, and the backup's disk image. Only --workload disk writes
the disk. Exit code 0 on success, 1 on a runtime error, 2 on a usage error.
`

// usage prints the program's usage: the main job, its flags and the commands.
func usage(w io.Writer) {
	fmt.Fprint(w, jobUsage+"\nCommands:\n")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, "  help     show this help, or a command's: repagent help <command>\n")
	fmt.Fprint(w, "\nFlags of the main job:\n"+newJobFlags().fs.FlagUsages())
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
