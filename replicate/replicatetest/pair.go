package replicatetest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
)

// DefaultTimeout is Pair.Timeout when it is 0. It only turns a hang into a
// failure: waits that normally take milliseconds get a minute.
const DefaultTimeout = 60 * time.Second

// Pair is a primary and a backup replicating over loopback TCP. Its methods
// are called from the test's goroutine.
type Pair struct {
	// Primary and Backup are the engines, made by NewPair or
	// NewUnstartedPair from the test's configs.
	Primary *replicate.Primary
	Backup  *replicate.Backup

	// Proxy, when set before Start, relays the link: the primary connects
	// to the pair's relay, and Proxy is called on a goroutine of its own
	// with what the primary sends (from) and the connection to the backup
	// (to). It writes to to what the backup is to receive, and returns when
	// a read or a write fails or it wants the link cut; the pair then
	// closes both connections. What the backup sends is copied back to the
	// primary unchanged.
	Proxy func(from io.Reader, to io.Writer)
	// Link, when set before Start, wraps the primary's end of the
	// connection before Run gets it (a slow link, say). KillPrimary closes
	// what Link returned.
	Link func(net.Conn) net.Conn
	// Timeout bounds each wait of the pair's (PrimaryErr, BackupResult,
	// WaitAcked, Stop, and the cleanup); 0 means DefaultTimeout.
	Timeout time.Duration

	t       testing.TB
	started bool
	conn    net.Conn // the primary's end, as Run has it

	stopRun, stopHandle context.CancelFunc
	runDone, handleDone chan struct{}
	runErr              error // set before runDone closes
	failover            *replicate.Failover
	handleErr           error // with failover, set before handleDone closes

	mu     sync.Mutex
	closer []io.Closer    // listeners and the relay's connections
	relay  sync.WaitGroup // the accept and relay goroutines
}

// NewPair makes a primary from cfg and a backup from bcfg, filling what a
// test leaves unset (see the package documentation), and starts them: the
// backup handles one session on the connection the primary dials. It fails
// the test if either config is refused. The pair is stopped at cleanup.
func NewPair(t testing.TB, cfg replicate.Config, bcfg replicate.BackupConfig) *Pair {
	t.Helper()
	p := NewUnstartedPair(t, cfg, bcfg)
	p.Start()
	return p
}

// NewUnstartedPair is NewPair without Start: set the Pair's fields, or
// attach to the engines, then call Start.
func NewUnstartedPair(t testing.TB, cfg replicate.Config, bcfg replicate.BackupConfig) *Pair {
	t.Helper()
	if cfg.Log == nil || bcfg.Log == nil {
		log := Logger(t)
		if cfg.Log == nil {
			cfg.Log = log
		}
		if bcfg.Log == nil {
			bcfg.Log = log
		}
	}
	if bcfg.NewMemory == nil {
		bcfg.NewMemory = TempMemory(t.TempDir())
	}
	if bcfg.Resume == nil {
		bcfg.Resume = refuseResume
	}
	b, err := replicate.NewBackup(bcfg)
	if err != nil {
		t.Fatalf("replicatetest: %v", err)
	}
	p := &Pair{Backup: b, t: t, runDone: make(chan struct{}), handleDone: make(chan struct{})}
	t.Cleanup(p.cleanup)
	if p.Primary, err = replicate.NewPrimary(cfg); err != nil {
		t.Fatalf("replicatetest: %v", err)
	}
	return p
}

// TempMemory is a BackupConfig.NewMemory that makes replica memory as an
// unlinked file in dir ("" is os.TempDir()).
func TempMemory(dir string) func(size uint64) (*os.File, error) {
	return func(size uint64) (*os.File, error) {
		f, err := os.CreateTemp(dir, "replica-")
		if err != nil {
			return nil, err
		}
		os.Remove(f.Name())
		if err := f.Truncate(int64(size)); err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
}

// ErrNoResume is the error of the Resume a pair's backup gets when the
// test's BackupConfig has none: Handle returns it, wrapped, with the
// Failover it attempted, when a session it did not expect to fail over does.
var ErrNoResume = errors.New("replicatetest: the pair's BackupConfig has no Resume: no failover was expected")

func refuseResume(cp *replicate.Checkpoint) error {
	cp.Memory.Close()
	return ErrNoResume
}

// Start starts the backup's session and the primary's Run.
func (p *Pair) Start() {
	p.t.Helper()
	if p.started {
		p.t.Fatal("replicatetest: Pair.Start called twice")
	}
	bln := p.listen()
	addr := bln.Addr().String()
	var hctx, rctx context.Context
	hctx, p.stopHandle = context.WithCancel(context.Background())
	rctx, p.stopRun = context.WithCancel(context.Background())
	p.started = true
	go func() {
		defer close(p.handleDone)
		conn, err := bln.Accept()
		bln.Close() // one session
		if err != nil {
			p.handleErr = fmt.Errorf("replicatetest: accept the primary: %w", err)
			return
		}
		p.failover, p.handleErr = p.Backup.Handle(hctx, conn)
	}()
	if p.Proxy != nil {
		pln, backup := p.listen(), addr
		p.relay.Go(func() { p.proxy(pln, backup) })
		addr = pln.Addr().String()
	}
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		close(p.runDone)
		p.t.Fatalf("replicatetest: dial the backup: %v", err)
	}
	if p.Link != nil {
		conn = p.Link(conn)
	}
	p.conn = conn
	go func() {
		defer close(p.runDone)
		p.runErr = p.Primary.Run(rctx, conn)
	}()
}

