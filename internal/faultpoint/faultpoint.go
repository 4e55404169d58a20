// Package faultpoint is the engine's fault injection, kept out of its public
// API. A test, or the command under REPAGENT_FAULT, attaches a function to an
// engine (a *replicate.Primary or *replicate.Backup) before it runs; the
// engine calls it at its named points, on its own goroutines, with the
// epoch (or, for Sync, the pre-copy round) it is at. With nothing attached
// anywhere in the process a point costs one atomic load.
package faultpoint

import (
	"sync"
	"sync/atomic"
)

// The engine's points.
const (
	Sync  = "sync"  // primary: a pre-copy round's first batch is on the wire
	Pause = "pause" // primary: inside a pause: harvested, state saved, pages not yet staged
	Send  = "send"  // primary: half of an epoch's batches are on the wire
	Sent  = "sent"  // primary: an epoch's end record is on the wire, not yet acknowledged
	Apply = "apply" // backup: half of an epoch's pages are applied
)

// Func is called at each point an engine passes.
type Func func(point string, n uint64)

var (
	hooks    sync.Map // owner → Func
	attached atomic.Int32
)

// Attach makes owner's points call f until detach is called.
func Attach(owner any, f Func) (detach func()) {
	hooks.Store(owner, f)
	attached.Add(1)
	var once sync.Once
	return func() {
		once.Do(func() {
			hooks.Delete(owner)
			attached.Add(-1)
		})
	}
}

// Attached reports whether owner has a function attached.
func Attached(owner any) bool {
	if attached.Load() == 0 {
		return false
	}
	_, ok := hooks.Load(owner)
	return ok
}

// Hit calls owner's function, if any, at point.
func Hit(owner any, point string, n uint64) {
	if attached.Load() == 0 {
		return
	}
	if f, ok := hooks.Load(owner); ok {
		f.(Func)(point, n)
	}
}
