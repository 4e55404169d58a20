package agent

import (
	"crypto/tls"
	"fmt"
	"os"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// Repl is what the replication flags ask for.
type Repl struct {
	Interval         time.Duration
	Mech             dirtylog.Mechanism
	HeartbeatTimeout time.Duration
	Workers          int
	Compress         replicate.Compression
	CopyThreads      int
	Capture          replicate.Capture
	CaptureCalib     time.Duration
	TLS              *tls.Config // the client side of the link's TLS; nil: plaintext
	SyncThreshold    int
	SyncPause        time.Duration
	NoThrottle       bool
	Staging          uint64
	AuditEvery       uint64
	Stats            string
	Duration         time.Duration
	Quiet            bool
	HoldLimit        uint64
	Pcap             string
	Tap              string // the guest's tap (--tap), from the guest flags
	Disk             string // the guest's disk image (--disk, or the job's own), mirrored to the backup
	Metrics          string // where to serve Prometheus metrics (--metrics); "": nowhere
}

// Job is what the main job was asked to do.
type Job struct {
	Guest      testvm.Config
	Repl       Repl
	Net        bool // build the job's own network and client
	ClientRate int  // the client's echo requests per second
	Disk       bool // make the job's own disk images and mirror the disk
	TLS        bool // TLS on the loopback link, with a lab PKI made in memory
}

// PrimaryJob is what the primary command was asked to do.
type PrimaryJob struct {
	Guest          testvm.Config
	Repl           Repl
	Backup         string
	ConnectTimeout time.Duration
	Fault          *Fault
	Fencing        *Fencing // with --etcd
	// Migrate, for the migrate command: hand the VM over to the backup
	// once an epoch is acknowledged SwitchoverAfter after the first
	// (replicate.Primary.Handover).
	Migrate         bool
	SwitchoverAfter time.Duration
}

// Fault is a parsed REPAGENT_FAULT: die, or kill killPID, at point in epoch
// (or round) n.
type Fault struct {
	Point   string
	N       uint64
	KillPID int
}

// BackupJob is what the backup command was asked to do.
type BackupJob struct {
	Listen           string
	ExpectMem        uint64
	ExpectVCPUs      int
	HeartbeatTimeout time.Duration
	RunAfter         time.Duration
	SkipVerify       bool
	VerifyReplica    bool
	Quiet            bool
	Tap              string
	Disk             string
	Metrics          string
	Fault            *Fault
	// TLS is the server side of the link's TLS (nil: plaintext); Once
	// ends the backup after its first session (replicate.BackupConfig).
	TLS  *tls.Config
	Once bool
	// Fencing, with --etcd, resumes the VM only once this backup owns it.
	Fencing *Fencing
	// ReprotectTo, when set, is the next backup: the resumed VM is
	// protected to it at ReprotectInterval, over ReprotectTLS (the client
	// side of the link's TLS; nil: plaintext).
	ReprotectTo       string
	ReprotectInterval time.Duration
	ReprotectTLS      *tls.Config
}

// VMJob is what the vm command was asked to do.
type VMJob struct {
	Guest    testvm.Config
	Duration time.Duration
	Save     string
	Restore  string
	Quiet    bool
	Tap      string          // --tap: the network device's tap
	TapFile  *os.File        // opened by machine, closed after the machine
	Disk     string          // --disk: the block device's image
	DiskFile *os.File        // opened by machine, closed after the machine
	Changed  map[string]bool // config flags given on the command line
}

// UsageError is a problem with what the user asked for (exit code 2).
type UsageError struct{ error }

func (e UsageError) Unwrap() error { return e.error }

func Usagef(format string, args ...any) error {
	return UsageError{fmt.Errorf(format, args...)}
}
