package fence

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultTTL is the lease TTL when Config.TTL is zero.
const DefaultTTL = 2 * time.Second

// Errors an Owner reports through Cause once Lost is closed.
var (
	// ErrLapsed: no renewal succeeded in time, so the lease can no longer be
	// known valid (etcd unreachable or hung, or too slow).
	ErrLapsed = errors.New("fence: lease validity lapsed")
	// ErrDisplaced: etcd says this agent no longer owns the VM: the lease is
	// gone, or the owner key was deleted or holds another value.
	ErrDisplaced = errors.New("fence: owner key lost")
	// ErrReleased: Release was called.
	ErrReleased = errors.New("fence: released")
)

// HeldError is returned by Acquire when another agent owns the VM.
type HeldError struct {
	Name   string // the VM
	Holder string // the owner key's value: the owning agent's ID
}

func (e *HeldError) Error() string {
	return fmt.Sprintf("vm %q is owned by %q (stop it there, or wait for its lease to expire)", e.Name, e.Holder)
}

// Config says which VM to own, as whom, and how.
type Config struct {
	// Client is the etcd client; the caller keeps ownership of it.
	Client *clientv3.Client
	// Name is the VM's name; it may not contain '/'.
	Name string
	// ID is this agent's identity, such as host:pid: the owner key's value.
	ID string
	// TTL is the lease TTL: DefaultTTL when zero, rounded up to whole
	// seconds (etcd's unit), at least 1s. The server may grant more.
	TTL time.Duration
	// Margin is taken off each renewal's validity: TTL/4 when zero, at most
	// TTL/2.
	Margin time.Duration
	// Log receives ownership changes; nil discards them.
	Log *slog.Logger
}

// Key is the owner key for the VM called name.
func Key(name string) string { return "/repagent/vm/" + name + "/owner" }

func (c Config) check() (Config, error) {
	if c.Client == nil {
		return c, errors.New("fence: config has no etcd client")
	}
	if c.Name == "" || strings.Contains(c.Name, "/") {
		return c, fmt.Errorf("fence: bad vm name %q (want a non-empty name without '/')", c.Name)
	}
	if c.ID == "" {
		return c, errors.New("fence: config has no agent id")
	}
	if c.TTL == 0 {
		c.TTL = DefaultTTL
	}
	if c.TTL < 0 {
		return c, fmt.Errorf("fence: negative ttl %v", c.TTL)
	}
	if r := c.TTL % time.Second; r != 0 {
		c.TTL += time.Second - r
	}
	if c.Margin == 0 {
		c.Margin = c.TTL / 4
	}
	if c.Margin < 0 || c.Margin > c.TTL/2 {
		return c, fmt.Errorf("fence: margin %v out of range (0 to ttl/2 = %v)", c.Margin, c.TTL/2)
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// Owner is this agent's ownership of a VM, held until Lost closes.
type Owner struct {
	cfg   Config
	key   string
	lease clientv3.LeaseID
	rev   int64

	mu         sync.Mutex
	validUntil time.Time
	cause      error
	expiry     *time.Timer

	lost chan struct{}
	stop context.CancelFunc
	done sync.WaitGroup
}

// Acquire makes this agent the VM's owner if nobody owns it; if another
// agent does, it returns a *HeldError. The primary calls it at start.
func Acquire(ctx context.Context, cfg Config) (*Owner, error) {
	cfg, err := cfg.check()
	if err != nil {
		return nil, err
	}
	o, holder, err := try(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if o == nil {
		return nil, &HeldError{Name: cfg.Name, Holder: holder}
	}
	return o, nil
}

// TakeOver waits until nobody owns the VM (its owner released it, or the
// owner's lease expired), then makes this agent the owner. It returns when
// it has won the key, or with ctx's error. Of several agents taking over at
// once exactly one wins; the others keep waiting. The backup calls it at
// failover.
func TakeOver(ctx context.Context, cfg Config) (*Owner, error) {
	cfg, err := cfg.check()
	if err != nil {
		return nil, err
	}
	key := Key(cfg.Name)
	for {
		// Every request is bounded: across a partition a request can hang
		// until TCP gives up, long after etcd is reachable again.
		rctx, cancel := context.WithTimeout(ctx, cfg.TTL)
		resp, err := cfg.Client.Get(rctx, key)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("take over vm %q: read owner: %w", cfg.Name, ctx.Err())
			}
			cfg.Log.Warn("fence: cannot read vm's owner; trying again", "vm", cfg.Name, "err", err)
			pause(ctx, cfg.TTL/10)
			continue
		}
		if len(resp.Kvs) == 0 {
			rctx, cancel := context.WithTimeout(ctx, 2*cfg.TTL)
			o, holder, err := try(rctx, cfg)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return nil, err
				}
				cfg.Log.Warn("fence: cannot own vm; trying again", "vm", cfg.Name, "err", err)
				pause(ctx, cfg.TTL/10)
				continue
			}
			if o != nil {
				return o, nil
			}
			cfg.Log.Info("fence: lost the race for vm", "vm", cfg.Name, "holder", holder)
			continue
		}
		cfg.Log.Info("fence: waiting for vm's owner to go", "vm", cfg.Name, "holder", string(resp.Kvs[0].Value))
		if err := waitDeleted(ctx, cfg, key, resp.Header.Revision); err != nil {
			return nil, fmt.Errorf("take over vm %q: %w", cfg.Name, err)
		}
	}
}

