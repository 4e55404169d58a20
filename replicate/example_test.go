package replicate_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/repagent/repagent/dirtylog"
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

	stop, done chan struct{}
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
			v.run.Unlock()
			time.Sleep(50 * time.Microsecond)
		}
	}()
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

// A VMM of one's own replicated: the toy VM above implements the VM contract
// without KVM. The primary syncs it to a backup over TCP and checkpoints it
// every 10 ms; when the link dies the backup resumes the last checkpoint,
// whose memory matches its saved state exactly.
func Example() {
	vm := newToyVM(1 << 20)
	vm.start()
	defer vm.close()

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
