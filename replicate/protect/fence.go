package protect

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/fence"
)

// Fence makes failover safe against partitions: the VM's ownership is a
// lease in etcd (replicate/fence). A primary with one acquires the VM at
// NewPrimary (another owner makes it fail with a *fence.HeldError), releases
// output only while its lease is valid, and fences the VM when it is lost;
// a backup with one resumes the VM only once it owns it and the standby
// record names the session it holds (fence.Claim).
type Fence struct {
	// Config names the etcd client, the VM and this agent, and the lease's
	// TTL and margin.
	fence.Config
	// RunOnLoss keeps a primary that cannot renew its lease (etcd
	// unreachable) running and releasing output, trying to own the VM again
	// until it can; it fences only once another agent owns the VM. It
	// trades safety for availability: should the backup lose the primary
	// too and win the VM once etcd answers it, two copies run until this
	// one learns it. The default, false, fences as soon as the lease can no
	// longer be known valid.
	RunOnLoss bool
}

// lease is the engine's replicate.Lease over fence.Owner. With RunOnLoss it
// outlives a lapse: it acquires the VM again when etcd answers, and is lost
// only when another agent owns it.
type lease struct {
	cfg Fence

	mu    sync.Mutex
	owner *fence.Owner
	cause error
	lost  chan struct{}
	stop  chan struct{}
	done  sync.WaitGroup
}

// acquire makes the lease for a primary: fence.Acquire, then (RunOnLoss)
// the watch that acquires again after a lapse.
func acquire(ctx context.Context, cfg Fence) (*lease, error) {
	o, err := fence.Acquire(ctx, cfg.Config)
	if err != nil {
		return nil, err
	}
	return watched(cfg, o), nil
}

// claimed is the lease of a backup that won the VM (fence.Claim): it
// fences on the first loss, whatever RunOnLoss says, since the resumed VM
// has no standby to keep safe and no output gate to hold.
func claimed(cfg Fence, o *fence.Owner) *lease {
	cfg.RunOnLoss = false
	return watched(cfg, o)
}

// watched is the lease over o, its watch started.
func watched(cfg Fence, o *fence.Owner) *lease {
	l := &lease{cfg: cfg, owner: o, lost: make(chan struct{}), stop: make(chan struct{})}
	l.done.Add(1)
	go l.watch()
	return l
}

// watch follows the owner: its loss is the lease's, except a lapse with
// RunOnLoss, after which it acquires the VM again every TTL/2 until it owns
// it again or finds another owner.
func (l *lease) watch() {
	defer l.done.Done()
	for {
		l.mu.Lock()
		o := l.owner
		l.mu.Unlock()
		select {
		case <-o.Lost():
		case <-l.stop:
			return
		}
		cause := o.Cause()
		if !l.cfg.RunOnLoss || !errors.Is(cause, fence.ErrLapsed) {
			l.lose(cause)
			return
		}
		ttl := l.cfg.TTL
		if ttl <= 0 {
			ttl = fence.DefaultTTL
		}
		l.cfg.Log.Warn("fence: lease lapsed: running on (on etcd loss: run), owning the VM again when etcd answers", "vm", l.cfg.Name)
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(ttl / 2):
			}
			ctx, cancel := context.WithTimeout(context.Background(), ttl)
			n, err := fence.Acquire(ctx, l.cfg.Config)
			cancel()
			var held *fence.HeldError
			if errors.As(err, &held) && held.Holder != l.cfg.ID {
				l.lose(fmt.Errorf("%w: %w", fence.ErrDisplaced, err))
				return
			}
			if err != nil {
				// Unreachable, or our own old key still there (renewals
				// that timed out here but reached etcd): it expires, and
				// the next try owns the VM again.
				continue
			}
			if err == nil {
				l.mu.Lock()
				l.owner = n
				l.mu.Unlock()
				l.cfg.Log.Warn("fence: own the VM again", "vm", l.cfg.Name, "revision", n.Revision())
				break
			}
		}
	}
}

func (l *lease) lose(cause error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cause == nil {
		l.cause = cause
		close(l.lost)
	}
}

func (l *lease) current() *fence.Owner {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.owner
}

// Valid: the owner's validity; with RunOnLoss, not lost to another owner.
func (l *lease) Valid() bool {
	if l.cfg.RunOnLoss {
		return l.Cause() == nil
	}
	return l.Cause() == nil && l.current().Valid()
}

func (l *lease) Lost() <-chan struct{} { return l.lost }

func (l *lease) Cause() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cause
}

// SetStandby records the session under the current owner. With RunOnLoss a
// record that cannot be written is logged, not refused: the primary runs
// on without it (a backup then finds an older record and refuses to resume
// a replica it cannot prove current).
func (l *lease) SetStandby(ctx context.Context, session replicate.SessionID) error {
	id := ""
	if !session.IsZero() {
		id = session.String()
	}
	err := l.current().SetStandby(ctx, id)
	if err != nil && l.cfg.RunOnLoss && l.Cause() == nil {
		l.cfg.Log.Error("fence: could not record the standby; running on (on etcd loss: run)", "vm", l.cfg.Name, "standby", id, "err", err)
		return nil
	}
	return err
}

// Revision is the current ownership's fencing token.
func (l *lease) Revision() int64 { return l.current().Revision() }

// release stops the watch and, unless the lease was lost, gives the VM up.
func (l *lease) release(ctx context.Context) error {
	close(l.stop)
	l.done.Wait()
	if l.Cause() != nil {
		return nil
	}
	l.lose(fence.ErrReleased)
	return l.current().Release(ctx)
}

// Ownership is what an embedder sees of a lease: fence its VM when Lost
// closes.
type Ownership interface {
	// Lost is closed when this agent no longer knows it owns the VM: pause
	// the VM and let no more output out.
	Lost() <-chan struct{}
	// Cause says why Lost closed.
	Cause() error
	// Revision is the etcd revision at which the VM was won: a fencing
	// token, larger for every later owner.
	Revision() int64
}

// claim is the backup's BackupConfig.Claim: fence.Claim for cp's session.
func (b *Backup) claim(ctx context.Context, cp *replicate.Checkpoint) error {
	if cp.Session.IsZero() {
		return errors.New("fencing needs a primary that speaks protocol version 4 or later (its sessions have names)")
	}
	o, err := fence.Claim(ctx, b.cfg.Fence.Config, cp.Session.String())
	if err != nil {
		return err
	}
	b.owner = claimed(*b.cfg.Fence, o)
	return nil
}
