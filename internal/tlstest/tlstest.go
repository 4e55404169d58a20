// Package tlstest makes a TLS link between two configurations over
// loopback TCP, for the tests of the replication link's TLS (replicate/
// protect) and of the certificates `repagent certs` writes.
package tlstest

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// Side is what one end of a link saw.
type Side struct {
	Err   error // the first error the end met, nil if it exchanged its messages
	State tls.ConnectionState
}

// Link connects a client with config cli to a server with config srv over
// loopback TCP. Each end makes the handshake, sends a message and reads the
// other's, and stops at the first error; both connections stay open until
// both ends are done, so that a refused end reads the alert it was sent
// rather than a reset. Deadlines bound every step: an end that would hang
// gets a timeout error instead.
func Link(t *testing.T, srv, cli *tls.Config) (server, client Side) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	deadline := time.Now().Add(10 * time.Second)
	done := make(chan Side, 1)
	conns := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- Side{Err: err}
			return
		}
		conns <- c
		c.SetDeadline(deadline)
		done <- exchange(tls.Server(c, srv), "from the backup", "from the primary")
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(deadline)
	client = exchange(tls.Client(c, cli), "from the primary", "from the backup")
	server = <-done
	select {
	case sc := <-conns:
		sc.Close()
	default:
	}
	return server, client
}

// exchange makes conn's handshake, writes send and reads want.
func exchange(conn *tls.Conn, send, want string) Side {
	if err := conn.Handshake(); err != nil {
		return Side{Err: err}
	}
	s := Side{State: conn.ConnectionState()}
	if _, err := conn.Write([]byte(send)); err != nil {
		s.Err = err
		return s
	}
	got := make([]byte, len(want))
	if _, err := io.ReadFull(conn, got); err != nil {
		s.Err = err
	} else if string(got) != want {
		s.Err = fmt.Errorf("read %q, want %q", got, want)
	}
	return s
}
