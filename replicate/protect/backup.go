package protect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"

	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/internal/hostsys"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/metrics"
)

// BackupConfig configures a Backup.
type BackupConfig struct {
	// Engine configures the engine's backup. Its Resume and NewSink are set
	// by NewBackup; NewMemory is required.
	Engine replicate.BackupConfig
	// Restore builds the VM of a checkpoint, paused, over the devices the
	// backup opened for it. It owns cp.Memory from the call on (a VMM maps
	// it as guest memory: no copy), also when it fails. Required.
	Restore func(cp *replicate.Checkpoint, dev Devices) (*Restored, error)
	// Tap, when set, is the tap the resumed VM's NIC uses: it is opened at
	// failover, in InNamespace, and the guest's address is announced on it
	// before the VM runs.
	Tap string
	// InNamespace, when set, runs f in the tap's network namespace.
	InNamespace func(f func() error) error
	// Disk, when set, is the backup's disk image: kept equal to the
	// primary's at the checkpoint the replica holds (a primary with a disk
	// needs it, one without is refused). The caller owns it and closes it
	// after Close.
	Disk diskmirror.Disk
	// Replica bounds the memory the disk's pending epochs take.
	Replica diskmirror.ReplicaConfig
	// OnAnnounce, when set, is told of the announcement of the resumed
	// guest on the tap (err is nil if it went out).
	OnAnnounce func(tap string, mac net.HardwareAddr, ip netip.Addr, err error)
	// Metrics, when set, is fed every checkpoint applied and the failover.
	Metrics *metrics.BackupCollector
	// Fence, when set, resumes the VM only once this backup owns it in etcd
	// and the standby record names the session whose replica it holds
	// (fence.Claim): a failover waits while the primary holds its lease.
	// The resumed VM's embedder pauses it when Ownership().Lost() closes.
	// RunOnLoss is ignored here: the resumed VM fences on any loss.
	Fence *Fence
	// Reprotect, when set, prepares the resumed VM to be protected in turn
	// (a chain of failovers: A, then B, then C): at failover the Backup
	// puts an output gate on the tap and a diskmirror.Mirror on the disk
	// (Devices.Disk is then the Mirror: build the VM's block device over
	// it), before the VM starts. Backup.Primary is then a Primary over
	// them, holding the VM's lease with Fence: Protect the resumed VM with
	// it and Run it to the next backup, as on a first primary. Its Tap,
	// InNamespace, Disk and Fence are the Backup's; the rest is as given.
	Reprotect *Config
}

// Devices are what the backup opened for the VM it resumes.
type Devices struct {
	Tap  *os.File        // the tap, nil without BackupConfig.Tap; the Backup owns it
	Disk diskmirror.Disk // the image at the checkpoint's epoch, nil without one
}

// Restored is a VM Restore built, not yet running.
type Restored struct {
	// MAC and IP are the guest NIC's: announced on the tap before Start, so
	// that switches and neighbours learn where the VM is now before it
	// speaks. A nil MAC announces nothing.
	MAC net.HardwareAddr
	IP  netip.Addr
	// Start runs the VM.
	Start func() error
}

// Backup waits for a primary and, when it is lost, resumes its VM from the
// last checkpoint: the tap reopened, the disk at the checkpoint's epoch,
// the guest announced, then started.
type Backup struct {
	cfg   BackupConfig
	eng   *replicate.Backup
	tap   *os.File
	owner *lease   // with Fence, once a failover claimed the VM
	prim  *Primary // with Reprotect, once a failover resumed the VM
}

// NewBackup makes the engine's backup with protect's Resume.
func NewBackup(cfg BackupConfig) (*Backup, error) {
	if cfg.Restore == nil {
		return nil, errors.New("protect: BackupConfig.Restore is required")
	}
	b := &Backup{cfg: cfg}
	ec := cfg.Engine
	ec.Resume = b.resume
	ec.NewSink = nil
	ec.Claim = nil
	if cfg.Fence != nil {
		ec.Claim = b.claim
	}
	if m, on := cfg.Metrics, ec.OnEpoch; m != nil {
		ec.OnEpoch = func(epoch uint64, pages int, digest uint64) {
			m.ObserveCheckpoint(epoch, pages, digest)
			if on != nil {
				on(epoch, pages, digest)
			}
		}
	}
	if cfg.Disk != nil {
		ec.NewSink = diskmirror.NewSink(cfg.Disk, cfg.Replica)
	}
	eng, err := replicate.NewBackup(ec)
	if err != nil {
		return nil, err
	}
	b.eng = eng
	cfg.Metrics.WatchServe(eng.ServeStats)
	return b, nil
}

// Ownership is the resumed VM's lease, with Fence once a failover claimed
// the VM; nil otherwise.
func (b *Backup) Ownership() Ownership {
	switch {
	case b.owner != nil:
		return b.owner
	case b.prim != nil && b.prim.lease != nil:
		return b.prim.lease
	}
	return nil
}

// Primary is, with BackupConfig.Reprotect once a failover resumed the VM,
// the Primary that protects it in turn: its tap, gate and disk mirror are
// those the resumed VM uses, and it holds the VM's lease (with Fence).
// Close it after the resumed VM stopped, before Backup.Close. Nil
// otherwise.
func (b *Backup) Primary() *Primary { return b.prim }

