package fence_test

import (
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/repagent/repagent/internal/etcdtest"
	"github.com/repagent/repagent/replicate/fence"
)

const (
	ttl = time.Second
	// eventually bounds waits for events that should come within a few TTLs.
	eventually = 15 * time.Second
)

func newClient(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{endpoint},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func config(c *clientv3.Client, id string) fence.Config {
	return fence.Config{Client: c, Name: "vm1", ID: id, TTL: ttl}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), eventually)
	t.Cleanup(cancel)
	return c
}

func acquire(t *testing.T, cfg fence.Config) *fence.Owner {
	t.Helper()
	o, err := fence.Acquire(ctx(t), cfg)
	if err != nil {
		t.Fatalf("acquire as %s: %v", cfg.ID, err)
	}
	t.Cleanup(func() { o.Release(context.Background()) })
	return o
}

type result struct {
	o   *fence.Owner
	err error
	at  time.Time
}

// takeOver runs TakeOver in the background and reports on the channel.
func takeOver(ctx context.Context, cfg fence.Config) <-chan result {
	ch := make(chan result, 1)
	go func() {
		o, err := fence.TakeOver(ctx, cfg)
		ch <- result{o, err, time.Now()}
	}()
	return ch
}

func TestAcquire(t *testing.T) {
	eps := etcdtest.Start(t)
	c := newClient(t, eps[0])
	a := acquire(t, config(c, "a"))
	if !a.Valid() {
		t.Fatal("new owner is not valid")
	}
	got, err := c.Get(ctx(t), fence.Key("vm1"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Kvs) != 1 || string(got.Kvs[0].Value) != "a" || got.Kvs[0].CreateRevision != a.Revision() {
		t.Fatalf("owner key = %v, want value a at revision %d", got.Kvs, a.Revision())
	}
	// Still valid after several TTLs: the renewals keep it.
	select {
	case <-a.Lost():
		t.Fatalf("lost while renewing: %v", a.Cause())
	case <-time.After(3 * ttl):
	}
	if !a.Valid() {
		t.Fatal("owner not valid after 3 TTLs of renewals")
	}
}

func TestAcquireHeld(t *testing.T) {
	eps := etcdtest.Start(t)
	c := newClient(t, eps[0])
	acquire(t, config(c, "a"))
	_, err := fence.Acquire(ctx(t), config(newClient(t, eps[0]), "b"))
	var held *fence.HeldError
	if !errors.As(err, &held) {
		t.Fatalf("second acquire: err = %v, want *HeldError", err)
	}
	if held.Name != "vm1" || held.Holder != "a" {
		t.Fatalf("HeldError = %+v, want vm1 held by a", held)
	}
	// b's unused lease was revoked: only a's remains.
	leases, err := c.Leases(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(leases.Leases) != 1 {
		t.Fatalf("%d leases after a refused acquire, want 1", len(leases.Leases))
	}
}

func TestReleaseThenTakeOver(t *testing.T) {
	eps := etcdtest.Start(t)
	a := acquire(t, config(newClient(t, eps[0]), "a"))
	if err := a.Release(ctx(t)); err != nil {
		t.Fatalf("release: %v", err)
	}
	select {
	case <-a.Lost():
	default:
		t.Fatal("Lost not closed after Release")
	}
	if a.Valid() || !errors.Is(a.Cause(), fence.ErrReleased) {
		t.Fatalf("after release: valid %v, cause %v", a.Valid(), a.Cause())
	}
	// The key is free at once: TakeOver wins well within one TTL.
	c, cancel := context.WithTimeout(context.Background(), ttl/2)
	defer cancel()
	b, err := fence.TakeOver(c, config(newClient(t, eps[0]), "b"))
	if err != nil {
		t.Fatalf("take over after release: %v", err)
	}
	defer b.Release(context.Background())
	if b.Revision() <= a.Revision() {
		t.Fatalf("new owner's revision %d not above old %d", b.Revision(), a.Revision())
	}
}

// An owner cut off from etcd fences itself before the backup can win, and
// the backup does not win while the owner renews.
func TestTakeOverAfterPartition(t *testing.T) {
	eps := etcdtest.Start(t)
	proxy := etcdtest.NewProxy(t, eps[0])
	a := acquire(t, config(newClient(t, proxy.Endpoint()), "a"))

	lost := make(chan result, 1)
	go func() {
		<-a.Lost()
		lost <- result{at: time.Now(), err: a.Cause()}
	}()
	won := takeOver(ctx(t), config(newClient(t, eps[0]), "b"))

	select {
	case r := <-won:
		t.Fatalf("take over returned while the owner renews: %v", r.err)
	case <-lost:
		t.Fatalf("owner lost while renewing: %v", a.Cause())
	case <-time.After(3 * ttl):
	}

	proxy.Cut()
	cutAt := time.Now()
	var l, w result
	select {
	case l = <-lost:
	case <-time.After(eventually):
		t.Fatal("cut-off owner's Lost did not close")
	}
	if !errors.Is(l.err, fence.ErrLapsed) {
		t.Fatalf("cause = %v, want ErrLapsed", l.err)
	}
	if a.Valid() {
		t.Fatal("cut-off owner still valid after Lost")
	}
	select {
	case w = <-won:
	case <-time.After(eventually):
		t.Fatal("take over did not win after the owner was cut off")
	}
	if w.err != nil {
		t.Fatalf("take over: %v", w.err)
	}
	defer w.o.Release(context.Background())
	if !l.at.Before(w.at) {
		t.Fatalf("old owner lost at %v, new owner won at %v: two owners at once", l.at.Sub(cutAt), w.at.Sub(cutAt))
	}
	if a.Valid() {
		t.Fatal("old owner valid after the take over")
	}
	t.Logf("after the cut: old owner lost at %v, new owner won at %v (gap %v)",
		l.at.Sub(cutAt).Round(time.Millisecond), w.at.Sub(cutAt).Round(time.Millisecond), w.at.Sub(l.at).Round(time.Millisecond))

	// Healed, the old owner stays lost: it cannot come back as a second owner.
	proxy.Restore()
	if a.Valid() {
		t.Fatal("old owner valid again after the partition healed")
	}
}

func TestConcurrentTakeOver(t *testing.T) {
	eps := etcdtest.Start(t)
	a := acquire(t, config(newClient(t, eps[0]), "a"))
	wait, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := takeOver(wait, config(newClient(t, eps[0]), "b"))
	c := takeOver(wait, config(newClient(t, eps[0]), "c"))
	// Let both reach the wait on the held key before it is released: the
	// test does not rely on this, but it is the race worth having.
	time.Sleep(ttl / 2)
	if err := a.Release(ctx(t)); err != nil {
		t.Fatal(err)
	}

	var first result
	var loser <-chan result
	select {
	case first = <-b:
		loser = c
	case first = <-c:
		loser = b
	case <-time.After(eventually):
		t.Fatal("no take over won after release")
	}
	if first.err != nil {
		t.Fatalf("take over: %v", first.err)
	}
	defer first.o.Release(context.Background())
	select {
	case r := <-loser:
		t.Fatalf("second take over returned while the winner holds the key: %+v", r)
	case <-time.After(3 * ttl):
	}
	cancel()
	select {
	case r := <-loser:
		if r.err == nil || !errors.Is(r.err, context.Canceled) {
			t.Fatalf("cancelled take over: %v, want context.Canceled", r.err)
		}
	case <-time.After(eventually):
		t.Fatal("cancelled take over did not return")
	}
}

// Another agent deleting or overwriting the key displaces the owner.
func TestDisplaced(t *testing.T) {
	for _, tt := range []struct {
		name string
		op   clientv3.Op
	}{
		{name: "deleted", op: clientv3.OpDelete(fence.Key("vm1"))},
		{name: "overwritten", op: clientv3.OpPut(fence.Key("vm1"), "intruder")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			eps := etcdtest.Start(t)
			c := newClient(t, eps[0])
			a := acquire(t, config(c, "a"))
			if _, err := c.Do(ctx(t), tt.op); err != nil {
				t.Fatal(err)
			}
			select {
			case <-a.Lost():
			case <-time.After(eventually):
				t.Fatal("Lost did not close")
			}
			if a.Valid() || !errors.Is(a.Cause(), fence.ErrDisplaced) {
				t.Fatalf("valid %v, cause %v, want ErrDisplaced", a.Valid(), a.Cause())
			}
		})
	}
}

func TestConfig(t *testing.T) {
	eps := etcdtest.Start(t)
	c := newClient(t, eps[0])
	for _, tt := range []struct {
		name string
		cfg  fence.Config
	}{
		{name: "no client", cfg: fence.Config{Name: "vm1", ID: "a"}},
		{name: "no name", cfg: fence.Config{Client: c, ID: "a"}},
		{name: "slash in name", cfg: fence.Config{Client: c, Name: "a/b", ID: "a"}},
		{name: "no id", cfg: fence.Config{Client: c, Name: "vm1"}},
		{name: "margin too big", cfg: fence.Config{Client: c, Name: "vm1", ID: "a", TTL: time.Second, Margin: 600 * time.Millisecond}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if o, err := fence.Acquire(ctx(t), tt.cfg); err == nil {
				o.Release(context.Background())
				t.Fatal("acquire accepted a bad config")
			}
		})
	}
}

