package testvm

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/repagent/repagent/kvm"
	"golang.org/x/sys/unix"
)

// request is what the VMM asks of a vCPU thread.
type request int

const (
	reqRun request = iota
	reqPause
	reqStop
)

// vcpu is one vCPU and the goroutine, locked to an OS thread, that runs it.
// The thread is the only one that calls KVM_RUN; other goroutines talk to it
// through req (under mu) and kick it out of the guest with immediate_exit and
// a signal.
type vcpu struct {
	m   *Machine
	id  int
	cpu *kvm.VCPU
	tid int

	mu     sync.Mutex
	cond   *sync.Cond
	req    request
	parked bool // out of KVM_RUN and waiting in cond.Wait
	exited bool // the goroutine returned
	// settled mirrors parked || exited for waitParked's spin: set under mu
	// with them, read without it.
	settled atomic.Bool
}

func (v *vcpu) loop(started chan<- struct{}) {
	// The thread stays locked until the goroutine ends, and so dies with it:
	// a thread that ran a vCPU is never handed back to the scheduler.
	runtime.LockOSThread()
	v.mu.Lock()
	v.tid = unix.Gettid()
	v.mu.Unlock()
	started <- struct{}{}
	err := v.run()
	if err != nil {
		// Record the error before anyone can see this vCPU exited, so a Pause
		// that finds it gone reports why.
		v.m.fail(err)
	}
	v.mu.Lock()
	v.exited = true
	v.parked = false
	v.settled.Store(true)
	v.cond.Broadcast()
	v.mu.Unlock()
	v.m.wg.Done()
}

// run is the vCPU loop. It returns nil when asked to stop, or the error that
// ends the machine.
func (v *vcpu) run() error {
	for {
		v.mu.Lock()
		for v.req == reqPause {
			v.parked = true
			v.settled.Store(true)
			v.cond.Broadcast()
			v.cond.Wait()
		}
		v.parked = false
		v.settled.Store(false)
		if v.req == reqStop {
			v.mu.Unlock()
			return nil
		}
		// Running: a kick from now on sets immediate_exit first, so clearing it
		// here, under mu, cannot lose a pause request.
		v.cpu.SetImmediateExit(false)
		v.mu.Unlock()

		err := v.cpu.Run()
		if err == unix.EINTR || err == unix.EAGAIN {
			continue // kicked, or a stray signal: re-check the request
		}
		if err != nil {
			return fmt.Errorf("vCPU %d: KVM_RUN: %w", v.id, err)
		}
		if err := v.handleExit(); err != nil {
			return err
		}
	}
}

// requestPause asks the vCPU to leave KVM_RUN and park.
func (v *vcpu) requestPause() {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.exited || v.req == reqStop {
		return
	}
	v.req = reqPause
	v.kickLocked()
}

// requestStop asks the vCPU goroutine to end.
func (v *vcpu) requestStop() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.req = reqStop
	v.cond.Broadcast()
	if !v.exited {
		v.kickLocked()
	}
}

// requestRun lets a paused vCPU go on.
func (v *vcpu) requestRun() {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.req == reqPause {
		v.req = reqRun
	}
	v.cond.Broadcast()
}

// kickLocked forces the vCPU out of KVM_RUN: immediate_exit makes a KVM_RUN
// that has not entered the guest yet return at once, and the signal interrupts
// one that has.
func (v *vcpu) kickLocked() {
	v.cpu.SetImmediateExit(true)
	if v.tid != 0 && !v.parked {
		kick(v.tid)
	}
}

// parkSpin is how long waitParked polls before it sleeps on the cond: a
// kicked vCPU usually parks within it, and learning so through the cond
// costs a goroutine wake-up (tens of µs on a small host) on top.
const parkSpin = 200 * time.Microsecond

// waitParked waits until the vCPU is parked; false if it exited instead.
// Where the host has a CPU to spare beyond one per vCPU (spin), it polls
// first; on a host with no more CPUs than vCPUs a poller would take the CPU
// a kicked vCPU's thread needs to take its signal and park (measured: the
// kick of 2 vCPUs on 2 CPUs grew by a sixth, that of 1 on 2 shrank by a
// sixth), so it sleeps on the cond at once.
func (v *vcpu) waitParked(spin bool) bool {
	for t0 := time.Now(); spin && !v.settled.Load() && time.Since(t0) < parkSpin; {
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for !v.parked && !v.exited {
		v.cond.Wait()
	}
	return v.parked
}

// GuestError is a failure the guest reported through the control port.
type GuestError struct {
	VCPU int
	Code uint32
}

func (e *GuestError) Error() string {
	names := map[uint32]string{gerrBadParams: "bad params page", gerrBadWorkload: "unknown workload",
		gerrBadPattern: "unknown pattern", gerrBadRegion: "bad memory region", gerrBadVCPU: "bad vCPU index",
		gerrBadNet: "bad network settings", gerrBadDisk: "bad disk settings",
		gerrDiskIO: "a disk request failed", gerrDiskVerify: "a block read back does not hold the version written"}
	n, ok := names[e.Code]
	if !ok {
		n = "unknown error"
	}
	return fmt.Sprintf("guest vCPU %d reported error %d (%s)", e.VCPU, e.Code, n)
}

// ErrGuestCrashed wraps exits that mean the guest cannot go on (shutdown,
// failed entry, internal error, an unexpected exit).
var ErrGuestCrashed = errors.New("guest crashed")

func (v *vcpu) handleExit() error {
	e := v.cpu.Exit()
	switch e.Reason() {
	case kvm.KVM_EXIT_IO:
		io := e.IO()
		if !io.Out || io.Size != 4 || io.Count != 1 {
			break
		}
		switch io.Port {
		case portConsole:
			v.console(io.Value())
			return nil
		case portControl:
			return v.control(io.Value())
		}
	case kvm.KVM_EXIT_DIRTY_RING_FULL:
		var err error
		if f := v.m.cfg.DirtyRingFull; f != nil {
			err = f(v.id)
		} else if t := v.m.tracker.Load(); t != nil {
			err = t.RingFull(v.id)
		} else {
			err = errors.New("no dirty tracker to empty it")
		}
		if err != nil {
			return fmt.Errorf("vCPU %d: dirty ring full: %w", v.id, err)
		}
		return nil
	case kvm.KVM_EXIT_INTR:
		return nil
	}
	var regs kvm.Regs
	rip := "unknown"
	if v.cpu.GetRegs(&regs) == nil {
		rip = fmt.Sprintf("%#x", regs.RIP)
	}
	return fmt.Errorf("vCPU %d: %w: unexpected exit %s at RIP %s", v.id, ErrGuestCrashed, e, rip)
}

// console emits the line the guest left in its console buffer.
func (v *vcpu) console(n uint32) {
	if n > consoleMax {
		n = consoleMax
	}
	off := StatusOffset(v.id) + consoleOffset
	line := make([]byte, 0, n+32)
	line = fmt.Appendf(line, "guest: ")
	line = append(line, v.m.mem[off:off+uint64(n)]...)
	line = append(line, '\n')
	v.m.console.Write(line)
}

func (v *vcpu) control(val uint32) error {
	code, arg := val&0xff, val>>8
	switch code {
	case ctrlReady:
		v.m.evMu.Lock()
		v.m.ready++
		v.m.evMu.Unlock()
		v.m.notify()
		return nil
	case ctrlDone:
		v.m.notify()
		return nil
	case ctrlError:
		return &GuestError{VCPU: v.id, Code: arg}
	}
	return fmt.Errorf("vCPU %d: %w: unknown control code %d", v.id, ErrGuestCrashed, code)
}
