package uffd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/repagent/repagent/internal/privileged"
	"golang.org/x/sys/unix"
)

// The want values were printed by a C program that includes
// <linux/userfaultfd.h> (linux-libc-dev 6.1, x86_64), except the features
// newer than that header (WP_UNPOPULATED, POISON, WP_ASYNC), which are from
// the kernel's include/uapi/linux/userfaultfd.h of 6.7 and later; this
// kernel (6.18) offers features 0x1ffff. They are kernel ABI and never
// change.
func TestABI(t *testing.T) {
	tests := []struct {
		name      string
		got, want uint64
	}{
		{"UFFDIO_API", UFFDIO_API, 0xc018aa3f},
		{"UFFDIO_REGISTER", UFFDIO_REGISTER, 0xc020aa00},
		{"UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, 0x8010aa01},
		{"UFFDIO_WAKE", UFFDIO_WAKE, 0x8010aa02},
		{"UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, 0xc018aa06},
		{"USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW, 0xaa00},
		{"UFFD_API", UFFD_API, 0xaa},
		{"_UFFDIO_REGISTER", _UFFDIO_REGISTER, 0x0},
		{"_UFFDIO_UNREGISTER", _UFFDIO_UNREGISTER, 0x1},
		{"_UFFDIO_WAKE", _UFFDIO_WAKE, 0x2},
		{"_UFFDIO_WRITEPROTECT", _UFFDIO_WRITEPROTECT, 0x6},
		{"_UFFDIO_API", _UFFDIO_API, 0x3f},
		{"UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT, 0x12},
		{"UFFD_PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE, 0x1},
		{"UFFD_PAGEFAULT_FLAG_WP", UFFD_PAGEFAULT_FLAG_WP, 0x2},
		{"UFFD_PAGEFAULT_FLAG_MINOR", UFFD_PAGEFAULT_FLAG_MINOR, 0x4},
		{"UFFDIO_REGISTER_MODE_MISSING", UFFDIO_REGISTER_MODE_MISSING, 0x1},
		{"UFFDIO_REGISTER_MODE_WP", UFFDIO_REGISTER_MODE_WP, 0x2},
		{"UFFDIO_REGISTER_MODE_MINOR", UFFDIO_REGISTER_MODE_MINOR, 0x4},
		{"UFFDIO_WRITEPROTECT_MODE_WP", UFFDIO_WRITEPROTECT_MODE_WP, 0x1},
		{"UFFDIO_WRITEPROTECT_MODE_DONTWAKE", UFFDIO_WRITEPROTECT_MODE_DONTWAKE, 0x2},
		{"UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY, 0x1},
		{"UFFD_FEATURE_PAGEFAULT_FLAG_WP", uint64(FeaturePagefaultFlagWP), 0x1},
		{"UFFD_FEATURE_THREAD_ID", uint64(FeatureThreadID), 0x100},
		{"UFFD_FEATURE_EXACT_ADDRESS", uint64(FeatureExactAddress), 0x800},
		{"UFFD_FEATURE_WP_HUGETLBFS_SHMEM", uint64(FeatureWPHugetlbfsShmem), 0x1000},
		{"UFFD_FEATURE_WP_UNPOPULATED", uint64(FeatureWPUnpopulated), 1 << 13},
		{"UFFD_FEATURE_POISON", uint64(FeaturePoison), 1 << 14},
		{"UFFD_FEATURE_WP_ASYNC", uint64(FeatureWPAsync), 1 << 15},
		{"__NR_userfaultfd", unix.SYS_USERFAULTFD, 0x143},
		{"O_CLOEXEC", unix.O_CLOEXEC, 0x80000},
		{"O_NONBLOCK", unix.O_NONBLOCK, 0x800},
		// struct layouts: sizeof and offsetof.
		{"sizeof(struct uffd_msg)", sizeofMsg, 0x20},
		{"offsetof(uffd_msg, arg.pagefault.flags)", msgOffFlags, 0x8},
		{"offsetof(uffd_msg, arg.pagefault.address)", msgOffAddr, 0x10},
		{"offsetof(uffd_msg, arg.pagefault.feat.ptid)", msgOffPtid, 0x18},
		{"sizeof(struct uffdio_api)", uint64(unsafe.Sizeof(uffdioAPI{})), 0x18},
		{"sizeof(struct uffdio_range)", uint64(unsafe.Sizeof(uffdioRange{})), 0x10},
		{"sizeof(struct uffdio_register)", uint64(unsafe.Sizeof(uffdioRegister{})), 0x20},
		{"sizeof(struct uffdio_writeprotect)", uint64(unsafe.Sizeof(uffdioWriteProtect{})), 0x18},
		{"sizeofAPI", sizeofAPI, 0x18},
		{"sizeofRange", sizeofRange, 0x10},
		{"sizeofRegister", sizeofRegister, 0x20},
		{"sizeofWriteProtect", sizeofWriteProtect, 0x18},
		{"offsetof(uffdio_register, mode)", uint64(unsafe.Offsetof(uffdioRegister{}.Mode)), 0x10},
		{"offsetof(uffdio_register, ioctls)", uint64(unsafe.Offsetof(uffdioRegister{}.Ioctls)), 0x18},
		{"offsetof(uffdio_writeprotect, mode)", uint64(unsafe.Offsetof(uffdioWriteProtect{}.Mode)), 0x10},
		{"offsetof(uffdio_api, ioctls)", uint64(unsafe.Offsetof(uffdioAPI{}.Ioctls)), 0x10},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
	}
}

func TestFeatureString(t *testing.T) {
	for f, want := range map[Feature]string{
		0:                                        "none",
		FeatureWPUnpopulated:                     "WP_UNPOPULATED",
		FeatureWPHugetlbfsShmem | FeatureWPAsync: "WP_HUGETLBFS_SHMEM|WP_ASYNC",
		FeaturePagefaultFlagWP | 1<<40:           "PAGEFAULT_FLAG_WP|bit40",
		FeatureThreadID | FeatureExactAddress | 1<<16: "THREAD_ID|EXACT_ADDRESS|MOVE",
	} {
		if got := f.String(); got != want {
			t.Errorf("Feature(%#x).String() = %q, want %q", uint64(f), got, want)
		}
	}
}

var pageSize = os.Getpagesize()

// checkLeaks fails t if it ends with more open descriptors or goroutines
// than it started with. Call it first, so its cleanup runs last.
func checkLeaks(t *testing.T) {
	t.Helper()
	fds, goroutines := openFDs(t), runtime.NumGoroutine()
	t.Cleanup(func() {
		if n := openFDs(t); n != fds {
			t.Errorf("%d descriptors open at the end, %d at the start", n, fds)
		}
		// Exiting goroutines take a moment to be counted out.
		for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > goroutines; {
			if time.Now().After(deadline) {
				t.Errorf("%d goroutines at the end, %d at the start", runtime.NumGoroutine(), goroutines)
				break
			}
			time.Sleep(time.Millisecond)
		}
	})
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// memfdMem maps a memfd of pages pages shared, as guest memory is.
func memfdMem(t testing.TB, pages int) []byte {
	t.Helper()
	fd, err := unix.MemfdCreate("uffd-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	defer unix.Close(fd) // the mapping keeps the file
	if err := unix.Ftruncate(fd, int64(pages*pageSize)); err != nil {
		t.Fatalf("ftruncate: %v", err)
	}
	mem, err := unix.Mmap(fd, 0, pages*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap memfd: %v", err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	return mem
}

// anonMem maps pages pages of private anonymous memory.
func anonMem(t testing.TB, pages int) []byte {
	t.Helper()
	mem, err := unix.Mmap(-1, 0, pages*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap anonymous: %v", err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	return mem
}

// fillPages writes page i full of byte(0x10+i).
func fillPages(mem []byte) {
	for i := 0; i*pageSize < len(mem); i++ {
		clear(page(mem, i))
		for j := range page(mem, i) {
			mem[i*pageSize+j] = byte(0x10 + i)
		}
	}
}

func page(mem []byte, i int) []byte { return mem[i*pageSize : (i+1)*pageSize] }

func openFD(t testing.TB, features ...Feature) *FD {
	t.Helper()
	f, err := Open(features...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return f
}

// copier is a resolver the way the capture engine's will be: the first
// fault on a page copies the page's content (still the old one: the writer
// is blocked) to a side buffer; every fault then unprotects the page, which
// wakes the writer.
type copier struct {
	f    *FD
	mem  []byte
	base uint64
	side []byte

	mu     sync.Mutex
	copied map[int]bool
	faults []Fault
}

func newCopier(f *FD, mem []byte) *copier {
	return &copier{f: f, mem: mem, base: Addr(mem), side: make([]byte, len(mem)), copied: map[int]bool{}}
}

func (c *copier) resolve(flt Fault) error {
	if flt.Addr < c.base || flt.Addr >= c.base+uint64(len(c.mem)) {
		return fmt.Errorf("fault at %#x outside the memory [%#x, +%#x)", flt.Addr, c.base, len(c.mem))
	}
	p := int(flt.Addr-c.base) / pageSize
	c.mu.Lock()
	c.faults = append(c.faults, flt)
	if !c.copied[p] {
		copy(page(c.side, p), page(c.mem, p))
		c.copied[p] = true
	}
	c.mu.Unlock()
	return c.f.Unprotect(flt.Addr, uint64(pageSize), true)
}

// faultedPages returns the distinct pages that faulted, in order, and fails
// t if a fault is not a page-aligned write-protect write fault.
func (c *copier) faultedPages(t *testing.T) []int {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	var pages []int
	for _, flt := range c.faults {
		if !flt.WP() || !flt.Write() {
			t.Errorf("fault at %#x has flags %#x, want WP|WRITE", flt.Addr, flt.Flags)
		}
		if flt.Addr%uint64(pageSize) != 0 {
			t.Errorf("fault address %#x is not page-aligned", flt.Addr)
		}
		pages = append(pages, int(flt.Addr-c.base)/pageSize)
	}
	slices.Sort(pages)
	return slices.Compact(pages)
}

// writeFrom writes val at offset off of each page in pages, from a new
// goroutine locked to its own thread (as a vCPU thread is), and reports
// the bytes it read from page read (before writing) on the channel, which is
// closed when all is done.
func writeFrom(mem []byte, pages []int, off int, val byte, read int) <-chan byte {
	done := make(chan byte, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with us
		if read >= 0 {
			done <- mem[read*pageSize+off]
		}
		for _, p := range pages {
			mem[p*pageSize+off] = val
		}
		close(done)
	}()
	return done
}

// await waits for ch to close, failing t if that takes absurdly long (a
// lost wake-up, not a slow machine).
func await[T any](t *testing.T, ch <-chan T, what string) {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-timeout:
			t.Fatalf("%s did not finish in 60 s", what)
		}
	}
}

func TestCopyBeforeWriteMemfd(t *testing.T) {
	testCopyBeforeWrite(t, memfdMem)
}

func TestCopyBeforeWriteAnonymous(t *testing.T) {
	testCopyBeforeWrite(t, anonMem)
}

// testCopyBeforeWrite protects pages 2-9 of 16 populated pages; a writer
// writes pages 0 (unprotected), 3 and 7 after reading page 5. Only 3 and 7
// fault; the handler's copies hold their content from before the write.
func testCopyBeforeWrite(t *testing.T, newMem func(testing.TB, int) []byte) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	const pages, off, val = 16, 100, 0xEE
	mem := newMem(t, pages)
	fillPages(mem)
	before := bytes.Clone(mem)
	base := Addr(mem)
	f := openFD(t)
	if err := f.Register(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base+2*uint64(pageSize), 8*uint64(pageSize)); err != nil {
		t.Fatal(err)
	}
	c := newCopier(f, mem)
	h, err := f.StartHandler(c.resolve)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop() })

	written := []int{0, 3, 7}
	done := writeFrom(mem, written, off, val, 5)
	if got := <-done; got != before[5*pageSize+off] {
		t.Errorf("the writer read %#x from protected page 5, want %#x", got, before[5*pageSize+off])
	}
	await(t, done, "the writer")
	if err := h.Stop(); err != nil {
		t.Fatalf("handler: %v", err)
	}

	if got, want := c.faultedPages(t), []int{3, 7}; !slices.Equal(got, want) {
		t.Errorf("pages that faulted: %v, want %v (the written protected pages)", got, want)
	}
	for p := range pages {
		wantMem := bytes.Clone(page(before, p))
		if slices.Contains(written, p) {
			wantMem[off] = val
		}
		if !bytes.Equal(page(mem, p), wantMem) {
			t.Errorf("page %d in memory does not hold what was written", p)
		}
		wantSide := make([]byte, pageSize)
		if p == 3 || p == 7 {
			wantSide = page(before, p)
		}
		if !bytes.Equal(page(c.side, p), wantSide) {
			t.Errorf("page %d's copy: first byte %#x, byte %d %#x; want the content from before the write (%#x) or none",
				p, c.side[p*pageSize], off, c.side[p*pageSize+off], wantSide[off])
		}
	}
}

// TestUnpopulated writes a never-touched protected page: with
// WP_UNPOPULATED (anonymous) or on shmem, it faults and its copy is zeros.
func TestUnpopulated(t *testing.T) {
	privileged.Require(t, privileged.Root)
	offered, err := Offered()
	if err != nil {
		t.Fatal(err)
	}
	if offered&FeatureWPUnpopulated == 0 {
		privileged.Lacks(t, fmt.Errorf("the kernel does not offer UFFD_FEATURE_WP_UNPOPULATED (it offers %s)", offered))
	}
	for _, tc := range []struct {
		name   string
		newMem func(testing.TB, int) []byte
	}{{"anonymous", anonMem}, {"memfd", memfdMem}} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			const pages, off, val = 4, 8, 0x5A
			mem := tc.newMem(t, pages)
			f := openFD(t, FeatureWPUnpopulated)
			if f.Features()&FeatureWPUnpopulated == 0 {
				t.Fatalf("features enabled %s lack WP_UNPOPULATED", f.Features())
			}
			base := Addr(mem)
			if err := f.Register(base, uint64(len(mem))); err != nil {
				t.Fatal(err)
			}
			if err := f.WriteProtect(base, uint64(len(mem))); err != nil {
				t.Fatal(err)
			}
			c := newCopier(f, mem)
			for i := range c.side {
				c.side[i] = 0xFF // a copy of the untouched page must clear this
			}
			h, err := f.StartHandler(c.resolve)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { h.Stop() })
			await(t, writeFrom(mem, []int{1}, off, val, -1), "the writer")
			if err := h.Stop(); err != nil {
				t.Fatalf("handler: %v", err)
			}
			if got := c.faultedPages(t); !slices.Equal(got, []int{1}) {
				t.Errorf("pages that faulted: %v, want [1]", got)
			}
			if !bytes.Equal(page(c.side, 1), make([]byte, pageSize)) {
				t.Errorf("the copy of the untouched page is not zeros")
			}
			if mem[pageSize+off] != val {
				t.Errorf("memory holds %#x, want %#x", mem[pageSize+off], val)
			}
		})
	}
}

// TestUnpopulatedEscapesWithoutFeature pins the rule in doc.go: without
// WP_UNPOPULATED, protecting a never-touched anonymous page does nothing,
// and its first write goes through without a fault.
func TestUnpopulatedEscapesWithoutFeature(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := anonMem(t, 4)
	f, err := open(0, FeatureWPHugetlbfsShmem)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if f.Features()&FeatureWPUnpopulated != 0 {
		t.Fatalf("features %s: WP_UNPOPULATED was not asked for", f.Features())
	}
	base := Addr(mem)
	if err := f.Register(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	c := newCopier(f, mem)
	h, err := f.StartHandler(c.resolve)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop() })
	await(t, writeFrom(mem, []int{1}, 0, 1, -1), "the writer")
	if err := h.Stop(); err != nil {
		t.Fatalf("handler: %v", err)
	}
	if got := c.faultedPages(t); len(got) != 0 {
		t.Errorf("pages that faulted: %v; without WP_UNPOPULATED an untouched anonymous page was expected to escape", got)
	}
}

// TestThreadID checks a fault names the faulting thread with FeatureThreadID.
func TestThreadID(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := memfdMem(t, 2)
	fillPages(mem)
	f := openFD(t, FeatureThreadID)
	base := Addr(mem)
	if err := f.Register(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	tid := make(chan int, 1)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		tid <- unix.Gettid()
		mem[pageSize] = 1
		close(done)
	}()
	want := <-tid
	if err := f.Wait(); err != nil {
		t.Fatal(err)
	}
	var buf [4]Fault
	n, err := f.ReadFaults(buf[:])
	if err != nil || n != 1 {
		t.Fatalf("ReadFaults = %d, %v; want 1 fault", n, err)
	}
	if got := buf[0]; got.Addr != base+uint64(pageSize) || int(got.TID) != want {
		t.Errorf("fault %+v, want address %#x and thread %d", got, base+uint64(pageSize), want)
	}
	if err := f.Unprotect(base+uint64(pageSize), uint64(pageSize), true); err != nil {
		t.Fatal(err)
	}
	await(t, done, "the writer")
}

// readInto has the kernel write data at offset off of page p: a goroutine
// read(2)s it from a pipe into mem, a kernel-mode write (copy_to_user) as
// KVM's on a vCPU's behalf or a device's read(2) into guest memory are. A
// goroutine in a system call gets no preemption signals from the Go
// runtime, so its fault is never interrupted and retried. The channel gets
// read(2)'s count and error.
func readInto(t *testing.T, mem []byte, p, off int, data []byte) <-chan error {
	t.Helper()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	if n, err := unix.Write(fds[1], data); n != len(data) || err != nil {
		t.Fatalf("write to the pipe: %d, %v", n, err)
	}
	unix.Close(fds[1])
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer unix.Close(fds[0])
		n, err := unix.Read(fds[0], mem[p*pageSize+off:p*pageSize+off+len(data)])
		if err == nil && n != len(data) {
			err = fmt.Errorf("read(2) returned %d bytes, want %d", n, len(data))
		}
		done <- err
		close(done)
	}()
	return done
}

