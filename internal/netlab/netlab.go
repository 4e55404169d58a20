package netlab

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

	"github.com/repagent/repagent/internal/epochstat"
	"github.com/repagent/repagent/internal/netns"
	"github.com/repagent/repagent/testvm"
)

// Prefix starts the names of the main job's namespaces; a run that was
// killed leaves them behind, and the next run removes them.
const Prefix = "repagent-"

// Lab is the main job's own network, made for one run and removed after it:
//
//	namespace <prefix><pid>-lan: bridge rpa-br0 with the guest's tap rpa-tap0
//	                             and the veth end rpa-lan0
//	namespace <prefix><pid>-cli: the veth end rpa-cli0, 10.77.0.1/24, and the
//	                             client's UDP socket
//
// The guest (10.77.0.2) reaches the client through its tap and the bridge,
// so its output crosses the same datapath a real VM's would.
type Lab struct {
	Lan, Cli string     // the namespaces
	Tap      string     // the guest's tap, in Lan
	ClientIP netip.Addr // the client's address, in Cli
}

// New builds the namespaces and devices. It needs root (CAP_NET_ADMIN)
// and iproute2.
func New() (_ *Lab, err error) {
	netns.SweepStale(Prefix)
	l := &Lab{Lan: fmt.Sprintf("%s%d-lan", Prefix, os.Getpid()), Cli: fmt.Sprintf("%s%d-cli", Prefix, os.Getpid()),
		Tap: "rpa-tap0", ClientIP: netip.MustParseAddr("10.77.0.1")}
	if err := netns.Add(l.Lan); err != nil {
		return nil, fmt.Errorf("build a network of namespaces, a bridge and a tap (run as root, or pass --no-net): %w", err)
	}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	if err := netns.Add(l.Cli); err != nil {
		return nil, err
	}
	steps := [][]string{
		{l.Lan, "link", "add", "rpa-br0", "type", "bridge", "forward_delay", "0", "stp_state", "0"},
		{l.Lan, "tuntap", "add", "dev", l.Tap, "mode", "tap"},
		{l.Lan, "link", "add", "rpa-lan0", "type", "veth", "peer", "name", "rpa-cli0", "netns", l.Cli},
		{l.Lan, "link", "set", l.Tap, "master", "rpa-br0"},
		{l.Lan, "link", "set", "rpa-lan0", "master", "rpa-br0"},
		{l.Lan, "link", "set", "rpa-br0", "up"},
		{l.Lan, "link", "set", l.Tap, "up"},
		{l.Lan, "link", "set", "rpa-lan0", "up"},
		{l.Cli, "addr", "add", l.ClientIP.String() + "/24", "dev", "rpa-cli0"},
		{l.Cli, "link", "set", "rpa-cli0", "up"},
	}
	for _, s := range steps {
		if _, err := netns.IP(s[0], s[1:]...); err != nil {
			return nil, fmt.Errorf("build the job's network: %w", err)
		}
	}
	return l, nil
}

// Close removes the namespaces and everything in them.
func (l *Lab) Close() error {
	return errors.Join(netns.Delete(l.Cli), netns.Delete(l.Lan))
}

// OpenTap opens the guest's tap from inside the lan namespace.
func (l *Lab) OpenTap() (*os.File, error) {
	var f *os.File
	err := netns.Do(l.Lan, func() error {
		var err error
		f, err = testvm.OpenTap(l.Tap)
		return err
	})
	return f, err
}

// EchoClient sends numbered datagrams to the guest's udp-echo at a steady
// rate and times the answers. A datagram carries its number and send time;
// the guest answers with its own sequence number before them.
type EchoClient struct {
	conn   *net.UDPConn
	to     netip.AddrPort
	period time.Duration
	out    [16]byte // the request being sent (ping, then run: never at once)

	mu       sync.Mutex
	window   epochstat.Hist // round trips answered this second
	total    epochstat.Hist
	sent     uint64
	answered uint64
	lastSeq  uint64        // the guest's sequence number in the last answer
	bad      uint64        // answers that were malformed, duplicated or out of order
	baseline time.Duration // median round trip before replication
}

// NewEchoClient opens the client's socket in the lab's client namespace.
func (l *Lab) NewEchoClient(guest netip.AddrPort, rate int) (*EchoClient, error) {
	conn, err := l.ListenUDP()
	if err != nil {
		return nil, fmt.Errorf("open the job's client socket: %w", err)
	}
	return &EchoClient{conn: conn, to: guest, period: time.Second / time.Duration(rate)}, nil
}

// ListenUDP opens a UDP socket on the client's address, in the lab's client
// namespace.
func (l *Lab) ListenUDP() (conn *net.UDPConn, err error) {
	err = netns.Do(l.Cli, func() error {
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: l.ClientIP.AsSlice()})
		return err
	})
	return conn, err
}

// Run sends until ctx ends; the reader runs until the socket closes.
func (c *EchoClient) Run(ctx context.Context) {
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
func (c *EchoClient) send(n uint64, t time.Time) error {
	binary.BigEndian.PutUint64(c.out[:], n)
	binary.BigEndian.PutUint64(c.out[8:], uint64(t.UnixNano()))
	_, err := c.conn.WriteToUDPAddrPort(c.out[:], c.to)
	return err
}

func (c *EchoClient) read() {
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
			c.window.Add(rtt)
			c.total.Add(rtt)
			c.answered++
		}
		c.mu.Unlock()
	}
}

// Ping measures n round trips one at a time, for a baseline: the median.
func (c *EchoClient) Ping(n int) (time.Duration, error) {
	var h epochstat.Hist
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
		h.Add(time.Since(t0))
	}
	c.conn.SetReadDeadline(time.Time{})
	c.baseline = h.Quantile(0.5)
	return c.baseline, nil
}

// Second returns the round trips of the second that ends, and starts the next.
func (c *EchoClient) Second() (n uint64, p50, p99 time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.window.Reset()
	return c.window.Count(), c.window.Quantile(0.5), c.window.Quantile(0.99)
}

// Close closes the socket, which ends the reader.
func (c *EchoClient) Close() { c.conn.Close() }

// EchoTotals is what an EchoClient saw over its whole run.
type EchoTotals struct {
	Sent, Answered uint64
	Bad            uint64        // answers malformed, duplicated or out of order
	P50, P99       time.Duration // the round trips answered
	Baseline       time.Duration // Ping's median, before replication
}

// Totals returns the client's figures so far; it is safe while the client
// runs.
func (c *EchoClient) Totals() EchoTotals {
	c.mu.Lock()
	defer c.mu.Unlock()
	return EchoTotals{Sent: c.sent, Answered: c.answered, Bad: c.bad, P50: c.total.Quantile(0.5), P99: c.total.Quantile(0.99), Baseline: c.baseline}
}
