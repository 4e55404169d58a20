package replicate

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Serving: a backup that bad clients cannot stop.
//
// Serve accepts connections on its own goroutine and takes each through its
// handshake (TLS when configured, then the hello) on a goroutine of its own,
// at most MaxHandshakes at a time, each within HandshakeTimeout as a whole:
// a client that sends a byte a second, or nothing, is cut off when that
// time is up, and meanwhile other connections are served. A connection
// beyond MaxHandshakes evicts the oldest in its handshake, counted: a real
// primary completes its handshake in milliseconds, so clients that stall
// cannot keep it out however many they open. A connection through
// its handshake becomes the session, unless one is running: it is then
// refused as busy. A session that ends before its first checkpoint (refused,
// lost, or stopped) frees its replica and Serve waits for the next primary;
// only a session that reached a checkpoint can end Serve, by a failover or
// by its primary's stop.

// Defaults of BackupConfig.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultMaxHandshakes    = 8
)

// ServeStats counts what Serve did with the connections it accepted.
type ServeStats struct {
	Accepted    uint64 // connections accepted
	RefusedFull uint64 // evicted: the oldest of MaxHandshakes in their handshake when another came
	RefusedBusy uint64 // through their handshake while a session ran
	Failed      uint64 // handshakes that failed: TLS, a bad or missing hello, the deadline
	Sessions    uint64 // sessions started
	Early       uint64 // sessions that ended with nothing to fail over (refused, or before their first checkpoint), Serve going on
}

type serveCounters struct {
	accepted, full, busy, failed, sessions, early atomic.Uint64
}

// ServeStats returns the counts so far.
func (b *Backup) ServeStats() ServeStats {
	c := &b.counts
	return ServeStats{Accepted: c.accepted.Load(), RefusedFull: c.full.Load(), RefusedBusy: c.busy.Load(),
		Failed: c.failed.Load(), Sessions: c.sessions.Load(), Early: c.early.Load()}
}

func (b *Backup) handshakeTimeout() time.Duration {
	if b.cfg.HandshakeTimeout > 0 {
		return b.cfg.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

func (b *Backup) maxHandshakes() int {
	if b.cfg.MaxHandshakes > 0 {
		return b.cfg.MaxHandshakes
	}
	return DefaultMaxHandshakes
}

// pending is a connection through its handshake: the session that will
// serve it, its reader (holding what was read past the hello) and the hello.
type pending struct {
	s     *session
	rd    *msgReader
	hello Hello
	peer  string // the primary's certificate names (TLS), else ""
}

// handshake takes conn through TLS (with BackupConfig.TLS) and the hello,
// within the handshake timeout. The error wraps ErrProtocol; conn is left
// open on success only.
func (b *Backup) handshake(ctx context.Context, conn net.Conn) (*pending, error) {
	until := time.Now().Add(b.handshakeTimeout())
	var peer string
	if b.cfg.TLS != nil {
		tc := tls.Server(conn, b.cfg.TLS)
		conn.SetDeadline(until)
		hctx, cancel := context.WithDeadline(ctx, until)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			var rh tls.RecordHeaderError
			if errors.As(err, &rh) && rh.Conn != nil {
				// Not TLS: most likely a primary without TLS, which reads
				// a reject in its own protocol.
				rh.Conn.Write(encodeMsg(nil, MsgReject, 0, appendReject(nil,
					"it speaks TLS only: give the primary the link's TLS certificate, key and CA (--tls-cert, --tls-key, --tls-ca)")))
			}
			return nil, fmt.Errorf("%w: TLS handshake: %w", ErrProtocol, err)
		}
		if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
			peer = certNames(certs[0])
		}
		conn = tc
	}
	ic := &idleConn{Conn: conn, timeout: b.handshakeTimeout(), until: until}
	s := &session{b: b, conn: ic, done: make(chan struct{})}
	s.timeout = ic.timeout
	ic.meter = &s.meter
	rd := newMsgReader(ic)
	hello, err := s.greet(rd)
	if err != nil {
		lingerClose(ic)
		return nil, err
	}
	return &pending{s: s, rd: rd, hello: hello, peer: peer}, nil
}

