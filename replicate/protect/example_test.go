package protect_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/protect"
)

// counter is a toy VMM (no KVM): its vCPU, a goroutine, counts; step n writes
// n into memory page n mod 256, into disk block n mod 64, and sends n to the
// host in a UDP datagram on its tap. It is its own dirty tracker.
type counter struct {
	mem      []byte
	n        uint64     // the vCPU's one register
	run, dmu sync.Mutex // run: held by a step, and from Pause to Resume
	dirty    *dirtylog.Set
	tap      io.Writer
	disk     io.WriterAt
	stopped  atomic.Bool
	done     chan struct{}
	frame    gopacket.SerializeBuffer
	headers  []gopacket.SerializableLayer // Ethernet, IPv4, UDP to the host
}

func newCounter(mem []byte, n uint64, tap io.Writer, disk io.WriterAt) *counter {
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: guestIP.AsSlice(), DstIP: hostIP.AsSlice()}
	udp := &layers.UDP{SrcPort: 9000, DstPort: 9000}
	udp.SetNetworkLayerForChecksum(ip)
	c := &counter{mem: mem, n: n, tap: tap, disk: disk, done: make(chan struct{}),
		frame: gopacket.NewSerializeBuffer(), headers: []gopacket.SerializableLayer{
			&layers.Ethernet{SrcMAC: guestMAC, DstMAC: hostMAC, EthernetType: layers.EthernetTypeIPv4}, ip, udp}}
	c.dirty = dirtylog.NewSet(c.DirtySlots())
	return c
}

func (c *counter) start() {
	go func() {
		defer close(c.done)
		for block := make([]byte, 4096); !c.stopped.Load(); time.Sleep(200 * time.Microsecond) {
			c.run.Lock()
			c.n++
			page := c.n % 256
			binary.LittleEndian.PutUint64(c.mem[page*4096:], c.n)
			c.dmu.Lock()
			c.dirty.Add(page * 4096) // as a VMM reports its own (DMA) writes
			c.dmu.Unlock()
			binary.LittleEndian.PutUint64(block, c.n)
			c.disk.WriteAt(block, int64(c.n%64*4096))
			gopacket.SerializeLayers(c.frame, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
				append(c.headers, gopacket.Payload(block[:8]))...)
			c.tap.Write(c.frame.Bytes())
			c.run.Unlock()
		}
	}()
}

func (c *counter) halt() { c.stopped.Store(true); <-c.done }

// The VM contract (replicate.VM), and its dirty tracking (dirtylog.Source).
func (c *counter) DirtySlots() []dirtylog.Slot {
	return []dirtylog.Slot{{Size: uint64(len(c.mem)), Host: c.mem}}
}
func (c *counter) DirtySource(dirtylog.Mechanism) (dirtylog.Source, error) { return c, nil }
func (c *counter) NumVCPUs() int                                           { return 1 }
func (c *counter) Pause() error                                            { c.run.Lock(); return nil }
func (c *counter) Resume() error                                           { c.run.Unlock(); return nil }
func (c *counter) Save() ([]byte, error)                                   { return binary.LittleEndian.AppendUint64(nil, c.n), nil }
func (c *counter) Start() error                                            { c.dmu.Lock(); c.dirty.Clear(); c.dmu.Unlock(); return nil }
func (c *counter) Stop() error                                             { return nil }
func (c *counter) Mechanism() dirtylog.Mechanism                           { return dirtylog.Manual }
func (c *counter) Harvest(into *dirtylog.Set) (dirtylog.Stats, error) {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	defer c.dirty.Clear()
	return dirtylog.Stats{Pages: c.dirty.Count()}, into.Union(c.dirty)
}

// Example makes the toy fault tolerant: its datagrams leave once the backup
// holds the checkpoint that sent them, its disk follows the checkpoints, and
// when the primary's host dies the backup resumes it from the last one. The
// taps are in namespaces the test made (primaryNet, backupNet; powerOff).
func Example() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	resumed := make(chan *counter, 1)
	backup, err := protect.NewBackup(protect.BackupConfig{
		Engine: replicate.BackupConfig{NewMemory: newMemory, Log: quiet},
		Tap:    "tapb", InNamespace: backupNet, Disk: backupDisk,
		Restore: func(cp *replicate.Checkpoint, dev protect.Devices) (*protect.Restored, error) {
			defer cp.Memory.Close() // the toy copies it; a real VMM maps it
			mem, err := io.ReadAll(io.NewSectionReader(cp.Memory, 0, int64(cp.Shape.MemSize)))
			if err != nil {
				return nil, err
			}
			n := binary.LittleEndian.Uint64(cp.State)
			c := newCounter(mem, n, dev.Tap, dev.Disk)
			fmt.Printf("backup: resumed at count %d, disk consistent: %v\n", n, diskAt(dev.Disk, n) == nil)
			resumed <- c
			return &protect.Restored{MAC: guestMAC, IP: guestIP, Start: func() error { c.start(); return nil }}, nil
		},
	})
	check(err)
	defer backup.Close()
	failover := make(chan error, 1)
	go func() { _, err := backup.Serve(context.Background(), ln); failover <- err }()

	p, err := protect.NewPrimary(protect.Config{Engine: replicate.Config{Interval: 10 * time.Millisecond, Log: quiet},
		Tap: "tapp", InNamespace: primaryNet, Disk: primaryDisk})
	check(err)
	vm := newCounter(make([]byte, 1<<20), 0, p.Tap(), p.Disk()) // the VMM's tap and disk are protect's
	engine, err := p.Protect(vm)
	check(err)
	conn, err := protect.Dial(context.Background(), ln.Addr().String(), 10*time.Second)
	check(err)
	vm.start()
	done := make(chan error, 1)
	go func() { done <- p.RunConn(context.Background(), conn) }()
	for engine.LastAcked() < 30 {
		time.Sleep(time.Millisecond)
	}
	// The primary's host loses power: its network and its link to the
	// backup go dark (what its gate still holds reaches no one).
	powerOff(conn)
	fmt.Println("primary:", errors.Is(<-done, replicate.ErrBackupLost))
	vm.halt()
	p.Close()
	check(<-failover)
	c := <-resumed
	time.Sleep(100 * time.Millisecond) // the resumed toy runs on, on the backup's tap
	c.halt()
}

func check(err error) {
	if err != nil {
		panic(err)
	}
}
