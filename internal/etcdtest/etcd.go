package etcdtest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/procout"
)

// startTimeout bounds how long Start waits for the server to answer.
const startTimeout = 30 * time.Second

// Start runs an etcd server for t and returns its client endpoints
// ("http://127.0.0.1:PORT"). The server is killed, and its data removed,
// when t ends. A test without the etcd binary is skipped (or failed, with
// REPAGENT_REQUIRE_PRIVILEGED=1).
func Start(t testing.TB) (endpoints []string) {
	t.Helper()
	privileged.Require(t, privileged.Etcd)

	// Ports are picked by binding :0 and closing; another process could
	// take one in between, so a failed start is retried with fresh ports.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		eps, err := start(t)
		if err == nil {
			return eps
		}
		lastErr = err
	}
	t.Fatalf("start etcd: %v", lastErr)
	return nil
}

func start(t testing.TB) ([]string, error) {
	ep, stop, out, err := Launch(t.TempDir())
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("etcd output:\n%s", out.String())
		}
	})
	return []string{ep}, nil
}

// Launch runs one etcd server (privileged.EtcdBinary) with its data in dir
// and its URLs on free 127.0.0.1 ports, and returns its client endpoint once
// it answers, a function that kills it, and its output so far. The bench
// command uses it outside tests.
func Launch(dir string) (endpoint string, stop func(), out fmt.Stringer, err error) {
	ports, err := freePorts(2)
	if err != nil {
		return "", nil, nil, err
	}
	client := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	cmd := exec.Command(privileged.EtcdBinary,
		"--name", "etcdtest",
		"--data-dir", dir,
		"--listen-client-urls", client,
		"--advertise-client-urls", client,
		"--listen-peer-urls", peer,
		"--initial-advertise-peer-urls", peer,
		"--initial-cluster", "etcdtest="+peer,
		"--initial-cluster-state", "new",
		"--heartbeat-interval", "10",
		"--election-timeout", "100",
		"--logger", "zap",
		"--log-level", "warn",
	)
	buf := &procout.Buffer{} // the server's first 64 KiB, for a failure's message
	cmd.Stdout, cmd.Stderr = buf, buf
	if err := cmd.Start(); err != nil {
		return "", nil, nil, fmt.Errorf("run %s: %w", privileged.EtcdBinary, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	kill := func() {
		cmd.Process.Kill()
		<-exited
		exited <- nil // a second stop returns at once
	}

	deadline := time.Now().Add(startTimeout)
	for !healthy(client) {
		select {
		case err := <-exited:
			return "", nil, nil, fmt.Errorf("etcd exited before answering (%v): %s", err, buf.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			kill()
			return "", nil, nil, fmt.Errorf("etcd did not answer at %s within %v: %s", client, startTimeout, buf.String())
		}
	}
	return client, kill, buf, nil
}

// healthy reports whether the server at url answers /health with a leader.
func healthy(url string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/health", nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode == http.StatusOK && strings.Contains(b.String(), `"health":"true"`)
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