// certNames lists a certificate's DNS and URI names, for the log.
func certNames(c *x509.Certificate) string {
	names := append([]string(nil), c.DNSNames...)
	for _, u := range c.URIs {
		names = append(names, u.String())
	}
	return strings.Join(names, ",")
}

// Serve accepts primaries on ln and serves one session at a time, as the
// comment at the top of serve.go says. When a primary is lost after its
// first checkpoint, Serve fails over and returns what it did. It returns
// ErrPrimaryStopped when a primary that reached a checkpoint stopped on
// purpose, ctx's error when ctx ends, and an error from accept or the
// backup's own failures (its memory, its sink). With BackupConfig.Once it
// returns after the first session whatever its end, as Handle does (an
// error wrapping ErrNoCheckpoint for a primary lost too early). Serve
// closes ln when it returns.
func (b *Backup) Serve(ctx context.Context, ln net.Listener) (*Failover, error) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait() // last: the accept loop and every handshake end with ctx
	defer cancel()
	context.AfterFunc(ctx, func() { ln.Close() })
	ready := make(chan *pending)
	acceptErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		acceptErr <- b.accept(ctx, ln, b.maxHandshakes(), ready, &wg)
	}()
	type result struct {
		fo  *Failover
		err error
		pc  *pending
	}
	done := make(chan result, 1)
	running := false
	// With a Claim, a session whose primary was lost may wait long to own
	// the VM (its primary alive, cut off from this backup only). A primary
	// that connects meanwhile is the owner protecting its VM again: the
	// wait is cancelled and the new session served (next), whose sync
	// replaces the stale replica.
	var (
		cancelRunning context.CancelFunc
		next          *pending
	)
	start := func(pc *pending) {
		running = true
		b.counts.sessions.Add(1)
		sctx, scancel := context.WithCancel(ctx)
		cancelRunning = scancel
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer scancel()
			fo, err := b.runSession(sctx, pc)
			done <- result{fo, err, pc}
		}()
	}
	refuse := func(pc *pending, why string) {
		b.counts.busy.Add(1)
		b.log.Warn("refused connection: "+why, "from", pc.s.conn.RemoteAddr(), "peer", pc.peer)
		go func() {
			pc.s.reject(protoErr("%s", why))
			lingerClose(pc.s.conn)
			pc.s.conn.Close()
		}()
	}
	for {
		select {
		case err := <-acceptErr:
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("accept primary: %w", err)
		case pc := <-ready:
			switch {
			case !running:
				start(pc)
			case b.claiming.Load() && !b.cfg.Once:
				if next != nil {
					refuse(next, "superseded by a newer connection while this backup waited to own the VM")
				}
				next = pc
				b.log.Warn("a primary connected while this backup waited to own the VM: serving it, dropping the old replica",
					"from", pc.s.conn.RemoteAddr(), "peer", pc.peer)
				cancelRunning()
			default:
				refuse(pc, "this backup is serving another primary")
			}
		case r := <-done:
			running = false
			if next != nil && ctx.Err() == nil {
				pc := next
				next = nil
				if r.fo == nil && errors.Is(r.err, context.Canceled) {
					b.counts.early.Add(1)
					start(pc)
					continue
				}
				refuse(pc, "this backup failed over")
			}
			if b.cfg.Once || ctx.Err() != nil || !b.early(r.err) {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				return r.fo, r.err
			}
			b.counts.early.Add(1)
			epoch, _ := b.LastCheckpoint()
			b.log.Warn("session ended with nothing to fail over; waiting for the next primary",
				"from", r.pc.s.conn.RemoteAddr(), "peer", r.pc.peer, "err", r.err, "replica-epoch", epoch)
		}
	}
}

// early reports whether a session's end (runSession's error) leaves nothing
// to fail over or stop for: refused (a protocol error, whose replica keeps
// its last good checkpoint, as before), or ended before its first
// checkpoint.
func (b *Backup) early(err error) bool {
	if errors.Is(err, ErrProtocol) || errors.Is(err, ErrNoCheckpoint) {
		return true
	}
	if errors.Is(err, ErrPrimaryStopped) {
		epoch, _ := b.LastCheckpoint()
		return epoch == 0
	}
	return false
}

