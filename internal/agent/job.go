package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/repagent/repagent/internal/labcert"
	"github.com/repagent/repagent/internal/netlab"
	"github.com/repagent/repagent/internal/netns"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/protect"
	"github.com/repagent/repagent/testvm"
)

// backupResult is what an in-process backup's Serve returned.
type backupResult struct {
	fo  *replicate.Failover
	err error
}

// Run runs the main job. It calls stopSignals once replication is over, so
// that a second Ctrl-C during the verification kills the process.
func (o *Job) Run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) (err error) {
	var l *netlab.Lab
	if o.Net {
		if l, err = netlab.New(); err != nil {
			return err
		}
		defer func() {
			if cerr := l.Close(); cerr != nil && err == nil {
				err = cerr
			}
		}()
		o.Repl.Tap = l.Tap
	}
	// The job's disk: a primary image the guest writes through the mirror,
	// and a backup image the in-process backup keeps at the checkpoint it
	// holds. The default workload (dirty) does not write its disk: testvm
	// runs one workload per vCPU, and none but the disk workload uses the
	// block device, so mixing page and block writes on one guest would take
	// a change to testvm. The job still mirrors the idle disk (the sync, an
	// empty disk stream every epoch, and at the end a check that the backup
	// image equals the primary's); --workload disk makes the guest write it.
	var disks *jobDisks
	var bdisk *os.File
	if o.Disk {
		if disks, err = newJobDisks(); err != nil {
			return err
		}
		defer func() {
			if cerr := disks.close(); cerr != nil && err == nil {
				err = cerr
			}
		}()
		o.Repl.Disk = disks.primary
		if bdisk, err = openDisk(disks.backup, o.Guest.Disk.Blocks); err != nil {
			return err
		}
		defer bdisk.Close() // after the backup's Close
		if !o.Repl.Quiet {
			fmt.Fprintf(stdout, "disk: %s, primary image %s, backup image %s (removed at exit)\n",
				testvm.FormatSize(JobDiskSize), disks.primary, disks.backup)
		}
	}
	var backupTLS *tls.Config
	if o.TLS {
		pt, bt, err := labcert.LoadPair()
		if err != nil {
			return fmt.Errorf("--tls: %w", err)
		}
		o.Repl.TLS, backupTLS = pt.Client(), bt.Server()
	}
	r, err := newReplicator("repagent", o.Repl, o.Guest, stdout, stderr, nil)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := r.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	// --metrics serves both sides' metrics: the in-process backup's too.
	bm := newBackupMetrics(o.Repl.Metrics)
	stopMetrics, err := serveMetrics(ctx, o.Repl.Metrics, stdout, r.metrics, bm)
	if err != nil {
		return err
	}
	defer stopMetrics()
	if l != nil {
		r.netDo = func(f func() error) error { return netns.Do(l.Lan, f) }
	}
	if err := r.start(ctx); err != nil {
		return err
	}
	if l != nil {
		stop, err := o.startClient(l, r, stdout)
		if err != nil {
			return err
		}
		defer stop()
	}

	// The backup, in this process. It fails over only if the primary side
	// breaks; the job then checks that the checkpoint restores, but does not
	// run a second copy of the guest beside the first.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the in-process backup: %w", err)
	}
	rmem := &replicaMemory{}
	// One session: the job's primary is the only one, and its end is the job's.
	bcfg := replicate.BackupConfig{NewMemory: rmem.new, HeartbeatTimeout: o.Repl.HeartbeatTimeout, Log: r.log.With("side", "backup"),
		TLS: backupTLS, Once: true}
	pb := protect.BackupConfig{Engine: bcfg, Metrics: bm, Restore: func(cp *replicate.Checkpoint, dev protect.Devices) (*protect.Restored, error) {
		// The failover's proof: the checkpoint restores. The guest is not
		// run a second time beside the first.
		m, err := testvm.Restore(cp.State, cp.Memory, testvm.RestoreOptions{DiskIO: dev.Disk})
		if err != nil {
			cp.Memory.Close()
			return nil, err
		}
		return &protect.Restored{Start: m.Close}, nil
	}}
	if bdisk != nil {
		pb.Disk = bdisk
	}
	pbk, err := protect.NewBackup(pb)
	if err != nil {
		ln.Close()
		return err
	}
	b := pbk.Engine()
	defer b.Close()
	bctx, bcancel := context.WithCancel(context.Background())
	defer bcancel()
	bdone := make(chan backupResult, 1)
	go func() {
		fo, err := pbk.Serve(bctx, ln)
		bdone <- backupResult{fo, err}
	}()

	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return fmt.Errorf("connect to the in-process backup: %w", err)
	}
	if err := r.newPrimary(); err != nil {
		conn.Close()
		return err
	}
	lost, rerr := r.replicate(ctx, conn)

	// The primary said bye (or broke): the backup's Serve returns soon.
	var br backupResult
	wait := r.backupWait()
	select {
	case br = <-bdone:
	case <-time.After(wait):
		bcancel()
		br = <-bdone
	}
	stopSignals()
	if rerr != nil {
		return rerr
	}
	if err := r.finish(stdout, lost); err != nil {
		return err
	}
	if lost != nil {
		return fmt.Errorf("replication failed: %w", lostCause(lost))
	}
	if err := checkBackup(stdout, b, br, r); err != nil {
		return err
	}
	if bdisk != nil {
		if err := checkBackupDisk(stdout, b, rmem.file(), bdisk, r); err != nil {
			return err
		}
	}
	fmt.Fprintln(stdout, "verification passed")
	return nil
}

