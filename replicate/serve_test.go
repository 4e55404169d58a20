package replicate_test

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

// Serve bounds the connections in their handshake: past MaxHandshakes a
// connection is told why and closed; a silent one is cut off at the end of
// HandshakeTimeout however it trickles; and a real primary is served once a
// slot is free. ServeStats counts each.
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
	served := make(chan error, 1)
	go func() { _, err := bk.Serve(ctx, ln); served <- err }()
	defer func() { cancel(); <-served }()

	dial := func() net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// Two that trickle a byte every 100 ms take both slots.
	slow := []net.Conn{dial(), dial()}
	stop := make(chan struct{})
	for _, c := range slow {
		go func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
				if _, err := c.Write([]byte{'R'}); err != nil {
					return
				}
			}
		}()
	}
	defer close(stop)
	for bk.ServeStats().Accepted < 2 {
		time.Sleep(time.Millisecond)
	}
	// A third is refused, and told why.
	c := dial()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	msg, _ := io.ReadAll(c)
	if !strings.Contains(string(msg), "connections are in their handshake at this backup") {
		t.Fatalf("third connection read %q, want a reject naming the limit", msg)
	}
	// The trickling ones are closed by the backup at their handshake's
	// whole deadline (500 ms), though bytes keep coming: the reads end in
	// EOF, not in this side's 10 s deadline.
	for i, c := range slow {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		msg, err := io.ReadAll(c)
		if err != nil || !strings.Contains(string(msg), "no complete hello within the handshake's 500ms") {
			t.Fatalf("trickling connection %d: read %q, %v; want the backup's reject and its close", i, msg, err)
		}
	}
	// Each is counted once its reject has lingered (at most a second).
	for deadline := time.Now().Add(5 * time.Second); bk.ServeStats().Failed < 2 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	st := bk.ServeStats()
	if st.RefusedFull != 1 || st.Failed != 2 || st.Sessions != 0 {
		t.Fatalf("stats %+v, want 1 refused for the limit and 2 failed handshakes", st)
	}
	select {
	case err := <-served:
		t.Fatalf("Serve returned: %v", err)
	default:
	}
}