// awaitErr waits for the error readInto reports and fails t on it.
func awaitErr(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not finish in 60 s", what)
	}
}

// TestKernelModeWrite: a write by the kernel (read(2) into a protected page)
// faults and waits for the handler like a user-mode write; without
// UFFD_USER_MODE_ONLY it does not fail with EFAULT.
func TestKernelModeWrite(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := memfdMem(t, 4)
	fillPages(mem)
	before := bytes.Clone(mem)
	f := openFD(t)
	base := Addr(mem)
	if err := f.Register(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	c := newCopier(f, mem)
	h, err := f.StartHandler(c.resolve)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop() })
	data := bytes.Repeat([]byte{0xAB}, 64)
	awaitErr(t, readInto(t, mem, 2, 16, data), "read(2) into the protected page")
	if err := h.Stop(); err != nil {
		t.Fatalf("handler: %v", err)
	}
	if got := c.faultedPages(t); !slices.Equal(got, []int{2}) {
		t.Errorf("pages that faulted: %v, want [2]", got)
	}
	if !bytes.Equal(page(c.side, 2), page(before, 2)) {
		t.Errorf("the copy of page 2 does not hold its content from before the read(2)")
	}
	if !bytes.Equal(mem[2*pageSize+16:2*pageSize+16+len(data)], data) {
		t.Errorf("memory does not hold what read(2) wrote")
	}
}

