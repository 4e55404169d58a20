// Command repagent replicates a running KVM guest to a backup host.
//
// For now it has one subcommand, vm, which runs the built-in test VM; the
// replication job itself (primary, backup, bench and the default job) comes
// later.
package main

import (
	"fmt"
	"io"
	"os"
	"strings"
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
		{"vm", "run the test VM, optionally saving or restoring a snapshot", runVM},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
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

// runJob is the default job, `repagent [flags]`, which replicates a VM. It is
// not built yet.
func runJob(args []string, stdout, stderr io.Writer) int {
	usage(stderr)
	fmt.Fprintln(stderr, "\nrepagent: the replication job is not built yet; use a command")
	return 2
}

func findCommand(name string) (command, bool) {
	for _, c := range commands() {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

func usage(w io.Writer) {
	fmt.Fprint(w, "Usage: repagent <command> [flags]\n\nCommands:\n")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, "  help     show this help, or a command's: repagent help <command>\n")
}
