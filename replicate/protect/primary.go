package protect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/hostsys"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/metrics"
)

// Config configures a Primary.
type Config struct {
	// Engine configures the checkpoint engine. Its VM, Gates and Stream are
	// set by Protect; Gates the caller put there are kept, after the tap's.
	Engine replicate.Config
	// Tap, when set, is the VM's tap device: NewPrimary opens it (creating
	// it if it does not exist) and puts an output gate on it, so that no
	// frame the guest sends leaves before the backup holds the checkpoint
	// that produced it (P1).
	Tap string
	// InNamespace, when set, runs f in the tap's network namespace; nil runs
	// it in the caller's. The tap and the gate are opened in it.
	InNamespace func(f func() error) error
	// Gate configures the output gate; its Interface is Tap.
	Gate ebpf.Config
	// Disk, when set, is the VM's disk image: NewPrimary puts a
	// diskmirror.Mirror on it, which the VMM must write the disk through
	// (Primary.Disk), so that the backup's image follows the checkpoints
	// (P4). The caller owns the image and closes it after Close.
	Disk diskmirror.Disk
	// Mirror and DiskSync configure the mirror and its sync to the backup.
	Mirror   diskmirror.Config
	DiskSync diskmirror.SourceConfig
	// DialTimeout bounds Run's attempts to reach the backup; 0 means 10 s.
	DialTimeout time.Duration
	// Metrics, when set, is fed every epoch, every gate epoch, the loss of
	// the backup and the end of protection; register it in a
	// prometheus.Registerer to export them.
	Metrics *metrics.PrimaryCollector
	// Fence, when set, makes the VM's ownership a lease in etcd: NewPrimary
	// acquires it (a *fence.HeldError if another agent owns the VM), the
	// engine releases output only while it is valid and fences the VM when
	// it is lost, and Close gives it up. While the VM runs unprotected after
	// Run, the embedder pauses it when Ownership().Lost() closes.
	Fence *Fence
}

// Primary protects one VM on its host: it owns the tap's output gate, the
// disk's mirror, the engine and the link to the backup, and closes them in
// order. See the package documentation for the order of calls.
type Primary struct {
	cfg    Config
	tap    *os.File
	gate   *ebpf.Gate
	mirror *diskmirror.Mirror
	eng    *replicate.Primary
	lease  *lease       // with Config.Fence
	sgate  *sessionGate // the gate as the engines see it
	// running is set while Run runs: Protect may make a new engine once it
	// returned (protection again after a lost backup).
	running atomic.Bool
}

// NewPrimary opens what cfg names: the tap and its gate (in the tap's
// namespace), the disk's mirror. Give the VMM Tap and Disk, build the VM
// over them, then call Protect.
func NewPrimary(cfg Config) (_ *Primary, err error) {
	p := &Primary{cfg: cfg}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	if f := cfg.Fence; f != nil {
		ctx, cancel := context.WithTimeout(context.Background(), max(f.TTL, fenceDialTimeout))
		p.lease, err = acquire(ctx, *f)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("own the VM: %w", err)
		}
	}
	if cfg.Tap != "" {
		if err := inNamespace(cfg.InNamespace, p.openNet); err != nil {
			return nil, err
		}
	}
	if cfg.Disk != nil {
		if p.mirror, err = diskmirror.NewMirror(cfg.Disk, cfg.Mirror); err != nil {
			return nil, fmt.Errorf("disk mirror: %w", err)
		}
	}
	return p, nil
}

// fenceDialTimeout bounds NewPrimary's wait for etcd.
const fenceDialTimeout = 10 * time.Second

// Ownership is the VM's lease with Config.Fence, nil without.
func (p *Primary) Ownership() Ownership {
	if p.lease == nil {
		return nil
	}
	return p.lease
}

func inNamespace(do func(func() error) error, f func() error) error {
	if do == nil {
		return f()
	}
	return do(f)
}

// openNet opens the tap and the gate on it. The gate passes frames until
// the engine opens the first epoch.
func (p *Primary) openNet() error {
	tap, err := hostsys.OpenTap(p.cfg.Tap)
	if err != nil {
		return err
	}
	p.tap = tap
	return p.openGate()
}

// openGate puts the output gate on the open tap.
func (p *Primary) openGate() error {
	gc := p.cfg.Gate
	gc.Interface = p.cfg.Tap
	if m, on := p.cfg.Metrics, gc.OnEpoch; m != nil {
		gc.OnEpoch = func(s ebpf.EpochStats) {
			m.ObserveGateEpoch(s)
			if on != nil {
				on(s)
			}
		}
	}
	var err error
	if p.gate, err = ebpf.New(gc); err != nil {
		return fmt.Errorf("output gate on %s: %w", p.cfg.Tap, err)
	}
	p.sgate = &sessionGate{g: p.gate}
	return nil
}

// sessionGate numbers the gate's epochs across sessions: each session's
// engine opens its epochs from 1, while the gate wants them increasing for
// its whole life. A session's epoch n is the gate's base+n.
type sessionGate struct {
	g         *ebpf.Gate
	base, top uint64 // top: the highest epoch opened (by the engine's pause goroutine)
}

