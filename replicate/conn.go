package replicate

import (
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/repagent/repagent/internal/cpuclock"
	"github.com/repagent/repagent/internal/hostsys"
)

// idleConn is a connection whose deadlines measure silence, not transfer
// time. Every Read pushes the read deadline out by timeout, so a slow link
// that keeps moving bytes is alive. A write that moves no byte for timeout
// fails only if the peer, too, showed no sign of work in that time (alive):
// when the link is full because the peer is busy (applying a large epoch,
// or starved of CPU), the writer waits for it instead of declaring it lost.
// A peer that neither reads nor works for timeout is lost.
type idleConn struct {
	net.Conn
	timeout time.Duration
	// until, when set, is a whole deadline for every read and write instead
	// (a handshake's: bytes trickling in do not extend it).
	until time.Time
	// alive, when set, reports whether the peer showed progress within the
	// timeout; nil means a blocked write fails at its deadline.
	alive func() bool
	// lastRead is when a Read last returned data (UnixNano); read counts
	// the bytes read, for heartbeats' progress.
	lastRead atomic.Int64
	read     atomic.Uint64
	// written counts the bytes written, for heartbeats' progress.
	written atomic.Uint64
	// meter, when set, is charged with the CPU time of the reads' system
	// calls (not of their waits), where the connection is a socket. Only one
	// goroutine may read then.
	meter *cpuclock.Meter
	raw   syscall.RawConn
	// The metered read's callback and its arguments and results, kept here
	// so that a read allocates no closure.
	rawRead func(fd uintptr) bool
	rbuf    []byte
	rn      int
	rerr    error
}

// deadline is the deadline of an I/O starting now.
func (c *idleConn) deadline() time.Time {
	if !c.until.IsZero() {
		return c.until
	}
	return time.Now().Add(c.timeout)
}

func (c *idleConn) Read(b []byte) (int, error) {
	c.Conn.SetReadDeadline(c.deadline())
	var n int
	var err error
	switch {
	case c.meter != nil && c.rawConn() != nil:
		n, err = c.meteredRead(b)
	case c.meter != nil:
		// Not a socket (TLS): the meter covers the whole read, whose wait
		// costs the locked thread no CPU, so the decryption is counted.
		c.meter.Start()
		n, err = c.Conn.Read(b)
		c.meter.Stop()
	default:
		n, err = c.Conn.Read(b)
	}
	if n > 0 {
		c.lastRead.Store(time.Now().UnixNano())
		c.read.Add(uint64(n))
	}
	return n, err
}

func (c *idleConn) rawConn() syscall.RawConn {
	if c.raw == nil {
		if sc, ok := c.Conn.(syscall.Conn); ok {
			c.raw, _ = sc.SyscallConn()
		}
	}
	return c.raw
}

// meteredRead reads from the socket with read(2) itself, so that the meter
// covers the system call alone: the wait for data happens outside the
// callback, in the runtime's poller, with the deadline Read set.
func (c *idleConn) meteredRead(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if c.rawRead == nil {
		c.rawRead = c.readFD
	}
	c.rbuf = b
	err := c.raw.Read(c.rawRead)
	n, rerr := c.rn, c.rerr
	c.rbuf, c.rerr = nil, nil
	switch {
	case err != nil:
		return 0, err
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// readFD is meteredRead's callback: one read(2), metered; false when there
// is no data yet (the poller waits, and calls again).
func (c *idleConn) readFD(fd uintptr) bool {
	c.meter.Start()
	n, again, err := hostsys.Read(fd, c.rbuf)
	c.meter.Stop()
	c.rn, c.rerr = n, err
	return !again
}

// heardWithin reports whether a Read returned data within d.
func (c *idleConn) heardWithin(d time.Duration) bool {
	return time.Since(time.Unix(0, c.lastRead.Load())) < d
}

// Write writes all of b, waiting while the peer is alive (see idleConn).
func (c *idleConn) Write(b []byte) (int, error) {
	done := 0
	for {
		c.Conn.SetWriteDeadline(c.deadline())
		n, err := c.Conn.Write(b[done:])
		done += n
		c.written.Add(uint64(n))
		if err == nil || !c.retry(err, n) {
			return done, err
		}
	}
}

// writeBuffers writes every buffer of bufs, in one vectored write where the
// connection allows it (a TCP connection: writev), so that page data goes
// from staging to the socket without being copied into a message first. It
// consumes bufs.
func (c *idleConn) writeBuffers(bufs *net.Buffers) error {
	for len(*bufs) > 0 {
		c.Conn.SetWriteDeadline(c.deadline())
		n, err := bufs.WriteTo(c.Conn)
		c.written.Add(uint64(n))
		if err == nil {
			return nil
		}
		if !c.retry(err, int(n)) {
			return err
		}
	}
	return nil
}

// retry reports whether a write that failed with err after n bytes should
// go on: its deadline passed, and it either moved bytes meanwhile or the peer
// is alive.
func (c *idleConn) retry(err error, n int) bool {
	if !errors.Is(err, os.ErrDeadlineExceeded) || !c.until.IsZero() {
		return false
	}
	return n > 0 || (c.alive != nil && c.alive())
}

// closeWrite half-closes the connection where it can, so what was written
// still arrives: closing a socket with unread data in it sends a reset, which
// can overtake the last messages.
func (c *idleConn) closeWrite() {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// isTimeout reports whether err is a deadline passing.
func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