// TestUnprotectDontWake: an unprotect without wake leaves the writer
// blocked until Wake. The writer is the kernel (read(2)), so no signal can
// wake it early.
func TestUnprotectDontWake(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := memfdMem(t, 1)
	fillPages(mem)
	f := openFD(t)
	base, size := Addr(mem), uint64(pageSize)
	if err := f.Register(base, size); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base, size); err != nil {
		t.Fatal(err)
	}
	done := readInto(t, mem, 0, 0, []byte{0x77})
	if err := f.Wait(); err != nil {
		t.Fatal(err)
	}
	var buf [1]Fault
	if n, err := f.ReadFaults(buf[:]); n != 1 || err != nil {
		t.Fatalf("ReadFaults = %d, %v; want 1 fault", n, err)
	}
	if err := f.Unprotect(base, size, false); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
		// Not a timing assertion: the writer must not have been woken at
		// all, however long this takes to check.
		t.Fatal("the writer completed after an unprotect with DONTWAKE, before Wake")
	default:
	}
	if err := f.Wake(base, size); err != nil {
		t.Fatal(err)
	}
	awaitErr(t, done, "the writer after Wake")
	if mem[0] != 0x77 {
		t.Errorf("memory holds %#x after the woken write, want 0x77", mem[0])
	}
}