// Engine is the engine's backup (Serve, Handle, Close, Replica).
func (b *Backup) Engine() *replicate.Backup { return b.eng }

// Serve accepts primaries on ln, one session at a time, until one fails
// over (its VM then runs here) or ctx ends (replicate.Backup.Serve).
func (b *Backup) Serve(ctx context.Context, ln net.Listener) (*replicate.Failover, error) {
	fo, err := b.eng.Serve(ctx, ln)
	b.cfg.Metrics.ObserveFailover(fo)
	return fo, err
}

// Handle runs one session on conn (replicate.Backup.Handle).
func (b *Backup) Handle(ctx context.Context, conn net.Conn) (*replicate.Failover, error) {
	fo, err := b.eng.Handle(ctx, conn)
	b.cfg.Metrics.ObserveFailover(fo)
	return fo, err
}

// resume is the engine's Resume: tap, Restore, announce, Start. With
// Reprotect the gate and the mirror go on the tap and the disk first.
func (b *Backup) resume(cp *replicate.Checkpoint) error {
	dev := Devices{Disk: b.cfg.Disk}
	if b.cfg.Tap != "" {
		err := inNamespace(b.cfg.InNamespace, func() error {
			var err error
			b.tap, err = hostsys.OpenTap(b.cfg.Tap)
			return err
		})
		if err != nil {
			cp.Memory.Close()
			return fmt.Errorf("the resumed VM's network: %w", err)
		}
		dev.Tap = b.tap
	}
	if b.cfg.Reprotect != nil {
		p, err := b.reprotect()
		if err != nil {
			cp.Memory.Close()
			return fmt.Errorf("prepare to protect the resumed VM: %w", err)
		}
		b.prim = p
		if p.mirror != nil {
			dev.Disk = p.mirror
		}
	}
	r, err := b.cfg.Restore(cp, dev)
	if err != nil {
		return err
	}
	if r == nil || r.Start == nil {
		return errors.New("protect: Restore returned no VM to start")
	}
	if dev.Tap != nil && r.MAC != nil {
		err := announce(dev.Tap, r.MAC, r.IP)
		if b.cfg.OnAnnounce != nil {
			b.cfg.OnAnnounce(b.cfg.Tap, r.MAC, r.IP, err)
		} else if err != nil {
			b.log("announce the resumed guest", "tap", b.cfg.Tap, "err", err)
		}
	}
	return r.Start()
}

// reprotect makes the Primary of the resumed VM: the gate on the Backup's
// tap (which it then owns), the mirror on its disk, the claimed lease.
func (b *Backup) reprotect() (*Primary, error) {
	cfg := *b.cfg.Reprotect
	cfg.Tap, cfg.InNamespace, cfg.Disk, cfg.Fence = b.cfg.Tap, b.cfg.InNamespace, b.cfg.Disk, b.cfg.Fence
	p := &Primary{cfg: cfg}
	if b.tap != nil {
		p.tap = b.tap
		if err := inNamespace(cfg.InNamespace, p.openGate); err != nil {
			p.tap = nil
			return nil, err
		}
		b.tap = nil // the Primary's now
	}
	if cfg.Disk != nil {
		m, err := diskmirror.NewMirror(cfg.Disk, cfg.Mirror)
		if err != nil {
			b.tap, p.tap = p.tap, nil
			p.Close()
			return nil, fmt.Errorf("disk mirror: %w", err)
		}
		p.mirror = m
	}
	if b.owner != nil {
		p.lease, b.owner = b.owner, nil // the Primary releases it at Close
	}
	return p, nil
}

// announce writes a gratuitous ARP for the guest on its tap, as its NIC
// would send it: the frame enters the host at the tap, before the VM's
// first. One write, where ebpf.Announce loads and attaches a TC program to
// inject it, which costs tens of milliseconds, all of them downtime. A gate the Backup put on the tap (Reprotect) passes frames
// until its first epoch opens, after Start.
func announce(tap *os.File, mac net.HardwareAddr, ip netip.Addr) error {
	frame, err := ebpf.GratuitousARP(mac, ip)
	if err != nil {
		return err
	}
	if _, err := tap.Write(frame); err != nil {
		return fmt.Errorf("write a gratuitous ARP on the tap: %w", err)
	}
	return nil
}

func (b *Backup) log(msg string, args ...any) {
	l := b.cfg.Engine.Log
	if l == nil {
		l = slog.Default()
	}
	l.Error(msg, args...)
}

// Close closes the engine's backup and the tap. Call it after the resumed
// VM stopped: it uses the tap until then.
func (b *Backup) Close() error {
	err := b.eng.Close()
	if b.owner != nil {
		ctx, cancel := context.WithTimeout(context.Background(), fenceDialTimeout)
		err = errors.Join(err, b.owner.release(ctx))
		cancel()
		b.owner = nil
	}
	if b.tap != nil {
		err = errors.Join(err, b.tap.Close())
		b.tap = nil
	}
	return err
}
