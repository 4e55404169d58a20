package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/replicate"
)

const migrateUsage = `Usage: repagent migrate --to HOST:PORT [flags]

Run a test VM and move it, live, to the host of a backup (repagent backup
--listen ADDR, which resumes it there): the primary's initial sync while the
guest runs, its checkpoints at --interval, and, once the first checkpoint is
acknowledged, a switchover: a final pause after which the VM stays stopped
here, its last epoch sent and acknowledged, then the destination resumes it
and says so. Output held up to that epoch is released (the destination
holds it), nothing after it; with --tap the destination announces the
guest's MAC and IP on its own tap; with --disk the destination's image is
the disk of that epoch.

On success it prints, as QEMU's query-migrate reports them:

  migrated: epoch=E pages=N total=T ms downtime=D ms (final pause P ms, acknowledged A ms) paused-at=UNIXNANO

total from the start of replication to the destination's word that the VM
runs, downtime from the final pause to that word (which comes one trip over
the link after the destination's first guest instruction); then it verifies
the guest as it stopped here, the state the destination resumed, and exits.

If the destination cannot be reached, refuses, or dies before it says it
runs the VM, the VM runs on here (unprotected, its output released) until
--duration or Ctrl-C, is verified, and the exit code is 5. If the
destination falls silent after the switchover without answering, the VM
may run there: it stays paused here, and the exit code is 6. Exit code 0
when migrated, 1 on a runtime error, 2 on a usage error. A VM fenced
through etcd cannot be migrated yet.

Flags:
`

// newMigrateFlags are the primary's flags with --to for --backup, without
// fencing.
func newMigrateFlags() *primaryFlags {
	f := newDestFlags("migrate", "to", "the destination")
	f.registerGuest("the destination")
	f.fs.DurationVar(&f.switchoverAfter, "switchover-after", 0, "switch over no sooner than this long after the first checkpoint (default 0: at once); until then the VM runs protected by the destination")
	return f
}

// parseMigrateArgs parses the migrate command's arguments.
func parseMigrateArgs(args []string) (*agent.PrimaryJob, error) {
	f := newMigrateFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return nil, err
	}
	o, err := f.job()
	if err != nil {
		return nil, err
	}
	if f.switchoverAfter < 0 {
		return nil, usagef("--switchover-after %v: must not be negative", f.switchoverAfter)
	}
	o.Migrate, o.SwitchoverAfter = true, f.switchoverAfter
	return o, nil
}

// runMigrate is the migrate command.
func runMigrate(args []string, stdout, stderr io.Writer) int {
	o, err := parseMigrateArgs(args)
	help := func(w io.Writer) { fmt.Fprint(w, migrateUsage+newMigrateFlags().fs.FlagUsages()) }
	code := func(err error) int {
		var he *replicate.HandoverError
		switch {
		case errors.As(err, &he) && he.Unconfirmed:
			return agent.ExitUnconfirmed
		case errors.As(err, new(*agent.MigrationError)):
			return agent.ExitMigrationFailed
		}
		return 1
	}
	return execute("repagent migrate", o, err, help, code, stdout, stderr)
}