// TestGCWhileWriterFaults: Go code storing into protected pages while the
// garbage collector stops the world in a loop completes. A faulting store
// is interrupted by the runtime's preemption signal, preempted at the
// store, and faults again when resumed, so the world can stop while the
// handler's goroutine waits.
//
// The same with copy() instead of stores deadlocks the whole process
// (tried): runtime.memmove is not asynchronously preemptible, so the world
// never stops, and the handler, a goroutine, never runs again. See doc.go.
func TestGCWhileWriterFaults(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	const pages, rounds = 256, 8
	mem := memfdMem(t, pages)
	fillPages(mem)
	f := openFD(t)
	base := Addr(mem)
	if err := f.Register(base, uint64(len(mem))); err != nil {
		t.Fatal(err)
	}
	c := newCopier(f, mem)
	h, err := f.StartHandler(func(flt Fault) error {
		_ = make([]byte, 16<<10) // the handler allocates, as ordinary Go does
		return c.resolve(flt)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop() })
	stop := make(chan struct{})
	gcDone := make(chan struct{})
	go func() {
		defer close(gcDone)
		for {
			select {
			case <-stop:
				return
			default:
				runtime.GC()
			}
		}
	}()
	defer func() { close(stop); <-gcDone }()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer close(done)
		for r := range rounds {
			c.mu.Lock()
			clear(c.copied)
			c.mu.Unlock()
			if err := f.WriteProtect(base, uint64(len(mem))); err != nil {
				done <- err
				return
			}
			for p := range pages {
				mem[p*pageSize+r] = byte(r)
			}
		}
	}()
	awaitErr(t, done, "the writer")
	if n := h.Faults(); n < pages*rounds {
		t.Errorf("%d faults, want at least %d", n, pages*rounds)
	}
}