// The standby record decides which replica a backup may resume: the
// session it names, and only once the backup owns the VM.
func TestClaimChecksStandby(t *testing.T) {
	eps := etcdtest.Start(t)
	c := newClient(t, eps[0])
	standby := func() string {
		t.Helper()
		r, err := c.Get(ctx(t), fence.StandbyKey("vm1"))
		if err != nil || len(r.Kvs) != 1 {
			t.Fatalf("read standby: %v (%d keys)", err, len(r.Kvs))
		}
		return string(r.Kvs[0].Value)
	}

	// A records session s1, then is gone: the backup of s1 claims the VM.
	a := acquire(t, config(c, "a"))
	if err := a.SetStandby(ctx(t), "s1"); err != nil {
		t.Fatal(err)
	}
	if got := standby(); got != "s1" {
		t.Fatalf("standby %q, want s1", got)
	}
	if err := a.Release(ctx(t)); err != nil {
		t.Fatal(err)
	}
	b, err := fence.Claim(ctx(t), config(c, "b"), "s1")
	if err != nil {
		t.Fatalf("claim of the recorded session: %v", err)
	}
	if got := standby(); got != fence.NoStandby {
		t.Fatalf("standby after the claim %q, want %q: the resumed VM has no backup", got, fence.NoStandby)
	}
	if err := b.Release(ctx(t)); err != nil {
		t.Fatal(err)
	}

	// A2 records s2, then runs on unprotected (none): s2's replica is stale.
	a2 := acquire(t, config(c, "a2"))
	if err := a2.SetStandby(ctx(t), "s2"); err != nil {
		t.Fatal(err)
	}
	if err := a2.SetStandby(ctx(t), ""); err != nil {
		t.Fatal(err)
	}
	if err := a2.Release(ctx(t)); err != nil {
		t.Fatal(err)
	}
	_, err = fence.Claim(ctx(t), config(c, "b2"), "s2")
	var stale *fence.StaleError
	if !errors.As(err, &stale) || stale.Standby != fence.NoStandby || stale.Session != "s2" {
		t.Fatalf("claim of a stale session: %v, want a *StaleError naming s2 and %q", err, fence.NoStandby)
	}
	// The refused claimant released the VM.
	acquire(t, config(c, "c"))
}

// An owner whose key was taken from it cannot record a standby, and knows
// it lost the VM.
func TestSetStandbyDisplaced(t *testing.T) {
	eps := etcdtest.Start(t)
	c := newClient(t, eps[0])
	a := acquire(t, config(c, "a"))
	if _, err := c.Delete(ctx(t), fence.Key("vm1")); err != nil {
		t.Fatal(err)
	}
	// The watch may close Lost first; either way the record is refused.
	if err := a.SetStandby(ctx(t), "s1"); !errors.Is(err, fence.ErrDisplaced) {
		t.Fatalf("SetStandby after the key was deleted: %v, want ErrDisplaced", err)
	}
	select {
	case <-a.Lost():
	case <-time.After(eventually):
		t.Fatal("Lost did not close")
	}
	r, err := c.Get(ctx(t), fence.StandbyKey("vm1"))
	if err != nil || len(r.Kvs) != 0 {
		t.Fatalf("a standby was written by a displaced owner: %v %v", r.Kvs, err)
	}
}
