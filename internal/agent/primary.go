package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/repagent/repagent/replicate"
)

// Run builds and starts the VM, connects to the backup and replicates until
// the duration is over or ctx ends, then summarizes. A lost backup is not an
// error: the guest survived.
func (o *PrimaryJob) Run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) (err error) {
	r, err := newReplicator("repagent primary", o.Repl, o.Guest, stdout, stderr, o.Fault)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := r.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if o.Fencing != nil {
		if r.fencer, err = newFencer(o.Fencing, r.log); err != nil {
			return err
		}
		defer r.fencer.close() // after r.close, which releases the VM
		r.redial = func(ctx context.Context) (net.Conn, error) { return dialBackup(ctx, o.Backup, time.Second) }
	}
	stopMetrics, err := serveMetrics(ctx, o.Repl.Metrics, stdout, r.metrics)
	if err != nil {
		return err
	}
	defer stopMetrics()
	if err := r.start(ctx); err != nil {
		return err
	}
	conn, err := dialBackup(ctx, o.Backup, o.ConnectTimeout)
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
		return fmt.Errorf("%w (this primary mirrors --disk %s, %d bytes: the backup needs --disk with an image of exactly that size)", err, r.o.Disk, r.mirror.Size())
	}
	return fmt.Errorf("%w (this primary has no --disk: give it one, or drop the backup's --disk)", err)
}
