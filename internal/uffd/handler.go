package uffd

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A Handler resolves faults on its own goroutine, locked to its own OS
// thread: it reads faults and calls resolve for each, and waits in poll(2)
// when none is queued.
//
// resolve must copy the page at Fault.Addr if it has not been copied yet,
// then unprotect it (FD.Unprotect with wake), which wakes the faulting
// thread. The same page can be reported more than once (several threads
// writing it, or a faulting thread interrupted by a signal and faulting
// again), and the copier may have unprotected it since: so resolve keeps a
// copied bit per page, copies only once, and unprotects (or wakes) every
// time. An error from resolve stops the Handler, leaving the faulting thread
// blocked until the caller unprotects the page or closes the FD.
type Handler struct {
	f       *FD
	resolve func(Fault) error
	faults  atomic.Uint64

	mu       sync.Mutex
	stop     int // an eventfd, closed by the goroutine as it exits
	exited   bool
	stopping atomic.Bool
	done     chan struct{}
	err      error
}

// StartHandler starts a Handler calling resolve for each fault on f. Stop it
// with Stop; closing f also ends it.
func (f *FD) StartHandler(resolve func(Fault) error) (*Handler, error) {
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("uffd: eventfd for a Handler: %w", err)
	}
	h := &Handler{f: f, resolve: resolve, stop: stop, done: make(chan struct{})}
	go h.run()
	return h, nil
}

func (h *Handler) run() {
	// The thread is never unlocked: it exits with the goroutine, so a
	// handler leaves no thread behind.
	runtime.LockOSThread()
	err := h.loop()
	if errors.Is(err, ErrClosed) {
		err = nil
	}
	h.mu.Lock()
	h.err = err
	h.exited = true
	unix.Close(h.stop)
	h.stop = -1
	h.mu.Unlock()
	close(h.done)
}

func (h *Handler) loop() error {
	var buf [maxBatch]Fault
	for !h.stopping.Load() {
		n, err := h.f.ReadFaults(buf[:])
		if err != nil {
			return err
		}
		for _, flt := range buf[:n] {
			h.faults.Add(1)
			if err := h.resolve(flt); err != nil {
				return fmt.Errorf("uffd: Handler: resolving the fault at %#x: %w", flt.Addr, err)
			}
		}
		if n > 0 {
			continue
		}
		switch err := h.f.wait(h.stop); {
		case err == errStopped:
			return nil
		case err != nil:
			return err
		}
	}
	return nil
}

// Faults returns how many faults the Handler has read.
func (h *Handler) Faults() uint64 { return h.faults.Load() }

// Done is closed when the Handler has exited (after Stop, Close of its FD,
// or an error).
func (h *Handler) Done() <-chan struct{} { return h.done }

// Stop asks the Handler to exit, waits until it has, and returns the error
// that ended it, if any (closing the FD is not one). Faults not yet read
// stay queued, their threads blocked. Stop may be called more than once.
func (h *Handler) Stop() error {
	h.mu.Lock()
	if !h.exited {
		h.stopping.Store(true)
		if err := signal(h.stop); err != nil {
			h.mu.Unlock()
			return fmt.Errorf("uffd: Handler.Stop: %w", err)
		}
	}
	h.mu.Unlock()
	<-h.done
	return h.err
}
