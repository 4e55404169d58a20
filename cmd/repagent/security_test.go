package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/labcert"
	"github.com/repagent/repagent/internal/privileged"
)

// A TLS backup refuses every primary it cannot authenticate, naming why on
// both ends, and goes on serving with nothing changed: a plaintext primary,
// one with a certificate from another CA, one with a certificate of the
// right CA for a name the backup does not allow, and a TLS client with no
// certificate. They come while the real primary replicates, whose session
// goes on acknowledging epochs; then it is killed, and the backup fails
// over to its last checkpoint.
func TestBackupRefusesUnauthenticatedPrimaries(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	dir := t.TempDir()
	f, err := labcert.Write(dir, labcert.Options{})
	if err != nil {
		t.Fatal(err)
	}
	backup, bl, berr, addr := startBackup(ctx, t, bin, "--run-after-failover", "1s", "--heartbeat-timeout", "5s", "--verify-replica",
		"--tls-cert", f.BackupCert, "--tls-key", f.BackupKey, "--tls-ca", f.CACert, "--tls-allow", labcert.DefaultPrimaryName)
	exited := make(chan error, 1)
	go func() { <-bl.done; exited <- backup.Wait() }()
	alive := func(after string) {
		t.Helper()
		select {
		case err := <-exited:
			t.Fatalf("backup exited (%v) after %s:\n%s%s", err, after, bl.String(), berr.String())
		default:
		}
	}
	// A primary certificate of another PKI, with the right CA to check the
	// backup by: the backup is the one to refuse.
	_, other := labTLSArgs(t)
	otherCA := []string{"--tls-cert", other[1], "--tls-key", other[3], "--tls-ca", f.CACert}
	// The real primary, replicating throughout.
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	var pout bytes.Buffer
	p := exec.CommandContext(ctx, bin, "primary", "--backup", addr, "--mem", "32M", "--stats", stats, "--heartbeat-timeout", "5s",
		"--tls-cert", f.PrimaryCert, "--tls-key", f.PrimaryKey, "--tls-ca", f.CACert, "--tls-allow", labcert.DefaultBackupName)
	p.Stdout, p.Stderr = &pout, &pout
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.Process.Kill()
	waitFor(t, 30*time.Second, "3 acknowledged epochs", func() bool { return len(readStats(t, stats)) >= 3 })
	primary := func(tlsArgs ...string) (string, int) {
		return runBin(t, bin, append([]string{"primary", "--backup", addr, "--mem", "32M", "--duration", "2s", "--connect-timeout", "2s"}, tlsArgs...)...)
	}
	for _, tc := range []struct {
		name            string
		args            []string
		primary, backup string // what each end says
	}{
		{"plaintext", nil, "backup refused the session: it speaks TLS only", "first record does not look like a TLS handshake"},
		{"other CA", otherCA, "backup refused the session: TLS", "unknown authority"},
		{"name not allowed", []string{"--tls-cert", f.BackupCert, "--tls-key", f.BackupKey, "--tls-ca", f.CACert},
			"backup refused the session: TLS", "none allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := primary(tc.args...)
			if code != 1 || !strings.Contains(out, tc.primary) {
				t.Errorf("primary: exit %d, want 1 and %q:\n%s", code, tc.primary, out)
			}
			waitFor(t, 30*time.Second, "backup log line naming "+tc.backup+":\n"+berr.String(), func() bool { return strings.Contains(berr.String(), tc.backup) })
			alive(tc.name)
		})
	}
	t.Run("no certificate", func(t *testing.T) {
		pool := x509.NewCertPool()
		ca, err := os.ReadFile(f.CACert)
		if err != nil {
			t.Fatal(err)
		}
		pool.AppendCertsFromPEM(ca)
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: labcert.DefaultBackupName, MinVersion: tls.VersionTLS13})
		if err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte("hello?"))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "certificate required") {
			t.Errorf("a TLS client without a certificate: %v, want the backup's alert: certificate required", err)
		}
		waitFor(t, 30*time.Second, "backup log line about the missing certificate", func() bool { return strings.Contains(berr.String(), "didn't provide a certificate") })
		alive("a client without a certificate")
	})
	t.Run("second primary", func(t *testing.T) {
		// Authenticated, but a session runs: refused as busy.
		out, code := primary("--tls-cert", f.PrimaryCert, "--tls-key", f.PrimaryKey, "--tls-ca", f.CACert)
		if want := "this backup is serving another primary"; code != 1 || !strings.Contains(out, want) {
			t.Errorf("a second primary: exit %d, want 1 and %q:\n%s", code, want, out)
		}
		alive("a second primary")
	})
	if t.Failed() {
		return
	}
	// The real session went on through them all.
	acked := len(readStats(t, stats))
	waitFor(t, 30*time.Second, "more acknowledged epochs after the refusals", func() bool { return len(readStats(t, stats)) >= acked+3 })
	p.Process.Signal(syscall.SIGKILL)
	p.Wait()
	select {
	case err := <-exited:
		if err != nil || failoverRE.FindString(bl.String()) == "" {
			t.Fatalf("backup after the real primary's kill: %v, want a failover:\n%s%s", err, bl.String(), berr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("backup did not fail over:\n%s%s", bl.String(), berr.String())
	}
}

// A plaintext backup on loopback survives what a hostile client can do to it
// before the first checkpoint: a client that trickles a byte at a time, one
// that sends a real hello and hangs up, and 1000 connections of junk. After
// each, on the same backup process, a real primary replicates to an
// acknowledged epoch and stops, which ends the backup cleanly.
func TestBackupSurvivesHostileClients(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	hello := captureHello(t, bin)
	for _, tc := range []struct {
		name   string
		attack func(t *testing.T, addr string) (during func())
	}{
		{"slowloris", func(t *testing.T, addr string) func() {
			// A byte every 100 ms for as long as the real primary runs: the
			// handshake deadline is the whole handshake's, and others are
			// served meanwhile.
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					case <-time.After(100 * time.Millisecond):
					}
					if _, err := c.Write(hello[i%len(hello) : i%len(hello)+1]); err != nil {
						return
					}
				}
			}()
			return func() { close(stop); wg.Wait() }
		}},
		{"hello then hang up", func(t *testing.T, addr string) func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			c.Write(hello)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := c.Read(make([]byte, 64)); n == 0 {
				t.Fatalf("no welcome to the replayed hello (%v): the attack would be mere junk", err)
			}
			c.Close()
			return nil
		}},
		{"1000 junk connections", func(t *testing.T, addr string) func() {
			var wg sync.WaitGroup
			sem := make(chan struct{}, 50)
			for range 1000 {
				wg.Add(1)
				sem <- struct{}{}
				go func() {
					defer wg.Done()
					defer func() { <-sem }()
					c, err := net.Dial("tcp", addr)
					if err != nil {
						return // the backlog full for a moment: the backup's problem only if the primary fails
					}
					junk := make([]byte, 64)
					rand.Read(junk)
					c.Write(junk)
					c.Close()
				}()
			}
			wg.Wait()
			return nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			backup, bl, berr, addr := startBackup(ctx, t, bin, "--heartbeat-timeout", "5s")
			exited := make(chan error, 1)
			go func() { <-bl.done; exited <- backup.Wait() }()
			during := tc.attack(t, addr)
			select {
			case err := <-exited:
				t.Fatalf("backup exited (%v) after the attack:\n%s%s", err, bl.String(), berr.String())
			case <-time.After(300 * time.Millisecond):
			}
			stats := filepath.Join(t.TempDir(), "stats.jsonl")
			out, code := runBin(t, bin, "primary", "--backup", addr, "--mem", "32M", "--duration", "2s", "--stats", stats, "--heartbeat-timeout", "5s")
			if during != nil {
				during()
			}
			if code != 0 || len(readStats(t, stats)) == 0 {
				t.Fatalf("the real primary after the attack: exit %d, %d epochs acknowledged:\n%s\nbackup:\n%s%s", code, len(readStats(t, stats)), out, bl.String(), berr.String())
			}
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("backup after the primary stopped: %v\n%s%s", err, bl.String(), berr.String())
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("backup did not end after the primary stopped:\n%s%s", bl.String(), berr.String())
			}
			t.Logf("%d epochs acknowledged after the attack; backup log:\n%s", len(readStats(t, stats)), lastLines(berr.String(), 4))
		})
	}
}

// captureHello returns the bytes a real primary sends first (its hello),
// taken by a listener that never answers.
func captureHello(t *testing.T, bin string) []byte {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p := exec.Command(bin, "primary", "--backup", ln.Addr().String(), "--mem", "32M", "--duration", "1s", "--heartbeat-timeout", "2s")
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { p.Process.Kill(); p.Wait() }()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(30 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var hello []byte
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, err := c.Read(buf)
		hello = append(hello, buf[:n]...)
		if len(hello) > 0 {
			// The hello is one small message, sent at once: what came in
			// the next 200 ms is all of it.
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && len(hello) > 0 || errors.Is(err, io.EOF) {
				break
			}
			t.Fatalf("read the primary's hello: %v", err)
		}
	}
	return hello
}
