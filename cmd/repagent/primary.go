package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/replicate"
)

const primaryUsage = `Usage: repagent primary --backup HOST:PORT [flags]

Run a test VM and replicate it to a backup (repagent backup --listen ADDR):
an initial sync while the guest runs, then a checkpoint every --interval,
acknowledged by the backup. It prints the sync rounds, a status line per
second (as the main job: see repagent --help) and, at Ctrl-C or after
--duration, stops replication on purpose (the backup does not fail over),
prints a summary and verifies the guest's memory.

With --disk, the guest has a block device over that image, and its writes
are mirrored: an initial sync (the blocks that differ from the backup's
--disk image, while the guest runs; a line per phase), then each epoch's
writes inside the epoch, applied by the backup with the epoch's memory. The
status lines then show the disk writes mirrored per second, and the summary
the sync and the totals.

If the backup is lost, it says "backup lost: VM running UNPROTECTED" on
stderr and keeps the guest running, its status lines marked UNPROTECTED, until
the end; that is reported, not a failure.

With --etcd and --name (the same on the backup), the VM is fenced: the
primary owns it through a lease in etcd, releases held output only while it
knows the lease valid, and when it cannot renew in time (etcd unreachable,
with --on-etcd-loss fence) it stops releasing output, pauses the VM, prints
"fenced: ..." and exits with 4. A backup lost while the lease holds leaves
the VM running unprotected, as above, and the primary tries the backup
every second to protect it again. Another owner makes it refuse to start.

Exit code 0 on success, 1 on a runtime error, 2 on a usage error, 4 when
fenced.

Flags:
`

// runPrimary is the primary command.
func runPrimary(args []string, stdout, stderr io.Writer) int {
	o, err := parsePrimaryArgs(args, os.Getenv(envFault))
	help := func(w io.Writer) { fmt.Fprint(w, primaryUsage+newPrimaryFlags().fs.FlagUsages()) }
	code := func(err error) int {
		if errors.Is(err, replicate.ErrFenced) {
			return agent.ExitFenced
		}
		return 1
	}
	return execute("repagent primary", o, err, help, code, stdout, stderr)
}
