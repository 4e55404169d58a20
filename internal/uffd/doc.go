// Package uffd is userfaultfd(2) in write-protect mode, the primitive layer
// of copy-before-write (lazy) checkpoint capture: in the pause, the epoch's
// dirty runs of guest memory are write-protected instead of copied; the
// guest resumes; a copier copies the protected pages to staging and
// unprotects them; a write to a page not yet copied blocks the writer until
// a fault handler has copied the page and unprotected it. This package has
// no engine logic: no bitmaps, no staging, no epochs.
//
// # Protocol
//
//  1. Open: userfaultfd(2), then the UFFDIO_API handshake enabling
//     PAGEFAULT_FLAG_WP, and WP_UNPOPULATED and WP_HUGETLBFS_SHMEM when
//     offered. A required feature that is not offered is an error wrapping
//     ErrNotSupported and naming it, so the caller can fall back to copying
//     in the pause.
//  2. FD.Register a range (the guest memory mapping) in write-protect mode.
//  3. FD.WriteProtect runs of it (in the pause).
//  4. A write to a protected page blocks the writing thread and queues a
//     Fault (FD.Wait, FD.ReadFaults; or a Handler, on its own locked OS
//     thread).
//  5. The resolver reads the page, still holding its old content, copies
//     it, then FD.Unprotect(addr, page, wake=true): the writer wakes and its
//     write proceeds. The copier does the same for the pages nobody wrote,
//     with wake=false (or true: a wake nobody waits for is cheap).
//  6. FD.Close unregisters everything and wakes every blocked writer.
//
// # Rules
//
//   - A range must be registered before it is protected: WriteProtect of an
//     unregistered range fails with ENOENT.
//   - No page may escape protection. A never-touched anonymous page is not
//     protected unless WP_UNPOPULATED is on (Open enables it when offered,
//     and it is offered here); its first write would go through unseen.
//     Shmem (memfd) marks never-touched pages as protected regardless.
//     Otherwise populate the memory first (MADV_POPULATE_WRITE).
//   - Protection lives in the registered mapping's page tables, not in the
//     memory: writes through another mapping of the same memfd, or through
//     the memfd itself (pwrite(2)), never fault. Every writer of guest
//     memory, KVM included, must go through the registered mapping.
//   - The resolver reads a protected page freely (reads never fault) and
//     must copy it before unprotecting it; after the unprotect the writer
//     may already have changed it.
//   - The same page can fault more than once (several writers; a writer
//     interrupted by a signal faults again), and the copier may have
//     unprotected it since: the resolver keeps a copied bit per page,
//     copies once, and unprotects (or wakes) every time.
//   - The handler must never itself be blocked by a fault, and must not
//     wait for anything a blocked writer holds.
//
// # Go writers and stop-the-world
//
// A goroutine that writes a protected page blocks in the fault while the Go
// runtime believes it is running. Plain stores in ordinary Go code get
// through: a garbage collection's stop-the-world signals the thread, the
// fault is interrupted, the goroutine is preempted at the store and faults
// again when resumed (TestGCWhileWriterFaults). But code that is not
// asynchronously preemptible (runtime.memmove behind copy(), other
// assembly, the runtime itself, anything with GODEBUG=asyncpreemptoff=1)
// keeps faulting without ever reaching a safe point: the world never stops,
// the Handler's goroutine never runs again, and the whole process deadlocks
// (tried on this machine: copy() into protected pages with runtime.GC in a
// loop hangs, the writer in memmove and the garbage collector in mark
// termination). So a VMM goroutine that writes guest memory with copy() (a
// device completing a request) must have the engine copy and unprotect
// the target pages first, or write them from a system call (read(2) into
// the page: a goroutine in a system call does not hold up stop-the-world).
//
// # KVM
//
// PLATFORM.md ("userfaultfd"): write-protect mode works on anonymous and
// memfd guest memory, and a KVM guest's write to a protected page raises a
// uffd fault that userspace resolves by copying the page and unprotecting
// it. UFFDIO_WRITEPROTECT changes the host page tables and, through the MMU
// notifier, takes KVM's write access to those pages away; the guest's next
// write makes KVM fault the page in writable on the vCPU thread, inside
// KVM_RUN, with get_user_pages: a kernel-mode access. That is why Open never
// passes UFFD_USER_MODE_ONLY, which would make such faults fail (KVM_RUN
// returning EFAULT) instead of waiting. A vCPU blocked in such a fault is in
// a system call and does not hold up Go's stop-the-world. PLATFORM.md also
// measured UFFDIO_WRITEPROTECT at 3.3-3.8 µs per call inside a running VM
// (0.9-1.1 µs on a memfd with no VM) and 11.7 ms for one call over a 256 MiB
// slot (about 180 ns per page).
//
// WP_ASYNC (offered here) is not used: the kernel then resolves write
// faults itself, without a message, so nothing could copy the page first.
// It suits dirty tracking through PAGEMAP_SCAN, not capture.
//
// # Costs
//
// Measured by this package's benchmarks (go test -bench . -benchtime 2000x)
// on a 2-core AMD EPYC KVM PVM machine, memfd memory, no VM; ranges over
// six runs, the high ends while other tests loaded the machine. The floor,
// copying a page, is measured in the same run.
//
//	operation                                          cost
//	WRITEPROTECT, 1 page (one call)                    1.0-2.0 µs
//	WRITEPROTECT, 16 pages                             2.1-3.7 µs (130-230 ns/page)
//	WRITEPROTECT, 512 pages (2 MiB)                    36-71 µs (70-140 ns/page)
//	unprotect (no wake), same runs                     as protect
//	write fault round trip, as the writer sees it      12-18 µs quiet, up to 59 µs loaded
//	  of which the handler's unprotect with wake       4-14 µs
//	  and the handler's copy of the page               0.9-2.3 µs
//	copy a 4 KiB page (floor), 2 MiB / 64 MiB region   0.22-0.52 / 0.56-1.25 µs
//
// So a page the guest writes before the copier reaches it costs the writer
// some 30 to 100 copies' worth of time, most of it waking the writer on the
// other CPU. A page nobody writes costs its copy plus 0.15-0.3 µs of
// protecting and unprotecting when the copier unprotects whole runs in one
// call, but 1-2 µs more when it unprotects page by page. A cost model weighs
// the pause saved against the faults expected, calibrated on the machine it
// runs on.
package uffd
