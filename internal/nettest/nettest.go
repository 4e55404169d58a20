// Package nettest makes the real network parts that repagent's tests use:
// network namespaces, taps, veths and bridges, made with iproute2 and removed
// when the test ends. A test that uses it needs root (internal/privileged).
//
// Devices live in namespaces the test made, never in the host's own, so a
// failed or killed test leaves nothing on the host's network; Namespace.Close
// (run by t.Cleanup) deletes the namespace and every device in it.
package nettest

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"

	"github.com/repagent/repagent/internal/netns"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/testvm"
)

// Namespace is a network namespace made for one test.
type Namespace struct {
	Name string
}

var seq atomic.Uint32

// New makes a network namespace with a unique name (prefix "rpa"), its
// loopback up, deleted when the test ends. It needs root and iproute2.
func New(tb testing.TB) *Namespace {
	tb.Helper()
	privileged.Require(tb, privileged.Root, privileged.NetAdmin)
	if _, err := exec.LookPath("ip"); err != nil {
		tb.Fatalf("nettest: iproute2's ip is missing (make deps installs it): %v", err)
	}
	netns.SweepStale(Prefix)
	name := fmt.Sprintf("%s%d-%d", Prefix, os.Getpid(), seq.Add(1))
	ns := &Namespace{Name: name}
	if err := netns.Add(name); err != nil {
		tb.Fatalf("nettest: %v", err)
	}
	tb.Cleanup(func() {
		if err := ns.Close(); err != nil {
			tb.Errorf("nettest: %v", err)
		}
	})
	return ns
}

// Prefix starts the name of every namespace the tests make; a namespace
// left by a killed test run is removed by the next one.
const Prefix = "rpatest-"

// Close deletes the namespace and every device in it.
func (ns *Namespace) Close() error { return netns.Delete(ns.Name) }

// IP runs `ip -n NAME args...` and returns its output.
func (ns *Namespace) IP(args ...string) (string, error) { return netns.IP(ns.Name, args...) }

// MustIP is IP that fails the test on an error.
func (ns *Namespace) MustIP(tb testing.TB, args ...string) string {
	tb.Helper()
	out, err := ns.IP(args...)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// Command returns a command that runs inside the namespace
// (`ip netns exec NAME name args...`).
func (ns *Namespace) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// Do runs f on an OS thread that has entered the namespace, then moves the
// thread back. Sockets and taps made in f belong to the namespace and may be
// used from any goroutine afterwards.
func (ns *Namespace) Do(f func() error) error { return netns.Do(ns.Name, f) }

// AddTap makes a persistent tap device named name in the namespace, up, with
// the given address (CIDR, e.g. "10.0.0.1/24") on it if addr is not empty.
// It lives until the namespace is deleted; a VMM opens it by name from inside
// the namespace (see OpenTap).
func (ns *Namespace) AddTap(tb testing.TB, name, addr string) {
	tb.Helper()
	ns.MustIP(tb, "tuntap", "add", "dev", name, "mode", "tap")
	if addr != "" {
		ns.MustIP(tb, "addr", "add", addr, "dev", name)
	}
	ns.MustIP(tb, "link", "set", name, "up")
}

// OpenTap opens the tap called name in the namespace (creating it if it does
// not exist) as a VMM does (testvm.OpenTap).
func (ns *Namespace) OpenTap(name string) (*os.File, error) {
	var f *os.File
	err := ns.Do(func() error {
		var err error
		f, err = testvm.OpenTap(name)
		return err
	})
	return f, err
}

// AddVeth makes a veth pair: a in ns, b in peer, both up. Addresses (CIDR)
// are set where not empty.
func AddVeth(tb testing.TB, ns *Namespace, a, addrA string, peer *Namespace, b, addrB string) {
	tb.Helper()
	ns.MustIP(tb, "link", "add", a, "type", "veth", "peer", "name", b, "netns", peer.Name)
	for _, l := range []struct {
		ns         *Namespace
		name, addr string
	}{{ns, a, addrA}, {peer, b, addrB}} {
		if l.addr != "" {
			l.ns.MustIP(tb, "addr", "add", l.addr, "dev", l.name)
		}
		l.ns.MustIP(tb, "link", "set", l.name, "up")
	}
}

// AddBridge makes a bridge named name in the namespace, up, with addr (CIDR)
// on it if not empty, and enslaves the given devices of the namespace.
func (ns *Namespace) AddBridge(tb testing.TB, name, addr string, ports ...string) {
	tb.Helper()
	ns.MustIP(tb, "link", "add", name, "type", "bridge")
	// Forward at once: the default 15 s forward delay would swallow the start
	// of every test.
	ns.MustIP(tb, "link", "set", name, "type", "bridge", "forward_delay", "0", "stp_state", "0")
	if addr != "" {
		ns.MustIP(tb, "addr", "add", addr, "dev", name)
	}
	ns.MustIP(tb, "link", "set", name, "up")
	for _, p := range ports {
		ns.MustIP(tb, "link", "set", p, "master", name)
	}
}

// Neigh adds a permanent neighbour entry (ip -> mac) on dev, so a test need
// not depend on ARP.
func (ns *Namespace) Neigh(tb testing.TB, ip netip.Addr, mac, dev string) {
	tb.Helper()
	ns.MustIP(tb, "neigh", "replace", ip.String(), "lladdr", mac, "dev", dev, "nud", "permanent")
}