func (s *sessionGate) Open(n uint64) error {
	if err := s.g.Open(s.base + n); err != nil {
		return err
	}
	s.top = max(s.top, s.base+n)
	return nil
}
func (s *sessionGate) Commit(n uint64) error  { return s.g.Commit(s.base + n) }
func (s *sessionGate) Discard(n uint64) error { return s.g.Discard(s.base + n) }
func (s *sessionGate) Release() error         { return s.g.Release() }

// nextSession starts the numbering of a new session's epochs after the
// last one's.
func (s *sessionGate) nextSession() { s.base = s.top }

// Tap is the VM's tap device for the VMM to read and write frames on; nil
// without Config.Tap. Primary owns it.
func (p *Primary) Tap() *os.File { return p.tap }

// Gate is the output gate on the tap (for its Stats); nil without a tap.
func (p *Primary) Gate() *ebpf.Gate { return p.gate }

// Disk is the mirror the VMM must write the disk through (WriteAt,
// WriteAtFUA, Sync; ReadAt reads the image); nil without Config.Disk.
func (p *Primary) Disk() *diskmirror.Mirror { return p.mirror }

// Protect makes the engine for vm, with the gate and the disk's stream. Call
// it after the VM is built; Run starts it. Once Run returned (the backup
// lost, the VM running on unprotected), Protect may be called again, for the
// same VM, to protect it again with a new engine: a new session, starting
// with a new sync. Gates of Config.Engine see each session's epochs from 1.
func (p *Primary) Protect(vm replicate.VM) (*replicate.Primary, error) {
	if p.running.Load() {
		return nil, errors.New("protect: Protect while Run runs")
	}
	if p.eng != nil && p.sgate != nil {
		p.sgate.nextSession()
	}
	ec := p.cfg.Engine
	ec.VM = vm
	if m, on := p.cfg.Metrics, ec.OnEpoch; m != nil {
		ec.OnEpoch = func(s *replicate.EpochStats) {
			m.ObserveEpoch(s)
			if on != nil {
				on(s)
			}
		}
	}
	ec.Gates = nil
	if p.sgate != nil {
		ec.Gates = append(ec.Gates, p.sgate)
	}
	ec.Gates = append(ec.Gates, p.cfg.Engine.Gates...)
	if p.lease != nil {
		ec.Lease = p.lease
	}
	if p.mirror != nil {
		src, err := diskmirror.NewSource(p.mirror, p.cfg.DiskSync)
		if err != nil {
			return nil, err
		}
		ec.Stream = src
	}
	eng, err := replicate.NewPrimary(ec)
	if err != nil {
		return nil, err
	}
	p.eng = eng
	return eng, nil
}

// Engine is the engine Protect made; nil before.
func (p *Primary) Engine() *replicate.Primary { return p.eng }

// Run connects to the backup at addr, trying again until Config.DialTimeout,
// and replicates until ctx ends (then it stops cleanly: the last epochs
// are acknowledged and the backup told not to fail over) or the session
// fails. A lost backup returns an error wrapping replicate.ErrBackupLost;
// the VM then runs on, unprotected, with its output released.
func (p *Primary) Run(ctx context.Context, addr string) error {
	if p.eng == nil {
		return errors.New("protect: Run before Protect")
	}
	timeout := p.cfg.DialTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	conn, err := Dial(ctx, addr, timeout)
	if err != nil {
		return err
	}
	return p.run(ctx, conn)
}

// RunConn is Run over a connection the caller made.
func (p *Primary) RunConn(ctx context.Context, conn net.Conn) error {
	if p.eng == nil {
		conn.Close()
		return errors.New("protect: Run before Protect")
	}
	return p.run(ctx, conn)
}

func (p *Primary) run(ctx context.Context, conn net.Conn) error {
	if !p.running.CompareAndSwap(false, true) {
		conn.Close()
		return errors.New("protect: Run while Run runs")
	}
	defer p.running.Store(false)
	err := p.eng.Run(ctx, conn)
	if errors.Is(err, replicate.ErrBackupLost) {
		p.cfg.Metrics.ObserveBackupLost()
	}
	p.cfg.Metrics.SetProtected(false) // replication is over, whichever way
	return err
}

// Close closes the gate and the tap, and with Config.Fence gives the VM up
// (unless its lease was lost). Call it after Run returned and the VM
// stopped: until then the VM writes the tap and the disk.
func (p *Primary) Close() error {
	var err error
	if p.lease != nil {
		ctx, cancel := context.WithTimeout(context.Background(), fenceDialTimeout)
		err = p.lease.release(ctx)
		cancel()
		p.lease = nil
	}
	if p.gate != nil {
		err = p.gate.Close()
		p.gate = nil
	}
	if p.tap != nil {
		err = errors.Join(err, p.tap.Close())
		p.tap = nil
	}
	return err
}

// Dial connects to the backup at addr, trying again every 100 ms until
// timeout: a backup that is still starting is waited for.
func Dial(ctx context.Context, addr string, timeout time.Duration) (net.Conn, error) {
	deadline := time.Now().Add(timeout)
	var (
		d    net.Dialer
		last error // the last failure that was not the deadline's
	)
	for {
		dctx, cancel := context.WithDeadline(ctx, deadline)
		conn, err := d.DialContext(dctx, "tcp", addr)
		cut := dctx.Err() != nil
		cancel()
		if err == nil {
			return conn, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !cut || last == nil {
			last = err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connect to backup %s: %w (gave up after %v)", addr, last, timeout)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