// handshaking is the connections in their handshake, at most max: a new
// one past max evicts the oldest, so that connections that stall cannot
// keep a real primary out (it completes its handshake in milliseconds,
// long before it would be the oldest).
type handshaking struct {
	mu   sync.Mutex
	max  int
	live map[net.Conn]*handshakeSlot
}

type handshakeSlot struct {
	start   time.Time
	evicted bool
}

// admit adds c, and returns the connection it evicted to make room (nil if
// there was room).
func (h *handshaking) admit(c net.Conn) net.Conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	var oldest net.Conn
	if len(h.live) >= h.max {
		for oc, sl := range h.live {
			if oldest == nil || sl.start.Before(h.live[oldest].start) {
				oldest = oc
			}
		}
		h.live[oldest].evicted = true
		delete(h.live, oldest)
	}
	h.live[c] = &handshakeSlot{start: time.Now()}
	return oldest
}

// done removes c once its handshake ended, and reports whether it was
// evicted meanwhile.
func (h *handshaking) done(c net.Conn) (evicted bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.live[c]
	delete(h.live, c)
	return !ok
}

// accept accepts connections until ln fails (or ctx ends and closes it),
// taking each through its handshake, at most max at once (handshaking).
func (b *Backup) accept(ctx context.Context, ln net.Listener, limit int, ready chan<- *pending, wg *sync.WaitGroup) error {
	hs := &handshaking{max: limit, live: make(map[net.Conn]*handshakeSlot)}
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if ctx.Err() == nil && errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				// Out of descriptors, most likely: wait for some to close.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				b.log.Warn("accept", "err", err, "retry-in", backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-ctx.Done():
				}
			}
			return err
		}
		backoff = 0
		b.counts.accepted.Add(1)
		if old := hs.admit(conn); old != nil {
			b.counts.full.Add(1)
			b.log.Warn("refused connection: the oldest of too many in their handshake, to make room", "from", old.RemoteAddr(), "max", limit)
			if b.cfg.TLS == nil {
				// Say why, in the protocol a plaintext primary reads.
				old.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
				old.Write(encodeMsg(nil, MsgReject, 0, appendReject(nil,
					fmt.Sprintf("evicted: the oldest of the %d connections in their handshake at this backup, its limit, when another came", limit))))
			}
			old.Close()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			stop := context.AfterFunc(ctx, func() { conn.Close() })
			pc, err := b.handshake(ctx, conn)
			evicted := hs.done(conn)
			if err != nil || evicted {
				stop()
				conn.Close()
				if ctx.Err() == nil && !evicted {
					b.counts.failed.Add(1)
					b.log.Warn("refused connection", "from", conn.RemoteAddr(), "err", err)
				}
				return
			}
			select {
			case ready <- pc:
				stop()
			case <-ctx.Done():
				conn.Close()
			}
		}()
	}
}

// isTemporary reports whether an accept error is worth retrying: the
// process or the system out of descriptors, or a connection aborted before
// it was accepted.
func isTemporary(err error) bool {
	var errno interface{ Temporary() bool }
	return errors.As(err, &errno) && errno.Temporary()
}

// tlsClient opens a TLS session on conn within timeout.
func tlsClient(ctx context.Context, conn net.Conn, cfg *tls.Config, timeout time.Duration) (*tls.Conn, error) {
	tc := tls.Client(conn, cfg)
	until := time.Now().Add(timeout)
	conn.SetDeadline(until)
	hctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		if alert := tlsAlert(err); alert != "" {
			return nil, &RefusedError{Reason: "TLS: " + alert}
		}
		return nil, fmt.Errorf("TLS handshake with the backup: %w", err)
	}
	conn.SetDeadline(time.Time{})
	return tc, nil
}

// tlsAlert returns the alert of a TLS error the peer sent ("bad
// certificate"), or "" for any other error.
func tlsAlert(err error) string {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" {
		return strings.TrimPrefix(op.Err.Error(), "tls: ")
	}
	return ""
}