func (p *Pair) listen() net.Listener {
	p.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		p.t.Fatalf("replicatetest: %v", err)
	}
	p.closeLater(ln)
	return ln
}

func (p *Pair) closeLater(c io.Closer) {
	p.mu.Lock()
	p.closer = append(p.closer, c)
	p.mu.Unlock()
}

// proxy relays the one connection accepted on ln to the backup at addr,
// through p.Proxy one way.
func (p *Pair) proxy(ln net.Listener, addr string) {
	in, err := ln.Accept()
	ln.Close()
	if err != nil {
		return
	}
	p.closeLater(in)
	defer in.Close()
	out, err := net.Dial("tcp", addr)
	if err != nil {
		p.t.Errorf("replicatetest: proxy: dial the backup: %v", err)
		return
	}
	p.closeLater(out)
	defer out.Close()
	back := make(chan struct{})
	go func() { defer close(back); io.Copy(in, out) }()
	p.Proxy(in, out)
	in.Close()
	out.Close()
	<-back
}

func (p *Pair) timeout() time.Duration {
	if p.Timeout > 0 {
		return p.Timeout
	}
	return DefaultTimeout
}

// await waits for done, failing the test with what after Timeout.
func (p *Pair) await(done <-chan struct{}, what string) {
	p.t.Helper()
	if !p.started {
		p.t.Fatal("replicatetest: the pair was not started")
	}
	select {
	case <-done:
	case <-time.After(p.timeout()):
		p.t.Fatalf("replicatetest: %s within %v", what, p.timeout())
	}
}

// PrimaryErr waits for the primary's Run to return and returns its error.
func (p *Pair) PrimaryErr() error {
	p.t.Helper()
	p.await(p.runDone, "the primary's Run did not return")
	return p.runErr
}

// BackupResult waits for the backup's session to end and returns what
// Handle returned: the Failover it carried out, or why there was none.
func (p *Pair) BackupResult() (*replicate.Failover, error) {
	p.t.Helper()
	p.await(p.handleDone, "the backup's session did not end")
	return p.failover, p.handleErr
}

// WaitAcked waits until the primary has epoch n acknowledged, failing the
// test if Run returns first or it takes longer than Timeout.
func (p *Pair) WaitAcked(n uint64) {
	p.t.Helper()
	if !p.started {
		p.t.Fatal("replicatetest: the pair was not started")
	}
	for deadline := time.Now().Add(p.timeout()); p.Primary.LastAcked() < n; {
		select {
		case <-p.runDone:
			p.t.Fatalf("replicatetest: replication stopped after epoch %d: %v", p.Primary.LastAcked(), p.runErr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("replicatetest: only %d epochs acknowledged in %v", p.Primary.LastAcked(), p.timeout())
		}
	}
}

// KillPrimary cuts the link as the primary's host dying would: it closes
// the primary's end of the connection. The backup sees the stream end and
// fails over; Run returns an error wrapping replicate.ErrBackupLost.
func (p *Pair) KillPrimary() {
	p.t.Helper()
	if !p.started {
		p.t.Fatal("replicatetest: the pair was not started")
	}
	p.conn.Close()
}

// KillBackup ends the backup's session as its host dying would: Handle's
// context ends, which closes the backup's end of the connection.
func (p *Pair) KillBackup() {
	p.t.Helper()
	if !p.started {
		p.t.Fatal("replicatetest: the pair was not started")
	}
	p.stopHandle()
}

// Stop stops the primary on purpose (Run's context ends: it waits for the
// epochs in flight and tells the backup bye) and returns what Run returned.
// The backup's session then ends with replicate.ErrPrimaryStopped.
func (p *Pair) Stop() error {
	p.t.Helper()
	if !p.started {
		p.t.Fatal("replicatetest: the pair was not started")
	}
	p.stopRun()
	return p.PrimaryErr()
}

// cleanup ends Run before anything else: the test's VM may be closed right
// after, and a KVM VM whose engine still ran beside the next test's made
// that one's first memory slot fail with EINVAL now and then. Then it
// closes the listeners and the relay's connections, ends the backup's
// session, waits for the relay and closes the backup.
func (p *Pair) cleanup() {
	if p.started {
		p.stopRun()
		p.wait(p.runDone, "the primary's Run did not return after its context ended")
	}
	p.mu.Lock()
	for _, c := range p.closer {
		c.Close()
	}
	p.mu.Unlock()
	if p.started {
		p.stopHandle()
		p.wait(p.handleDone, "the backup's session did not end after its context ended")
	}
	relayed := make(chan struct{})
	go func() { p.relay.Wait(); close(relayed) }()
	p.wait(relayed, "the proxy did not return after its connections closed")
	p.Backup.Close()
}

// wait is await for the cleanup: it reports a hang but goes on.
func (p *Pair) wait(done <-chan struct{}, what string) {
	select {
	case <-done:
	case <-time.After(p.timeout()):
		p.t.Errorf("replicatetest: %s within %v", what, p.timeout())
	}
}
