package agent

import (
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/fence"
	"github.com/repagent/repagent/replicate/protect"
)

// Fencing is what the etcd flags ask for: the VM's ownership as a lease in
// etcd (replicate/fence, through protect.Fence).
type Fencing struct {
	Endpoints []string
	Name      string        // the VM's name: its owner key is /repagent/vm/NAME/owner
	TTL       time.Duration // the lease's TTL (0: fence.DefaultTTL)
	TLS       *tls.Config   // TLS to etcd; nil: plaintext
	RunOnLoss bool          // --on-etcd-loss run (primary)
}

// ExitFenced is the exit code of a primary, or of a backup running the VM
// it resumed, that fenced its VM: it lost its lease in etcd, paused the VM
// and released no more output.
const ExitFenced = 4

// fencer is an agent's etcd client and protect.Fence.
type fencer struct {
	client *clientv3.Client
	fence  protect.Fence
}

// newFencer connects to etcd (the client connects lazily: an unreachable
// etcd shows in the first request, bounded by the lease's TTL).
func newFencer(f *Fencing, log *slog.Logger) (*fencer, error) {
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   f.Endpoints,
		DialTimeout: 5 * time.Second,
		TLS:         f.TLS,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", f.Endpoints, err)
	}
	host, _ := os.Hostname()
	return &fencer{client: c, fence: protect.Fence{
		Config: fence.Config{
			Client: c,
			Name:   f.Name,
			ID:     host + ":" + strconv.Itoa(os.Getpid()),
			TTL:    f.TTL,
			Log:    log,
		},
		RunOnLoss: f.RunOnLoss,
	}}, nil
}

func (f *fencer) close() error {
	if f == nil {
		return nil
	}
	return f.client.Close()
}

// printOwner prints the line that says this agent owns the VM:
//
//	owner: vm=NAME id=ID revision=R at=UNIXNANO
func (f *fencer) printOwner(w io.Writer, o protect.Ownership) {
	fmt.Fprintf(w, "owner: vm=%s id=%s revision=%d at=%d\n", f.fence.Name, f.fence.ID, o.Revision(), time.Now().UnixNano())
}

// printFenced prints the line that says this agent fenced its VM:
//
//	fenced: vm=NAME last-released-epoch=N last-release=UNIXNANO at=UNIXNANO cause=CAUSE
//
// last-release is 0 when nothing was released under the lease (or not
// known: a resumed VM releases its output unheld, up to at).
func (f *fencer) printFenced(w io.Writer, fe *replicate.FencedError) {
	var last int64
	if !fe.LastRelease.IsZero() {
		last = fe.LastRelease.UnixNano()
	}
	fmt.Fprintf(w, "fenced: vm=%s last-released-epoch=%d last-release=%d at=%d cause=%q\n",
		f.fence.Name, fe.LastCommitted, last, fe.At.UnixNano(), fe.Cause.Error())
}
