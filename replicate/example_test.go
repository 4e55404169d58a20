package replicate_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/replicate"
)

// toyVM is a VMM of its own, with no KVM at all, to show what the VM contract
// asks: memory regions, pause and resume, a machine state, and the pages it
// wrote. Its one "vCPU" is a goroutine that counts, and writes count c into
// page c mod pages of memory, so the whole of memory follows from the count:
// a replica is right exactly when its memory is what its saved count implies.
type toyVM struct {
	mem   []byte
	pages uint64
	run   sync.Mutex // held by a step of the vCPU, and by Pause until Resume
	count uint64     // the vCPU's one register

	dmu      sync.Mutex
	dirty    *dirtylog.Set
	tracking bool

	// disk, when set, is the toy's disk: after each step of 64 counts it
	// writes one block (see toyBlock), through the Mirror, as a VMM's block
	// device would. diskErr is the first write that failed.
	disk    *diskmirror.Mirror
	diskErr error

	stop, done chan struct{}
}

// toyBlockSize is the toy disk's block; step s (after count 64s) writes block
// s mod blocks, filled with s.
const toyBlockSize = 4096

// toyBlock fills b with step s.
func toyBlock(b []byte, s uint64) {
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], s)
	}
}

// toyGPA is where each half of toy memory lies, as two regions (like a PC's
// memory below and above the 4 GiB hole).
var toyGPA = [2]uint64{0, 1 << 32}

func newToyVM(size uint64) *toyVM {
	v := &toyVM{mem: make([]byte, size), pages: size / replicate.PageSize, stop: make(chan struct{}), done: make(chan struct{})}
	v.dirty = dirtylog.NewSet(v.DirtySlots())
	return v
}

func (v *toyVM) gpa(page uint64) uint64 {
	half := v.pages / 2
	return toyGPA[page/half] + page%half*replicate.PageSize
}

// start runs the vCPU.
func (v *toyVM) start() {
	go func() {
		defer close(v.done)
		for {
			select {
			case <-v.stop:
				return
			default:
			}
			v.run.Lock()
			for range 64 {
				v.count++
				page := v.count % v.pages
				binary.LittleEndian.PutUint64(v.mem[page*replicate.PageSize:], v.count)
				v.dmu.Lock()
				if v.tracking {
					v.dirty.Add(v.gpa(page))
				}
				v.dmu.Unlock()
			}
			v.writeBlock()
			v.run.Unlock()
			time.Sleep(50 * time.Microsecond)
		}
	}()
}

// writeBlock writes the block of the step just done: a checkpoint after step
// s has written the blocks of steps 1 to s.
func (v *toyVM) writeBlock() {
	s := v.count / 64
	if v.disk == nil || s == 0 || v.diskErr != nil {
		return
	}
	b := make([]byte, toyBlockSize)
	toyBlock(b, s)
	blocks := uint64(v.disk.Size() / toyBlockSize)
	if _, err := v.disk.WriteAt(b, int64(s%blocks*toyBlockSize)); err != nil {
		v.diskErr = err
	}
}

func (v *toyVM) close() { close(v.stop); <-v.done }

// The VM contract.

func (v *toyVM) DirtySlots() []dirtylog.Slot {
	half := uint64(len(v.mem)) / 2
	return []dirtylog.Slot{
		{ID: 0, GPA: toyGPA[0], Size: half, Host: v.mem[:half]},
		{ID: 1, GPA: toyGPA[1], Size: half, Host: v.mem[half:]},
	}
}
func (v *toyVM) DirtySource(dirtylog.Mechanism) (dirtylog.Source, error) { return toySource{v}, nil }
func (v *toyVM) NumVCPUs() int                                           { return 1 }
func (v *toyVM) Pause() error                                            { v.run.Lock(); return nil }
func (v *toyVM) Resume() error                                           { v.run.Unlock(); return nil }
func (v *toyVM) Save() ([]byte, error)                                   { return binary.LittleEndian.AppendUint64(nil, v.count), nil }

// toySource is the toy's dirty tracking: the pages its vCPU wrote.
type toySource struct{ v *toyVM }

func (s toySource) Start() error { s.set(true); return nil }
func (s toySource) Stop() error  { s.set(false); return nil }
func (s toySource) set(on bool) {
	s.v.dmu.Lock()
	s.v.tracking = on
	s.v.dmu.Unlock()
}
func (s toySource) Mechanism() dirtylog.Mechanism { return dirtylog.Auto }
func (s toySource) Harvest(into *dirtylog.Set) (dirtylog.Stats, error) {
	s.v.dmu.Lock()
	defer s.v.dmu.Unlock()
	n := s.v.dirty.Count()
	if err := into.Union(s.v.dirty); err != nil {
		return dirtylog.Stats{}, err
	}
	s.v.dirty.Clear()
	return dirtylog.Stats{KVMPages: n, Pages: n}, nil
}

// checkToyReplica checks a resumed toy: its memory must be exactly what its
// saved count implies.
func checkToyReplica(cp *replicate.Checkpoint) error {
	count := binary.LittleEndian.Uint64(cp.State)
	pages := cp.Shape.Pages()
	page := make([]byte, replicate.PageSize)
	for i := range pages {
		if _, err := cp.Memory.ReadAt(page, int64(i*replicate.PageSize)); err != nil {
			return err
		}
		var want uint64 // the last c <= count with c mod pages == i
		if count >= i && (i != 0 || count >= pages) {
			want = count - (count-i)%pages
		}
		if got := binary.LittleEndian.Uint64(page); got != want {
			return fmt.Errorf("page %d holds %d, count %d implies %d", i, got, count, want)
		}
	}
	return nil
}