// TestCloseEndsWaiters: Close makes a waiting Handler and a Wait return.
func TestCloseEndsWaiters(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	f, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	h, err := f.StartHandler(func(Fault) error { return errors.New("no fault expected") })
	if err != nil {
		t.Fatal(err)
	}
	waitErr := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		waitErr <- f.Wait()
	}()
	time.Sleep(10 * time.Millisecond) // most likely both are in poll(2) now; either way they must end
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	await(t, h.Done(), "the handler after Close")
	if err := h.Stop(); err != nil {
		t.Errorf("Stop after Close: %v, want nil", err)
	}
	if err := <-waitErr; !errors.Is(err, ErrClosed) {
		t.Errorf("Wait after Close: %v, want ErrClosed", err)
	}
	if err := f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestCloseReleasesWriter: closing the userfaultfd wakes a blocked writer,
// whose write then goes through.
func TestCloseReleasesWriter(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := memfdMem(t, 1)
	fillPages(mem)
	f, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	base := Addr(mem)
	if err := f.Register(base, uint64(pageSize)); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base, uint64(pageSize)); err != nil {
		t.Fatal(err)
	}
	done := writeFrom(mem, []int{0}, 0, 0x42, -1)
	if err := f.Wait(); err != nil { // the writer is blocked in its fault
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	await(t, done, "the writer after Close")
	if mem[0] != 0x42 {
		t.Errorf("memory holds %#x, want 0x42", mem[0])
	}
}