// replicaMemory is the in-process backup's NewMemory: it keeps the newest
// replica's file, so that the job can check the backup's disk image against
// the replica's memory once the session is over. The backup owns the file.
type replicaMemory struct {
	mu sync.Mutex
	f  *os.File
}

func (rm *replicaMemory) new(size uint64) (*os.File, error) {
	f, err := testvm.NewMemFile(size)
	if err == nil {
		rm.mu.Lock()
		rm.f = f
		rm.mu.Unlock()
	}
	return f, err
}

func (rm *replicaMemory) file() *os.File {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	return rm.f
}

// checkBackupDisk checks the in-process backup's disk image once the primary
// stopped on purpose (checkBackup passed): for the disk workload, it must be
// exactly the disk the guest's records in the replica's memory imply
// (testvm.VerifyDiskImage, every block); for the others, which never write
// their disk, it must equal the primary's image byte for byte.
func checkBackupDisk(w io.Writer, b *replicate.Backup, mem *os.File, img *os.File, r *replicator) error {
	epoch, _ := b.LastCheckpoint()
	if epoch == 0 || mem == nil {
		return nil // no checkpoint: checkBackup said so
	}
	if r.cfg.Workload == testvm.Disk {
		line, err := verifyDiskLine(mem, img)
		if err != nil {
			fmt.Fprintf(w, "  backup: disk image at epoch %d NOT verified: %v\n", epoch, err)
			return fmt.Errorf("backup: disk image does not match epoch %d: %w", epoch, err)
		}
		fmt.Fprintf(w, "  backup: disk image at epoch %d verified against the replica's records: %s\n", epoch, line)
		return nil
	}
	same, err := sameImages(img, r.diskFile, r.mirror.Size())
	if err != nil {
		return fmt.Errorf("backup: compare disk images: %w", err)
	}
	if !same {
		fmt.Fprintf(w, "  backup: disk image at epoch %d NOT verified: it differs from the primary's, and the %s workload does not write its disk\n", epoch, r.cfg.Workload)
		return fmt.Errorf("backup: disk image differs from the primary's")
	}
	fmt.Fprintf(w, "  backup: disk image at epoch %d verified: equal to the primary's (%s; the %s workload does not write its disk)\n",
		epoch, testvm.FormatSize(uint64(r.mirror.Size())), r.cfg.Workload)
	return nil
}

// sameImages reports whether the first size bytes of a and b are equal.
func sameImages(a, b io.ReaderAt, size int64) (bool, error) {
	const chunk = 1 << 20
	ba, bb := make([]byte, chunk), make([]byte, chunk)
	for off := int64(0); off < size; off += chunk {
		n := min(chunk, size-off)
		if _, err := a.ReadAt(ba[:n], off); err != nil {
			return false, err
		}
		if _, err := b.ReadAt(bb[:n], off); err != nil {
			return false, err
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			return false, nil
		}
	}
	return true, nil
}

