package replicate

import (
	"net"
	"time"
)

// idleConn is a connection whose deadlines measure silence, not transfer
// time: every Read, and every 64 KiB of a Write, pushes the deadline out by
// timeout. A slow link that keeps moving bytes is alive; one that moves none
// for timeout is not, whatever the size of the message in flight.
type idleConn struct {
	net.Conn
	timeout time.Duration
}

const idleChunk = 64 << 10

func (c *idleConn) Read(b []byte) (int, error) {
	c.Conn.SetReadDeadline(time.Now().Add(c.timeout))
	return c.Conn.Read(b)
}

func (c *idleConn) Write(b []byte) (int, error) {
	var done int
	for len(b) > 0 {
		n := min(len(b), idleChunk)
		c.Conn.SetWriteDeadline(time.Now().Add(c.timeout))
		w, err := c.Conn.Write(b[:n])
		done += w
		if err != nil {
			return done, err
		}
		b = b[n:]
	}
	return done, nil
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
