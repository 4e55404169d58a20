package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

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
the end; that is reported, not a failure. Exit code 0 on success, 1 on a
runtime error, 2 on a usage error.

Flags:
`

// runPrimary is the primary command.
func runPrimary(args []string, stdout, stderr io.Writer) int {
	o, err := parsePrimaryArgs(args, os.Getenv(envFault))
	help := func(w io.Writer) { fmt.Fprint(w, primaryUsage+newPrimaryFlags().fs.FlagUsages()) }
	return execute("repagent primary", o, err, help, nil, stdout, stderr)
}

// run builds and starts the VM, connects to the backup and replicates until
// the duration is over or ctx ends, then summarizes. A lost backup is not an
// error: the guest survived.
func (o *primaryOptions) run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) (err error) {
	r, err := newReplicator("repagent primary", o.repl, o.cfg, stdout, stderr, o.fault)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := r.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	stopMetrics, err := serveMetrics(ctx, o.repl.metrics, stdout, r.metrics)
	if err != nil {
		return err
	}
	defer stopMetrics()
	if err := r.start(ctx); err != nil {
		return err
	}
	conn, err := dialBackup(ctx, o.backup, o.connectTimeout)
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped before there was anything to replicate
		}
		return err
	}
	if err := r.newPrimary(); err != nil {
		conn.Close()
		return err
	}
	lost, err := r.replicate(ctx, conn)
	stopSignals()
	if err != nil {
		return r.diskHint(err)
	}
	if err := r.finish(stdout, lost); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "verification passed")
	return nil
}

// diskHint adds to a backup's refusal that is about the disk what the user
// can do about it, in terms of flags: the engine names its own API.
func (r *replicator) diskHint(err error) error {
	var refused *replicate.RefusedError
	if !errors.As(err, &refused) || !strings.Contains(refused.Reason, "disk") {
		return err
	}
	if r.mirror != nil {
		return fmt.Errorf("%w (this primary mirrors --disk %s, %d bytes: the backup needs --disk with an image of exactly that size)", err, r.o.disk, r.mirror.Size())
	}
	return fmt.Errorf("%w (this primary has no --disk: give it one, or drop the backup's --disk)", err)
}