// startClient starts the job's client: a baseline of round trips before
// replication, then echo requests at --client-rate until stop.
func (o *Job) startClient(l *netlab.Lab, r *replicator, stdout io.Writer) (stop func(), err error) {
	c, err := l.NewEchoClient(netip.AddrPortFrom(o.Guest.Net.IP, o.Guest.Net.Port), o.ClientRate)
	if err != nil {
		return nil, err
	}
	base, err := c.Ping(20)
	if err != nil {
		c.Close()
		return nil, err
	}
	if !o.Repl.Quiet {
		fmt.Fprintf(stdout, "network: guest %s on %s (namespace %s), client %s in %s; round trip before replication %s\n",
			o.Guest.Net.IP, l.Tap, l.Lan, l.ClientIP, l.Cli, dur(base))
	}
	cctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(cctx) }()
	r.client = c
	return func() { cancel(); <-done; c.Close() }, nil
}

// backupWait is how long the in-process backup may take to notice the end of
// the session once the primary stopped.
func (r *replicator) backupWait() time.Duration {
	return max(r.o.HeartbeatTimeout, 5*r.o.Interval, replicate.MinHeartbeatTimeout) + 5*time.Second
}

// checkBackup checks that the in-process backup saw the primary stop on
// purpose and holds exactly the last acknowledged checkpoint: the same epoch,
// and replica memory that digests to that epoch's digest.
func checkBackup(w io.Writer, b *replicate.Backup, br backupResult, r *replicator) error {
	r.mu.Lock()
	last, synced := r.total.Last, r.synced
	r.mu.Unlock()
	epoch, digest := b.LastCheckpoint()
	switch {
	case br.fo != nil:
		return fmt.Errorf("the in-process backup failed over to epoch %d: %v", br.fo.Epoch, br.fo.Cause)
	case last == nil && epoch == 0 && !synced && (errors.Is(br.err, replicate.ErrPrimaryStopped) ||
		errors.Is(br.err, context.Canceled) || errors.Is(br.err, replicate.ErrNoCheckpoint)):
		// The run ended during the sync: between rounds the primary says
		// bye, inside one it cuts the stream off, and the backup sees the
		// stream end with no checkpoint, as it should.
		fmt.Fprintln(w, "  backup: no checkpoint (the run ended during the initial sync: the VM was never protected)")
		return nil
	case last == nil && epoch == 0 && (errors.Is(br.err, replicate.ErrPrimaryStopped) || errors.Is(br.err, context.Canceled)):
		fmt.Fprintln(w, "  backup: no checkpoint (stopped before the first epoch was acknowledged)")
		return nil
	case !errors.Is(br.err, replicate.ErrPrimaryStopped):
		return fmt.Errorf("in-process backup: %w", br.err)
	case last == nil:
		return fmt.Errorf("backup: holds epoch %d, but the primary saw no epoch acknowledged", epoch)
	}
	if epoch != last.Epoch || digest != last.Digest {
		return fmt.Errorf("backup: holds epoch %d digest %s, the primary's last acknowledged epoch is %d digest %s",
			epoch, replicate.FormatDigest(digest), last.Epoch, replicate.FormatDigest(last.Digest))
	}
	d, err := b.ReplicaDigest()
	if err != nil {
		return fmt.Errorf("backup: digest replica: %w", err)
	}
	if d != digest {
		fmt.Fprintf(w, "  backup: replica at epoch %d NOT verified: memory digests to %s, the checkpoint's digest is %s\n",
			epoch, replicate.FormatDigest(d), replicate.FormatDigest(digest))
		return fmt.Errorf("backup: replica memory does not match epoch %d", epoch)
	}
	fmt.Fprintf(w, "  backup: replica at epoch %d, digest %s (verified: its memory digests to the primary's)\n", epoch, replicate.FormatDigest(digest))
	return nil
}