// pause waits d, or until ctx ends.
func pause(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// waitDeleted returns once the key is seen deleted after rev, or after a
// TTL without news (the caller reads the key again: a watch may stall
// silently), or with ctx's error.
func waitDeleted(ctx context.Context, cfg Config, key string, rev int64) error {
	wctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), cfg.TTL)
	defer cancel()
	for wr := range cfg.Client.Watch(wctx, key, clientv3.WithRev(rev+1)) {
		if wr.Err() != nil {
			// No leader, or the watch was refused: read again soon.
			select {
			case <-wctx.Done():
			case <-time.After(cfg.TTL / 10):
			}
			break
		}
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				return nil
			}
		}
	}
	return ctx.Err()
}

// try grants a lease and puts the key with it if the key is absent. It
// returns the Owner, or nil and the holder's ID (revoking the unused lease).
func try(ctx context.Context, cfg Config) (*Owner, string, error) {
	key := Key(cfg.Name)
	sent := time.Now()
	g, err := cfg.Client.Grant(ctx, int64(cfg.TTL/time.Second))
	if err != nil {
		return nil, "", fmt.Errorf("own vm %q: grant lease: %w", cfg.Name, err)
	}
	txn, err := cfg.Client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, cfg.ID, clientv3.WithLease(g.ID))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		revoke(cfg, g.ID)
		return nil, "", fmt.Errorf("own vm %q: put owner key: %w", cfg.Name, err)
	}
	if !txn.Succeeded {
		revoke(cfg, g.ID)
		holder := ""
		if kvs := txn.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			holder = string(kvs[0].Value)
		}
		return nil, holder, nil
	}
	o := &Owner{
		cfg:        cfg,
		key:        key,
		lease:      g.ID,
		rev:        txn.Header.Revision,
		validUntil: sent.Add(time.Duration(g.TTL)*time.Second - cfg.Margin),
		lost:       make(chan struct{}),
	}
	cfg.Log.Info("fence: own vm", "vm", cfg.Name, "id", cfg.ID, "revision", o.rev, "ttl", g.TTL)
	o.start()
	return o, "", nil
}

// revoke drops an unused lease, best effort: unrevoked, it expires anyway.
func revoke(cfg Config, id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), cfg.TTL)
	defer cancel()
	cfg.Client.Revoke(ctx, id)
}

func (o *Owner) start() {
	ctx, cancel := context.WithCancel(context.Background())
	o.stop = cancel
	o.mu.Lock()
	o.expiry = time.AfterFunc(time.Until(o.validUntil), o.checkExpiry)
	o.mu.Unlock()
	o.done.Add(2)
	go o.renew(ctx)
	go o.watch(ctx)
}

// Valid reports whether the lease is known valid, with the margin. After
// Lost is closed it is false for good.
func (o *Owner) Valid() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.cause == nil && time.Now().Before(o.validUntil)
}

// Lost is closed, once, when this agent can no longer know it owns the VM:
// validity lapsed, etcd reports the key or lease gone, or Release was
// called. The owner must then fence itself.
func (o *Owner) Lost() <-chan struct{} { return o.lost }

