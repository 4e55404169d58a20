// Package netns runs code inside Linux network namespaces and makes and
// removes named namespaces with iproute2, for the main job's own network and
// for tests (internal/nettest).
package netns

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Dir is where iproute2 keeps named namespaces.
const Dir = "/run/netns"

// Path is the file of the namespace called name.
func Path(name string) string { return filepath.Join(Dir, name) }

// Add makes a named network namespace (`ip netns add`) with its loopback up.
func Add(name string) error {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	if _, err := IP(name, "link", "set", "lo", "up"); err != nil {
		Delete(name)
		return err
	}
	return nil
}

// Delete removes a named namespace and every virtual device in it. A
// namespace that does not exist is not an error.
func Delete(name string) error {
	out, err := exec.Command("ip", "netns", "del", name).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("ip netns del %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// IP runs `ip -n name args...` and returns its output; an error carries it.
func IP(name string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip -n %s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Do runs f on an OS thread that has entered the namespace called name, then
// moves the thread back. Sockets, taps and BPF links made in f belong to the
// namespace and may be used from any goroutine afterwards.
func Do(name string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// A thread whose namespace could not be restored stays locked, so the
		// runtime retires it with the goroutine instead of reusing it.
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own network namespace: %w", err)
			return
		}
		defer self.Close()
		target, err := os.Open(Path(name))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("network namespace %s: %w", name, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace %s: %w", name, err)
			return
		}
		ferr := f()
		if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leave network namespace %s: %w", name, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// SweepStale deletes namespaces named prefix + PID + "-" + anything whose
// process no longer exists: what a killed run left behind.
func SweepStale(prefix string) {
	ents, err := os.ReadDir(Dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok {
			continue
		}
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
			Delete(e.Name())
		}
	}
}
