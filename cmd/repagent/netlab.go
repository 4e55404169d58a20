package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/repagent/repagent/internal/netns"
	"github.com/repagent/repagent/testvm"
)

// labPrefix starts the names of the main job's namespaces; a run that was
// killed leaves them behind, and the next run removes them.
const labPrefix = "repagent-"

// lab is the main job's own network, made for one run and removed after it:
//
//	namespace <prefix><pid>-lan: bridge rpa-br0 with the guest's tap rpa-tap0
//	                             and the veth end rpa-lan0
//	namespace <prefix><pid>-cli: the veth end rpa-cli0, 10.77.0.1/24, and the
//	                             client's UDP socket
//
// The guest (10.77.0.2) reaches the client through its tap and the bridge,
// so its output crosses the same datapath a real VM's would.
type lab struct {
	lan, cli string
	tap      string
	clientIP netip.Addr
}

// newLab builds the namespaces and devices. It needs root (CAP_NET_ADMIN)
// and iproute2.
func newLab() (_ *lab, err error) {
	netns.SweepStale(labPrefix)
	l := &lab{lan: fmt.Sprintf("%s%d-lan", labPrefix, os.Getpid()), cli: fmt.Sprintf("%s%d-cli", labPrefix, os.Getpid()),
		tap: "rpa-tap0", clientIP: netip.MustParseAddr("10.77.0.1")}
	if err := netns.Add(l.lan); err != nil {
		return nil, fmt.Errorf("build a network of namespaces, a bridge and a tap (run as root, or pass --no-net): %w", err)
	}
	defer func() {
		if err != nil {
			l.close()
		}
	}()
	if err := netns.Add(l.cli); err != nil {
		return nil, err
	}
	steps := [][]string{
		{l.lan, "link", "add", "rpa-br0", "type", "bridge", "forward_delay", "0", "stp_state", "0"},
		{l.lan, "tuntap", "add", "dev", l.tap, "mode", "tap"},
		{l.lan, "link", "add", "rpa-lan0", "type", "veth", "peer", "name", "rpa-cli0", "netns", l.cli},
		{l.lan, "link", "set", l.tap, "master", "rpa-br0"},
		{l.lan, "link", "set", "rpa-lan0", "master", "rpa-br0"},
		{l.lan, "link", "set", "rpa-br0", "up"},
		{l.lan, "link", "set", l.tap, "up"},
		{l.lan, "link", "set", "rpa-lan0", "up"},
		{l.cli, "addr", "add", l.clientIP.String() + "/24", "dev", "rpa-cli0"},
		{l.cli, "link", "set", "rpa-cli0", "up"},
	}
	for _, s := range steps {
		if _, err := netns.IP(s[0], s[1:]...); err != nil {
			return nil, fmt.Errorf("build the job's network: %w", err)
		}
	}
	return l, nil
}

// close removes the namespaces and everything in them.
func (l *lab) close() error {
	return errors.Join(netns.Delete(l.cli), netns.Delete(l.lan))
}

// openTap opens the guest's tap from inside the lan namespace.
func (l *lab) openTap() (*os.File, error) {
	var f *os.File
	err := netns.Do(l.lan, func() error {
		var err error
		f, err = testvm.OpenTap(l.tap)
		return err
	})
	return f, err
}

// echoClient sends numbered datagrams to the guest's udp-echo at a steady
// rate and times the answers. A datagram carries its number and send time;
// the guest answers with its own sequence number before them.
type echoClient struct {
	conn   *net.UDPConn
	to     netip.AddrPort
	period time.Duration
	out    [16]byte // the request being sent (ping, then run: never at once)

	mu       sync.Mutex
	window   hist // round trips answered this second
	total    hist
	sent     uint64
	answered uint64
	lastSeq  uint64        // the guest's sequence number in the last answer
	bad      uint64        // answers that were malformed, duplicated or out of order
	baseline time.Duration // median round trip before replication
}

// newEchoClient opens the client's socket in the lab's client namespace.
func (l *lab) newEchoClient(guest netip.AddrPort, rate int) (*echoClient, error) {
	conn, err := l.listenUDP()
	if err != nil {
		return nil, fmt.Errorf("open the job's client socket: %w", err)
	}
	return &echoClient{conn: conn, to: guest, period: time.Second / time.Duration(rate)}, nil
}

// listenUDP opens a UDP socket on the client's address, in the lab's client
// namespace.
func (l *lab) listenUDP() (conn *net.UDPConn, err error) {
	err = netns.Do(l.cli, func() error {
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: l.clientIP.AsSlice()})
		return err
	})
	return conn, err
}

// run sends until ctx ends; the reader runs until the socket closes.
func (c *echoClient) run(ctx context.Context) {
	go c.read()
	t := time.NewTicker(c.period)
	defer t.Stop()
	for n := uint64(1); ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := c.send(n, time.Now()); err == nil {
			c.mu.Lock()
			c.sent++
			c.mu.Unlock()
		}
	}
}

// send sends request n stamped t: its number and send time.
func (c *echoClient) send(n uint64, t time.Time) error {
	binary.BigEndian.PutUint64(c.out[:], n)
	binary.BigEndian.PutUint64(c.out[8:], uint64(t.UnixNano()))
	_, err := c.conn.WriteToUDPAddrPort(c.out[:], c.to)
	return err
}

func (c *echoClient) read() {
	buf := make([]byte, 2048)
	for {
		n, err := c.conn.Read(buf)
		if err != nil {
			return // closed
		}
		now := time.Now()
		c.mu.Lock()
		if n != 24 {
			c.bad++
		} else if seq := binary.BigEndian.Uint64(buf); seq <= c.lastSeq {
			c.bad++ // the guest's numbers only go up: a repeat is a leak
		} else {
			c.lastSeq = seq
			rtt := now.Sub(time.Unix(0, int64(binary.BigEndian.Uint64(buf[16:]))))
			c.window.add(rtt)
			c.total.add(rtt)
			c.answered++
		}
		c.mu.Unlock()
	}
}

// ping measures n round trips one at a time, for a baseline: the median.
func (c *echoClient) ping(n int) (time.Duration, error) {
	var h hist
	in := make([]byte, 2048)
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if err := c.send(0, t0); err != nil {
			return 0, err
		}
		c.conn.SetReadDeadline(t0.Add(2 * time.Second))
		k, err := c.conn.Read(in)
		if err != nil {
			return 0, fmt.Errorf("the guest did not answer the client: %w", err)
		}
		if k == 24 {
			c.lastSeq = max(c.lastSeq, binary.BigEndian.Uint64(in))
		}
		h.add(time.Since(t0))
	}
	c.conn.SetReadDeadline(time.Time{})
	c.baseline = h.quantile(0.5)
	return c.baseline, nil
}

// second returns the round trips of the second that ends, and starts the next.
func (c *echoClient) second() (n uint64, p50, p99 time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.window.reset()
	return c.window.n, c.window.quantile(0.5), c.window.quantile(0.99)
}

func (c *echoClient) close() { c.conn.Close() }