// checkToyDisk checks a toy's disk image against its count: block i
// must hold the last step s <= count/64 with s mod blocks == i, or zeros.
func checkToyDisk(count uint64, img io.ReaderAt, size int64) error {
	steps := count / 64
	blocks := uint64(size / toyBlockSize)
	got, want := make([]byte, toyBlockSize), make([]byte, toyBlockSize)
	for i := range blocks {
		if _, err := img.ReadAt(got, int64(i*toyBlockSize)); err != nil {
			return err
		}
		var s uint64 // the last step s <= steps with s mod blocks == i, s >= 1
		if steps >= i && (i != 0 || steps >= blocks) {
			s = steps - (steps-i)%blocks
		}
		toyBlock(want, s)
		if !bytes.Equal(got, want) {
			return fmt.Errorf("disk block %d holds step %d, count %d implies step %d",
				i, binary.LittleEndian.Uint64(got), count, s)
		}
	}
	return nil
}

// A VMM of one's own replicated: the toy VM above implements the VM contract
// without KVM. The primary syncs it to a backup over TCP and checkpoints it
// every 10 ms; when the link dies the backup resumes the last checkpoint,
// whose memory matches its saved state exactly.
func Example() {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()

	// The wiring of the pair, in full, as a program does it. A test can
	// have it made, and torn down, by replicatetest.NewPair.
	quiet := slog.New(slog.DiscardHandler)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	backup, err := replicate.NewBackup(replicate.BackupConfig{
		NewMemory: func(size uint64) (*os.File, error) {
			f, err := os.CreateTemp("", "replica")
			if err == nil {
				os.Remove(f.Name())
				err = f.Truncate(int64(size))
			}
			return f, err
		},
		Resume: func(cp *replicate.Checkpoint) error {
			defer cp.Memory.Close()
			if err := checkToyReplica(cp); err != nil {
				return err
			}
			fmt.Println("backup resumed a checkpoint whose memory matches its state")
			return nil
		},
		Log: quiet,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	failover := make(chan error, 1)
	go func() {
		_, err := backup.Serve(context.Background(), ln)
		failover <- err
	}()

	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		fmt.Println(err)
		return
	}
	primary, err := replicate.NewPrimary(replicate.Config{VM: vm, Interval: 10 * time.Millisecond, Log: quiet})
	if err != nil {
		fmt.Println(err)
		return
	}
	done := make(chan error, 1)
	go func() { done <- primary.Run(context.Background(), conn) }()
	for primary.LastAcked() < 10 {
		time.Sleep(time.Millisecond)
	}
	conn.Close() // the primary's host dies
	perr, ferr := <-done, <-failover
	fmt.Println("primary lost its backup:", errors.Is(perr, replicate.ErrBackupLost))
	fmt.Println("failover error:", ferr)
	// Output:
	// backup resumed a checkpoint whose memory matches its state
	// primary lost its backup: true
	// failover error: <nil>
}

// A VMM's disk replicated with its memory: the VMM writes its disk through a
// diskmirror.Mirror (here the toy writes a block per step of its count), the
// primary ships each epoch's writes inside the epoch, and at failover the
// backup's image is exactly the disk of the checkpoint it resumes.
func Example_disk() {
	dir, err := os.MkdirTemp("", "example-disk")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	image := func(name string) *os.File {
		f, err := os.Create(dir + "/" + name)
		if err == nil {
			err = f.Truncate(1 << 20)
		}
		if err != nil {
			panic(err)
		}
		return f
	}
	local, remote := image("primary.img"), image("backup.img")
	defer local.Close()
	defer remote.Close()
	mirror, err := diskmirror.NewMirror(local, diskmirror.Config{})
	if err != nil {
		fmt.Println(err)
		return
	}
	vm := newToyVM(1 << 20)
	vm.disk = mirror // the VMM's disk writes go through the mirror
	vm.start()
	defer vm.close()

	quiet := slog.New(slog.DiscardHandler)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	backup, err := replicate.NewBackup(replicate.BackupConfig{
		NewMemory: tempMemory,                                             // as in Example
		NewSink:   diskmirror.NewSink(remote, diskmirror.ReplicaConfig{}), // the backup's image, of the primary's size
		Resume: func(cp *replicate.Checkpoint) error {
			defer cp.Memory.Close()
			count := binary.LittleEndian.Uint64(cp.State)
			if err := checkToyDisk(count, remote, 1<<20); err != nil {
				return err
			}
			fmt.Println("backup resumed a checkpoint whose disk matches its state")
			return nil
		},
		Log: quiet,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	failover := make(chan error, 1)
	go func() {
		_, err := backup.Serve(context.Background(), ln)
		failover <- err
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		fmt.Println(err)
		return
	}
	stream, err := diskmirror.NewSource(mirror, diskmirror.SourceConfig{})
	if err != nil {
		fmt.Println(err)
		return
	}
	primary, err := replicate.NewPrimary(replicate.Config{VM: vm, Interval: 10 * time.Millisecond, Stream: stream, Log: quiet})
	if err != nil {
		fmt.Println(err)
		return
	}
	done := make(chan error, 1)
	go func() { done <- primary.Run(context.Background(), conn) }()
	for primary.LastAcked() < 10 {
		time.Sleep(time.Millisecond)
	}
	conn.Close() // the primary's host dies
	<-done
	fmt.Println("failover error:", <-failover)
	// Output:
	// backup resumed a checkpoint whose disk matches its state
	// failover error: <nil>
}
