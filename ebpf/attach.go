package ebpf

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// epochSlots is EPOCH_SLOTS in bpf/hold.c: the per-epoch drop counters
// are kept for this many epochs, which is also the most epochs a gate keeps
// open at once.
const epochSlots = 1024

// Gate modes (MODE_* in bpf/hold.c).
const (
	modePass = 0
	modeHold = 1
)

// attachment is the kernel side of a gate on one tap: the loaded programs
// and maps, the two TCX links, the control block and the packet sockets
// whose frames the egress program turns around. Gate and Announce use it.
type attachment struct {
	ifname string

	objs    holdObjects
	loaded  bool
	links   []link.Link
	ctlMem  []byte
	ctl     *holdGateCtl
	dropMem []byte
	drops   []holdEpochDrops

	// releaseFD sends released frames, injectFD injected ones; -1 if not
	// opened.
	releaseFD, injectFD int
}

// attach loads the programs, opens the sockets and attaches to the tap
// called ifname in the calling thread's network namespace. The ring has
// ringSize bytes. The gate starts in pass mode.
func attach(ifname string, ringSize int, withRelease bool) (_ *attachment, err error) {
	if ifname == "" || len(ifname) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("interface name %q: want 1 to %d bytes", ifname, unix.IFNAMSIZ-1)
	}
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("find tap %s in this network namespace: %w", ifname, err)
	}
	a := &attachment{ifname: ifname, releaseFD: -1, injectFD: -1}
	defer func() {
		if err != nil {
			a.close()
		}
	}()

	var injectCookie, releaseCookie uint64
	if a.injectFD, injectCookie, err = packetSocket(ifi.Index); err != nil {
		return nil, err
	}
	if err := checkTap(a.injectFD, ifname); err != nil {
		return nil, err
	}
	if withRelease {
		if a.releaseFD, releaseCookie, err = packetSocket(ifi.Index); err != nil {
			return nil, err
		}
	}

	spec, err := loadHold()
	if err != nil {
		return nil, fmt.Errorf("load BPF spec: %w", err)
	}
	spec.Maps[holdMapRing].MaxEntries = uint32(ringSize)
	if err := spec.LoadAndAssign(&a.objs, nil); err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return nil, fmt.Errorf("%w: load BPF programs: %w", ErrNotSupported, err)
		}
		return nil, fmt.Errorf("load BPF programs: %w", err)
	}
	a.loaded = true
	if a.ctlMem, err = mmapArray(a.objs.Ctl); err != nil {
		return nil, err
	}
	a.ctl = controlBlock(a.ctlMem)
	if a.dropMem, err = mmapArray(a.objs.Drops); err != nil {
		return nil, err
	}
	a.drops = dropSlots(a.dropMem)

	magic, err := newMagic()
	if err != nil {
		return nil, err
	}
	atomic.StoreUint64(&a.ctl.ReleaseCookie, releaseCookie)
	atomic.StoreUint64(&a.ctl.InjectCookie, injectCookie)
	atomic.StoreUint64(&a.ctl.Magic, uint64(magic))

	// Egress first: by the time ingress can hold anything, the way back
	// exists. Both at the head, so no other program sees a held frame, or a
	// released one before its mark is cleared.
	for _, p := range []struct {
		prog *ebpf.Program
		at   ebpf.AttachType
		name string
	}{{a.objs.Release, ebpf.AttachTCXEgress, "egress"}, {a.objs.Hold, ebpf.AttachTCXIngress, "ingress"}} {
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifi.Index, Program: p.prog, Attach: p.at, Anchor: link.Head()})
		if err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return nil, fmt.Errorf("%w: attach to %s %s: TCX needs Linux 6.6 or later: %w", ErrNotSupported, ifname, p.name, err)
			}
			return nil, fmt.Errorf("attach to %s %s: %w", ifname, p.name, err)
		}
		a.links = append(a.links, l)
	}
	return a, nil
}

// newMagic returns a random nonzero mark with its low bit clear: released
// frames carry magic, injected ones magic|1.
func newMagic() (uint32, error) {
	var b [4]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, fmt.Errorf("make release mark: %w", err)
		}
		if m := binary.LittleEndian.Uint32(b[:]) &^ 1; m != 0 {
			return m, nil
		}
	}
}

// close detaches the links (ingress first: nothing is held after that),
// unmaps the control block, frees the maps and closes the sockets.
func (a *attachment) close() error {
	var errs []error
	for i := len(a.links) - 1; i >= 0; i-- {
		if err := a.links[i].Close(); err != nil {
			errs = append(errs, fmt.Errorf("detach from %s: %w", a.ifname, err))
		}
	}
	a.links = nil
	a.ctl, a.drops = nil, nil
	for _, m := range []*[]byte{&a.ctlMem, &a.dropMem} {
		if *m != nil {
			if err := unix.Munmap(*m); err != nil {
				errs = append(errs, fmt.Errorf("unmap control block: %w", err))
			}
			*m = nil
		}
	}
	if a.loaded {
		if err := a.objs.Close(); err != nil {
			errs = append(errs, fmt.Errorf("free BPF objects: %w", err))
		}
		a.loaded = false
	}
	for _, fd := range []*int{&a.releaseFD, &a.injectFD} {
		if *fd >= 0 {
			unix.Close(*fd)
			*fd = -1
		}
	}
	return errors.Join(errs...)
}
