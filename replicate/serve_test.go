package replicate_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

// Serve bounds the connections in their handshake, and stalling ones
// cannot keep a real primary out: past MaxHandshakes a new connection
// evicts the oldest, which is told why; a silent one is cut off at the end
// of HandshakeTimeout, and told why; a real primary arriving while two
// stall is served. ServeStats counts each.
func TestServeBoundsHandshakes(t *testing.T) {
	bk, err := replicate.NewBackup(replicate.BackupConfig{NewMemory: testvm.NewMemFile,
		Resume:           func(cp *replicate.Checkpoint) error { return cp.Memory.Close() },
		HandshakeTimeout: 500 * time.Millisecond, MaxHandshakes: 2, Log: replicatetest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer bk.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	type served struct {
		fo  *replicate.Failover
		err error
	}
	done := make(chan served, 1)
	go func() { fo, err := bk.Serve(ctx, ln); done <- served{fo, err} }()
	defer cancel()

	dial := func() net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	waitAccepted := func(n uint64) {
		for bk.ServeStats().Accepted < n {
			time.Sleep(time.Millisecond)
		}
	}
	// One that trickles a byte every 100 ms, then one that says nothing:
	// both slots taken.
	trickler := dial()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := trickler.Write([]byte{'R'}); err != nil {
				return
			}
		}
	}()
	waitAccepted(1)
	silent := dial()
	waitAccepted(2)
	// A real primary evicts the oldest, the trickler, and is served.
	vm := newToyVM(8 << 20)
	vm.start()
	defer vm.close()
	acked := make(chan struct{}, 64)
	p, err := replicate.NewPrimary(replicate.Config{VM: vm, Interval: 20 * time.Millisecond, Log: replicatetest.Logger(t),
		OnEpoch: func(*replicate.EpochStats) { acked <- struct{}{} }})
	if err != nil {
		t.Fatal(err)
	}
	pctx, pcancel := context.WithCancel(context.Background())
	perr := make(chan error, 1)
	go func() { perr <- p.Run(pctx, dial()) }()
	for range 3 {
		select {
		case <-acked:
		case err := <-perr:
			t.Fatalf("the real primary, with two stalling connections at the backup: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("no epoch acknowledged in 30 s")
		}
	}
	for i, tc := range []struct {
		c    net.Conn
		want string
	}{
		{trickler, "evicted: the oldest of the 2 connections in their handshake"},
		{silent, "no complete hello within the handshake's 500ms"},
	} {
		// The backup closes them: the reads end in EOF, not in this side's
		// deadline.
		tc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		msg, err := io.ReadAll(tc.c)
		if err != nil || !strings.Contains(string(msg), tc.want) {
			t.Errorf("stalling connection %d: read %q, %v; want %q and the backup's close", i, msg, err, tc.want)
		}
	}
	// The silent one is counted once its reject has lingered (a second at
	// most; this side has closed it).
	silent.Close()
	for deadline := time.Now().Add(5 * time.Second); bk.ServeStats().Failed < 1 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if st := bk.ServeStats(); st.RefusedFull != 1 || st.Failed != 1 || st.Sessions != 1 {
		t.Errorf("stats %+v, want 1 evicted, 1 failed handshake and 1 session", st)
	}
	pcancel()
	if err := <-perr; err != nil {
		t.Fatalf("primary: %v", err)
	}
	if r := <-done; r.err != nil && !errors.Is(r.err, replicate.ErrPrimaryStopped) {
		t.Fatalf("Serve after the primary stopped: %v", r.err)
	}
}
