package ebpf

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// packetSndbuf is the send buffer of the gate's packet sockets. A released
// frame keeps its socket's send buffer charged until the host's datapath is
// done with it (a bridge can hold it in another port's queue); the default
// (net.core.wmem_default, about 200 KiB) would stall releases behind a
// hundred such frames.
const packetSndbuf = 4 << 20

// packetSocket returns an AF_PACKET SOCK_RAW socket bound to ifindex with
// protocol 0, so it only sends: the kernel gives it no frame to read. What
// it sends goes through dev_queue_xmit, so the tap's tc egress sees it.
// PACKET_QDISC_BYPASS must stay off: it would skip tc egress and send the
// frame to the VM.
func packetSocket(ifindex int) (fd int, cookie uint64, err error) {
	fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, 0, fmt.Errorf("open packet socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, packetSndbuf); err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("set packet socket send buffer (needs CAP_NET_ADMIN): %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("bind packet socket to ifindex %d: %w", ifindex, err)
	}
	cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("get packet socket cookie (SO_COOKIE, Linux 4.12+): %w", err)
	}
	return fd, cookie, nil
}

// checkTap returns an error wrapping ErrNotTap unless ifname is a tap
// device (tun driver in tap mode), using ethtool's driver info on any
// socket of the namespace.
func checkTap(fd int, ifname string) error {
	info, err := unix.IoctlGetEthtoolDrvinfo(fd, ifname)
	if err != nil {
		return fmt.Errorf("%w: %s: cannot read its driver (ethtool: %v): the gate attaches to the VM's tap", ErrNotTap, ifname, err)
	}
	driver, bus := unix.ByteSliceToString(info.Driver[:]), unix.ByteSliceToString(info.Bus_info[:])
	switch {
	case driver == "tun" && bus == "tap":
		return nil
	case driver == "tun":
		return fmt.Errorf("%w: %s is a tun device (layer 3, no Ethernet frames): give the VM a tap", ErrNotTap, ifname)
	}
	return fmt.Errorf("%w: %s has driver %q: the gate attaches to the VM's tap", ErrNotTap, ifname, driver)
}

// sendFrame writes one frame on a bound packet socket, retrying the
// transient errors (a signal, a momentary lack of buffers) for up to a
// second.
func sendFrame(fd int, frame []byte) error {
	deadline := time.Time{}
	for {
		_, err := unix.Write(fd, frame)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.ENOBUFS), errors.Is(err, unix.EAGAIN):
			if deadline.IsZero() {
				deadline = time.Now().Add(time.Second)
			} else if time.Now().After(deadline) {
				return err
			}
			time.Sleep(50 * time.Microsecond)
		default:
			return err
		}
	}
}

// allowedCPUs lists the CPUs the calling thread may run on.
func allowedCPUs() ([]int, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return nil, fmt.Errorf("get CPU affinity: %w", err)
	}
	var cpus []int
	for i := 0; i < len(set)*64; i++ {
		if set.IsSet(i) {
			cpus = append(cpus, i)
		}
	}
	if len(cpus) == 0 {
		return nil, errors.New("get CPU affinity: empty CPU set")
	}
	return cpus, nil
}

// releaseCPU resolves Config.ReleaseCPU against the CPUs allowed now.
func releaseCPU(want int) (int, error) {
	cpus, err := allowedCPUs()
	if err != nil {
		return 0, err
	}
	if want == AutoCPU {
		return cpus[len(cpus)-1], nil
	}
	if !slices.Contains(cpus, want) {
		return 0, fmt.Errorf("release CPU %d is not in this process's CPU set %v (set Config.ReleaseCPU, or AutoCPU)", want, cpus)
	}
	return want, nil
}

// pinThread locks the calling goroutine to its OS thread and pins the
// thread to cpu. The goroutine must never unlock: when it returns, the
// runtime ends the thread rather than hand its affinity to other
// goroutines.
func pinThread(cpu int) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin release thread to CPU %d: %w", cpu, err)
	}
	return nil
}
