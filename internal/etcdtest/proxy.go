package etcdtest

import (
	"net"
	"strings"
	"sync"
	"testing"
)

// Proxy is a TCP proxy between clients and one etcd endpoint. Cut holds
// all traffic through it in both directions, so its clients see a partition
// (or a hung server) while the server and its other clients go on; Restore
// lets the held bytes through. It is closed when the test ends.
type Proxy struct {
	ln   net.Listener
	dial func() (net.Conn, error)

	mu     sync.Mutex
	open   chan struct{} // closed while traffic flows
	closed chan struct{} // closed when the proxy is closed
	conns  map[net.Conn]struct{}
}

// NewProxy listens on a free 127.0.0.1 port and forwards to endpoint
// ("http://host:port" or "host:port"), until t ends.
func NewProxy(t testing.TB, endpoint string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy: listen: %v", err)
	}
	target := strings.TrimPrefix(endpoint, "http://")
	return NewProxyOn(t, ln, func() (net.Conn, error) { return net.Dial("tcp", target) })
}

// NewProxyOn is a proxy of the connections accepted on ln (which it closes
// when t ends) to those dial makes: listener and dial may belong to
// different network namespaces (made in nettest.Namespace.Do), so that it
// can stand for the link between two hosts, or between a host and etcd.
func NewProxyOn(t testing.TB, ln net.Listener, dial func() (net.Conn, error)) *Proxy {
	open := make(chan struct{})
	close(open)
	p := &Proxy{
		ln:     ln,
		dial:   dial,
		open:   open,
		closed: make(chan struct{}),
		conns:  map[net.Conn]struct{}{},
	}
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// Endpoint is the address clients dial instead of the server's.
func (p *Proxy) Endpoint() string { return "http://" + p.Addr() }

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Cut holds every byte through the proxy, both ways, and every new
// connection, until Restore. Connections stay open, as in a partition where
// packets are dropped rather than refused.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
		p.open = make(chan struct{})
	default: // already cut
	}
}

// Restore lets traffic through again.
func (p *Proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
	default:
		close(p.open)
	}
}

// wait blocks while the proxy is cut; it reports false once it is closed.
func (p *Proxy) wait() bool {
	p.mu.Lock()
	open := p.open
	p.mu.Unlock()
	select {
	case <-open:
		return true
	case <-p.closed:
		return false
	}
}

func (p *Proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.serve(c)
	}
}

func (p *Proxy) serve(c net.Conn) {
	if !p.track(c) {
		return
	}
	defer p.untrack(c)
	if !p.wait() {
		return
	}
	s, err := p.dial()
	if err != nil {
		return
	}
	if !p.track(s) {
		return
	}
	defer p.untrack(s)
	done := make(chan struct{}, 2)
	go func() { p.pipe(s, c); done <- struct{}{} }()
	go func() { p.pipe(c, s); done <- struct{}{} }()
	<-done // one side ended: end both
}

// pipe copies src to dst, holding each chunk while the proxy is cut.
func (p *Proxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !p.wait() {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.closed:
		c.Close()
		return false
	default:
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.closed:
		return
	default:
	}
	close(p.closed)
	p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
}