// Cause is nil while the Owner holds the VM, then ErrLapsed, ErrDisplaced
// or ErrReleased, saying why Lost closed.
func (o *Owner) Cause() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.cause
}

// Revision is the etcd revision at which this agent won the owner key: a
// fencing token, larger for every later owner.
func (o *Owner) Revision() int64 { return o.rev }

// Release gives the VM up: Lost closes, then the lease is revoked so the
// key is free at once. Call it after this agent stopped releasing output.
func (o *Owner) Release(ctx context.Context) error {
	o.lose(ErrReleased)
	o.done.Wait()
	_, err := o.cfg.Client.Revoke(ctx, o.lease)
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("release vm %q: revoke lease: %w", o.cfg.Name, err)
	}
	o.cfg.Log.Info("fence: released vm", "vm", o.cfg.Name, "id", o.cfg.ID)
	return nil
}

// lose closes Lost, once, with cause, and stops the renewal and watch.
func (o *Owner) lose(cause error) {
	o.mu.Lock()
	if o.cause != nil {
		o.mu.Unlock()
		return
	}
	o.cause = cause
	o.expiry.Stop()
	close(o.lost)
	o.mu.Unlock()
	o.stop()
	if cause != ErrReleased {
		o.cfg.Log.Warn("fence: lost vm: fence now", "vm", o.cfg.Name, "id", o.cfg.ID, "cause", cause)
	}
}

// checkExpiry runs when validity may have lapsed; a renewal may have moved
// validUntil on, in which case it waits again.
func (o *Owner) checkExpiry() {
	o.mu.Lock()
	left := time.Until(o.validUntil)
	if left > 0 && o.cause == nil {
		o.expiry.Reset(left)
		o.mu.Unlock()
		return
	}
	o.mu.Unlock()
	o.lose(ErrLapsed)
}

// renew sends one KeepAliveOnce every TTL/3, each bounded by TTL/3.
func (o *Owner) renew(ctx context.Context) {
	defer o.done.Done()
	period := o.cfg.TTL / 3
	t := time.NewTimer(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sent := time.Now()
		t.Reset(period)
		rctx, cancel := context.WithTimeout(ctx, period)
		resp, err := o.cfg.Client.KeepAliveOnce(rctx, o.lease)
		cancel()
		switch {
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			o.lose(ErrDisplaced)
			return
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			o.cfg.Log.Warn("fence: renew lease", "vm", o.cfg.Name, "err", err)
			continue
		}
		until := sent.Add(time.Duration(resp.TTL)*time.Second - o.cfg.Margin)
		o.mu.Lock()
		if o.cause == nil && until.After(o.validUntil) {
			o.validUntil = until
		}
		o.mu.Unlock()
	}
}

// watch closes Lost when the key is deleted or holds another value.
func (o *Owner) watch(ctx context.Context) {
	defer o.done.Done()
	rev := o.rev
	for ctx.Err() == nil {
		for wr := range o.cfg.Client.Watch(ctx, o.key, clientv3.WithRev(rev+1)) {
			if wr.CompactRevision != 0 {
				// History is gone: read the key as it is now.
				rev = wr.CompactRevision - 1
				break
			}
			if wr.Err() != nil {
				break
			}
			for _, ev := range wr.Events {
				rev = ev.Kv.ModRevision
				if ev.Type == clientv3.EventTypeDelete || string(ev.Kv.Value) != o.cfg.ID {
					o.lose(ErrDisplaced)
					return
				}
			}
		}
		if ctx.Err() != nil {
			return
		}
		gctx, cancel := context.WithTimeout(ctx, o.cfg.TTL/3)
		resp, err := o.cfg.Client.Get(gctx, o.key)
		cancel()
		if err == nil {
			if len(resp.Kvs) == 0 || string(resp.Kvs[0].Value) != o.cfg.ID || resp.Kvs[0].CreateRevision != o.rev {
				o.lose(ErrDisplaced)
				return
			}
			rev = resp.Header.Revision
		}
		select {
		case <-ctx.Done():
		case <-time.After(o.cfg.TTL / 3):
		}
	}
}