func TestHandlerStopsOnResolveError(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := memfdMem(t, 1)
	fillPages(mem)
	f := openFD(t)
	base := Addr(mem)
	if err := f.Register(base, uint64(pageSize)); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base, uint64(pageSize)); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	h, err := f.StartHandler(func(Fault) error { return boom })
	if err != nil {
		t.Fatal(err)
	}
	done := writeFrom(mem, []int{0}, 0, 1, -1)
	await(t, h.Done(), "the handler")
	if err := h.Stop(); !errors.Is(err, boom) || !strings.Contains(err.Error(), fmt.Sprintf("%#x", base)) {
		t.Errorf("Stop = %v, want boom naming the fault's address %#x", err, base)
	}
	// The writer is still blocked; unprotecting releases it.
	if err := f.Unprotect(base, uint64(pageSize), true); err != nil {
		t.Fatal(err)
	}
	await(t, done, "the writer")
}

func TestErrors(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := memfdMem(t, 4)
	fillPages(mem)
	f := openFD(t)
	base := Addr(mem)
	size := uint64(pageSize)

	// Protecting a range that is mapped but not registered.
	err := f.WriteProtect(base, 2*size)
	var re *RangeError
	if !errors.As(err, &re) || re.Addr != base || re.Len != 2*size {
		t.Fatalf("WriteProtect of an unregistered range = %v, want a RangeError for [%#x, +%#x)", err, base, 2*size)
	}
	if !errors.Is(err, unix.ENOENT) {
		t.Errorf("WriteProtect of an unregistered range = %v, want ENOENT", err)
	}
	for _, s := range []string{"UFFDIO_WRITEPROTECT", fmt.Sprintf("%#x", base), fmt.Sprintf("%#x", base+2*size), "ENOENT"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %q", err, s)
		}
	}
	t.Log(err)

	// A misaligned registration.
	err = f.Register(base+1, size)
	if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), fmt.Sprintf("%#x", base+1)) {
		t.Errorf("Register of a misaligned range = %v, want EINVAL naming %#x", err, base+1)
	}

	// A feature the kernel does not offer.
	if _, err := Open(1 << 40); !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "UFFD_FEATURE_bit40") {
		t.Errorf("Open with feature bit 40 = %v, want ErrNotSupported naming it", err)
	}

	// Every call after Close.
	g, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	g.Close()
	for name, err := range map[string]error{
		"Register":     g.Register(base, size),
		"WriteProtect": g.WriteProtect(base, size),
		"Unprotect":    g.Unprotect(base, size, true),
		"Wake":         g.Wake(base, size),
		"Unregister":   g.Unregister(base, size),
		"Wait":         g.Wait(),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
	if _, err := g.ReadFaults(make([]Fault, 1)); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadFaults after Close = %v, want ErrClosed", err)
	}
}

