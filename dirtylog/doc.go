// Package dirtylog answers, at every epoch, "which guest pages changed since
// the last harvest?", exactly and fast.
//
// # Mechanisms
//
// A Tracker harvests through one of KVM's three dirty-tracking mechanisms:
//
//   - Bitmap: KVM_GET_DIRTY_LOG per slot fetches the slot's bitmap and
//     re-protects the dirty pages in one ioctl.
//   - Manual: with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG only
//     fetches, and KVM_CLEAR_DIRTY_LOG re-protects exactly the pages harvested,
//     in chunks (Config.ClearChunk) so KVM's MMU lock is never held long.
//     InitiallySet starts with every page dirty, so the first harvest is all of
//     memory, as an initial sync wants.
//   - Ring: with KVM_CAP_DIRTY_LOG_RING(_ACQ_REL), each vCPU pushes the pages
//     it dirties into a ring mapped from its fd; a harvest reads the published
//     entries, marks them, and KVM_RESET_DIRTY_RINGS re-protects the pages. When
//     a ring fills, the vCPU exits with KVM_EXIT_DIRTY_RING_FULL and its run
//     loop calls Tracker.RingFull, which empties every ring into a pending set
//     that the next harvest includes, so no entry is lost.
//
// The ring must be enabled before a VM's vCPUs exist, and a VM with a ring
// cannot use the bitmap (KVM_GET_DIRTY_LOG fails with ENXIO, which Harvest
// reports, never swallows). So the choice is made when the VM is built:
// Recommend weighs the ring's per-page cost against the manual bitmap's scan
// of all memory for an expected dirty rate; Auto in a Config means Ring if the
// VM has one, else Manual, else Bitmap. A mechanism the kernel lacks gives an
// error matching ErrNotSupported.
//
// # The VMM's own writes
//
// KVM logs only what the guest writes. A VMM that writes guest memory itself
// (device DMA) calls MarkWritten, from any goroutine; the marks live in an
// atomic bitmap per slot, and each harvest swaps them out word by word and
// merges them in.
//
// # Exactness
//
// Every page written before a harvest starts is in that harvest's set; a page
// written while it runs is in it or in the next. For a consistent checkpoint,
// harvest with the vCPUs paused and copy the pages after Harvest returns (then
// even a write racing the harvest is in the copy). KVM may report a page the
// guest did not change only where it documents that: a write of the same value
// still dirties the page.
//
// # Ring resets and signals
//
// Since Linux 6.17 (commit 49005a2a3d2a, "KVM: Bail from the dirty ring reset
// flow if a signal is pending"), KVM_RESET_DIRTY_RINGS stops as soon as the
// calling thread has a signal pending. The entries it already took off the
// ring but had not yet re-protected (it batches up to 64 neighbouring pages)
// are dropped: their pages stay writable, so the guest's next writes to them
// are never logged, in this harvest or any later one. The ioctl still returns
// success, with a count that includes the dropped entries. Go's runtime
// signals threads on its own (SIGURG, to preempt goroutines and for the GC),
// so an unprotected reset lost a page now and then: the engine's audit saw
// the counter guest's status page missed in about one run in 30.
//
// Two defences: kvm.VM.ResetDirtyRings issues the ioctl with the thread's
// asynchronous signals blocked, so a signal cannot stop it; and the tracker
// counts the entries it marked, and if a reset takes fewer (or fails with
// EINTR, which only an unblockable signal can cause) it repairs the damage:
// it turns logging off and on, which re-protects every page, and owes every
// page to the next harvest, since a write while logging was off is not logged
// either (Tracker.ShortRingResets counts such repairs). The bitmap mechanisms
// do not stop on signals.
//
// # Sets
//
// A Set holds one bitmap per slot. It counts, unions, and walks runs of dirty
// pages word by word (ForEachRun), and turns them into (GPA, length) Ranges for
// the wire. Harvest adds into a caller's Set and does not allocate.
package dirtylog
