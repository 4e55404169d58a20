package protect_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/nettest"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/replicate/replicatetest"
)

// What Example runs on: the test makes it before it calls Example.
var (
	guestMAC                = net.HardwareAddr{0x02, 0x72, 0x70, 0, 0, 0x02}
	hostMAC                 = net.HardwareAddr{0x02, 0x72, 0x70, 0, 0, 0x01}
	guestIP                 = netip.MustParseAddr("10.77.0.2")
	hostIP                  = netip.MustParseAddr("10.77.0.1")
	primaryNet, backupNet   func(func() error) error
	primaryDisk, backupDisk *os.File
	powerOff                func(link net.Conn)
	quiet                   = slog.New(slog.DiscardHandler)
)

// newMemory is the backup's replica memory: an unlinked temporary file.
var newMemory = replicatetest.TempMemory("")

// listen collects the counts of the toy's datagrams that reach the host in
// ns, until the returned stop is called.
func listen(t *testing.T, ns *nettest.Namespace) (stop func() []uint64) {
	t.Helper()
	var conn *net.UDPConn
	if err := ns.Do(func() (err error) {
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: hostIP.AsSlice(), Port: 9000})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var (
		mu     sync.Mutex
		counts []uint64
		done   = make(chan struct{})
	)
	go func() {
		defer close(done)
		b := make([]byte, 64)
		for {
			n, err := conn.Read(b)
			if err != nil {
				return
			}
			if n == 8 {
				mu.Lock()
				counts = append(counts, binary.LittleEndian.Uint64(b))
				mu.Unlock()
			}
		}
	}()
	return func() []uint64 {
		time.Sleep(20 * time.Millisecond) // what is on its way
		conn.Close()
		<-done
		return counts
	}
}

// host makes a namespace with a tap named tap, the host's side of the toy's
// network (hostMAC, hostIP), and the toy's neighbour entry.
func host(t *testing.T, tap string) *nettest.Namespace {
	ns := nettest.New(t)
	ns.AddTap(t, tap, hostIP.String()+"/24")
	ns.MustIP(t, "link", "set", "dev", tap, "address", hostMAC.String())
	ns.Neigh(t, guestIP, guestMAC.String(), tap)
	return ns
}

func image(t *testing.T) *os.File {
	f, err := os.CreateTemp(t.TempDir(), "disk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(256 << 10); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestExample runs the package example on real taps, eBPF gates and TCP,
// and checks what it shows: no datagram left the primary for a count beyond
// the checkpoint the backup resumed (P1), the backup's disk is that
// checkpoint's (P4), and the resumed toy speaks on the backup's network.
func TestExample(t *testing.T) {
	privileged.Require(t, privileged.Root, privileged.NetAdmin)
	pns, bns := host(t, "tapp"), host(t, "tapb")
	primaryNet, backupNet = pns.Do, bns.Do
	powerOff = func(link net.Conn) {
		pns.MustIP(t, "link", "set", "tapp", "down")
		link.Close()
	}
	primaryDisk, backupDisk = image(t), image(t)
	stopP, stopB := listen(t, pns), listen(t, bns)

	out := captureStdout(t, Example)
	t.Logf("example printed:\n%s", out)
	m := regexp.MustCompile(`backup: resumed at count (\d+), disk consistent: true\n`).FindStringSubmatch(out)
	if m == nil || !bytes.Contains([]byte(out), []byte("primary: true\n")) {
		t.Fatalf("example did not fail over with a consistent disk and a lost backup reported:\n%s", out)
	}
	resumedAt, _ := strconv.ParseUint(m[1], 10, 64)
	before, after := stopP(), stopB()
	if len(before) == 0 {
		t.Fatal("no datagram reached the primary's host: the gate never released")
	}
	for _, n := range before {
		if n > resumedAt {
			t.Fatalf("the primary's host received count %d, beyond the checkpoint resumed (%d): output escaped (P1)", n, resumedAt)
		}
	}
	if len(after) == 0 || after[0] <= resumedAt {
		t.Fatalf("the backup's host received %d datagrams, first %v; want the resumed toy's, above %d", len(after), after, resumedAt)
	}
	t.Logf("primary's host: %d datagrams, the last count %d; resumed at %d; backup's host: %d datagrams from %d",
		len(before), before[len(before)-1], resumedAt, len(after), after[0])
}

// captureStdout runs f with os.Stdout going to a pipe and returns what f
// printed.
func captureStdout(t *testing.T, f func()) string {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stdout
	os.Stdout = w
	var buf bytes.Buffer
	copied := make(chan struct{})
	go func() { io.Copy(&buf, r); close(copied) }()
	f()
	os.Stdout = saved
	w.Close()
	<-copied
	r.Close()
	return buf.String()
}

// diskAt checks the toy's disk against count n: block i holds the last step
// s <= n with s mod 64 == i (0 if none).
func diskAt(disk io.ReaderAt, n uint64) error {
	b := make([]byte, 8)
	for i := uint64(0); i < 64; i++ {
		if _, err := disk.ReadAt(b, int64(i*4096)); err != nil {
			return err
		}
		want := uint64(0)
		if n >= i && n > 0 && (i != 0 || n >= 64) {
			want = n - (n-i)%64
		}
		if got := binary.LittleEndian.Uint64(b); got != want {
			return fmt.Errorf("block %d holds step %d, count %d implies %d", i, got, n, want)
		}
	}
	return nil
}
