// Package privileged gates tests that need /dev/kvm, root, CAP_NET_ADMIN or
// an etcd server binary.
//
// A test calls Require with what it needs. When a need is not met the test is
// skipped with the reason, unless REPAGENT_REQUIRE_PRIVILEGED=1 is set (CI sets
// it), in which case the test fails: a run cannot go green by skipping.
package privileged

import (
	"fmt"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// EnvRequire is the environment variable that turns skips into failures.
const EnvRequire = "REPAGENT_REQUIRE_PRIVILEGED"

// Need is something a privileged test needs.
type Need int

const (
	// KVM: /dev/kvm opens read-write.
	KVM Need = iota + 1
	// Root: the effective user is root.
	Root
	// NetAdmin: the process has CAP_NET_ADMIN (to make namespaces, taps, BPF links).
	NetAdmin
	// Etcd: an etcd server binary (EtcdBinary, from Debian's etcd-server,
	// which `make deps` installs) exists and is executable.
	Etcd
)

// EtcdBinary is the etcd server that internal/etcdtest starts.
const EtcdBinary = "/usr/bin/etcd"

// Require skips (or, with REPAGENT_REQUIRE_PRIVILEGED=1, fails) t unless
// every need is met.
func Require(t testing.TB, needs ...Need) {
	t.Helper()
	for _, n := range needs {
		if err := check(n); err != nil {
			Lacks(t, err)
		}
	}
}

// Lacks skips (or, with REPAGENT_REQUIRE_PRIVILEGED=1, fails) t because
// the host lacks what err says: a kernel feature a test needs beyond the
// Needs above. CI's host has everything the suite needs, so a test cannot
// go green there by skipping.
func Lacks(t testing.TB, err error) {
	t.Helper()
	if os.Getenv(EnvRequire) == "1" {
		t.Fatalf("%s is set, but this test cannot run: %v", EnvRequire, err)
	}
	t.Skipf("skipped: %v (set %s=1 to make this a failure)", err, EnvRequire)
}

func check(n Need) error {
	switch n {
	case KVM:
		fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("needs /dev/kvm: %w", err)
		}
		unix.Close(fd)
		return nil
	case Root:
		if os.Geteuid() != 0 {
			return fmt.Errorf("needs root (euid is %d)", os.Geteuid())
		}
		return nil
	case NetAdmin:
		var hdr unix.CapUserHeader
		var data [2]unix.CapUserData
		hdr.Version = unix.LINUX_CAPABILITY_VERSION_3
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			return fmt.Errorf("needs CAP_NET_ADMIN: capget: %w", err)
		}
		if data[0].Effective&(1<<unix.CAP_NET_ADMIN) == 0 {
			return fmt.Errorf("needs CAP_NET_ADMIN")
		}
		return nil
	case Etcd:
		if err := unix.Access(EtcdBinary, unix.X_OK); err != nil {
			return fmt.Errorf("needs an etcd server at %s (apt-get install etcd-server, or make deps): %w", EtcdBinary, err)
		}
		return nil
	}
	return fmt.Errorf("unknown need %d", n)
}