// TestUnregisterDropsProtection: after Unregister a protected page is
// writable without a fault.
func TestUnregisterDropsProtection(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	mem := memfdMem(t, 2)
	fillPages(mem)
	f := openFD(t)
	base, size := Addr(mem), uint64(len(mem))
	if err := f.Register(base, size); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(base, size); err != nil {
		t.Fatal(err)
	}
	if err := f.Unregister(base, size); err != nil {
		t.Fatal(err)
	}
	await(t, writeFrom(mem, []int{0, 1}, 0, 9, -1), "the writer")
	var buf [4]Fault
	if n, err := f.ReadFaults(buf[:]); n != 0 || err != nil {
		t.Errorf("ReadFaults = %d, %v after writes to an unregistered range, want none", n, err)
	}
}

// TestOtherMappingNotProtected pins a rule in doc.go: protection is a
// property of the registered mapping's page tables, not of the memory.
// Writes through a second mapping of the same memfd, or through the memfd
// itself (pwrite(2)), do not fault, and change what the protected mapping
// reads.
func TestOtherMappingNotProtected(t *testing.T) {
	privileged.Require(t, privileged.Root)
	checkLeaks(t)
	fd, err := unix.MemfdCreate("uffd-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	size := 2 * pageSize
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	mapShared := func() []byte {
		m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(m) })
		return m
	}
	mem, other := mapShared(), mapShared()
	fillPages(mem)
	f := openFD(t)
	if err := f.Register(Addr(mem), uint64(size)); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteProtect(Addr(mem), uint64(size)); err != nil {
		t.Fatal(err)
	}
	c := newCopier(f, mem)
	h, err := f.StartHandler(c.resolve)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Stop() })
	await(t, writeFrom(other, []int{0}, 0, 0xC1, -1), "the writer through the other mapping")
	if _, err := unix.Pwrite(fd, []byte{0xC2}, int64(pageSize)); err != nil {
		t.Fatal(err)
	}
	if err := h.Stop(); err != nil {
		t.Fatalf("handler: %v", err)
	}
	if got := c.faultedPages(t); len(got) != 0 {
		t.Errorf("pages that faulted: %v, want none", got)
	}
	if mem[0] != 0xC1 || mem[pageSize] != 0xC2 {
		t.Errorf("the protected mapping reads %#x, %#x; want the other writes 0xc1, 0xc2", mem[0], mem[pageSize])
	}
}