// StandbyKey is the key naming the backup session that holds the state of
// the VM called name: its value is a session ID, or NoStandby.
func StandbyKey(name string) string { return "/repagent/vm/" + name + "/standby" }

// NoStandby is the standby key's value while no backup holds the VM's state
// (the primary runs unprotected, or a backup resumed it).
const NoStandby = "none"

// SetStandby records session (NoStandby when "") as the VM's standby, in a
// transaction that succeeds only while this agent's owner key is in etcd:
// the record is then written under this ownership, before any later owner
// can win the key. The primary calls it before it first releases a
// session's output, and with "" before it releases output its lost backup
// did not acknowledge; a backup that wins the key resumes only the session
// the record names (Claim).
func (o *Owner) SetStandby(ctx context.Context, session string) error {
	if session == "" {
		session = NoStandby
	}
	if !o.Valid() {
		return fmt.Errorf("record standby of vm %q: %w", o.cfg.Name, o.lostCause())
	}
	txn, err := o.cfg.Client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(o.key), "=", o.rev),
			clientv3.Compare(clientv3.Value(o.key), "=", o.cfg.ID)).
		Then(clientv3.OpPut(StandbyKey(o.cfg.Name), session)).
		Commit()
	if err != nil {
		return fmt.Errorf("record standby of vm %q: %w", o.cfg.Name, err)
	}
	if !txn.Succeeded {
		o.lose(ErrDisplaced)
		return fmt.Errorf("record standby of vm %q: %w", o.cfg.Name, ErrDisplaced)
	}
	o.cfg.Log.Info("fence: standby recorded", "vm", o.cfg.Name, "standby", session, "revision", txn.Header.Revision)
	return nil
}

// lostCause is Cause, or ErrLapsed while validity ran out before Lost
// closed.
func (o *Owner) lostCause() error {
	if err := o.Cause(); err != nil {
		return err
	}
	return ErrLapsed
}

// StaleError is Claim's refusal: the standby record does not name the
// session whose replica the backup holds, so the primary released output
// that replica does not have (or another backup holds the VM now).
type StaleError struct {
	Name    string
	Session string // the replica's session
	Standby string // the record's
}

func (e *StaleError) Error() string {
	if e.Standby == "" {
		return fmt.Sprintf("vm %q: no standby was ever recorded, and the replica is of session %s", e.Name, e.Session)
	}
	if e.Standby == NoStandby {
		return fmt.Sprintf("vm %q: the replica of session %s is stale: the primary ran on unprotected after it (its output since is not in this replica)", e.Name, e.Session)
	}
	return fmt.Sprintf("vm %q: the replica of session %s is stale: the VM's standby is session %q", e.Name, e.Session, e.Standby)
}

// Claim is the backup's failover step: it waits until it owns the VM
// (TakeOver), checks that the standby record names session, the one whose
// replica it holds, and records that no backup holds the VM any more (its
// output is about to be released unheld). On a stale replica it releases
// the VM and returns a *StaleError. On success the caller resumes the VM and
// fences it when the Owner's Lost closes.
func Claim(ctx context.Context, cfg Config, session string) (*Owner, error) {
	o, err := TakeOver(ctx, cfg)
	if err != nil {
		return nil, err
	}
	// Bounded, as TakeOver's requests: a failed claim releases the key,
	// and the lease would expire anyway.
	release := func() {
		rctx, cancel := context.WithTimeout(context.Background(), o.cfg.TTL)
		defer cancel()
		o.Release(rctx)
	}
	rctx, cancel := context.WithTimeout(ctx, o.cfg.TTL)
	defer cancel()
	resp, err := o.cfg.Client.Get(rctx, StandbyKey(o.cfg.Name))
	if err != nil {
		release()
		return nil, fmt.Errorf("claim vm %q: read standby: %w", o.cfg.Name, err)
	}
	standby := ""
	if len(resp.Kvs) > 0 {
		standby = string(resp.Kvs[0].Value)
	}
	if standby != session || session == "" {
		release()
		return nil, &StaleError{Name: o.cfg.Name, Session: session, Standby: standby}
	}
	if err := o.SetStandby(rctx, ""); err != nil {
		release()
		return nil, fmt.Errorf("claim vm %q: %w", o.cfg.Name, err)
	}
	return o, nil
}
