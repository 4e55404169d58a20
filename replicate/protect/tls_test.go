package protect_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/labcert"
	"github.com/repagent/repagent/internal/tlstest"
	"github.com/repagent/repagent/replicate/protect"
)

// writePKI writes a new lab PKI into a test directory.
func writePKI(t *testing.T, opts labcert.Options) labcert.Files {
	t.Helper()
	f, err := labcert.Write(t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// loadTLS loads an end's TLS configuration, failing the test on an error.
func loadTLS(t *testing.T, cert, key, ca string, allow ...string) *protect.TLS {
	t.Helper()
	c, err := protect.LoadTLS(protect.TLSFiles{Cert: cert, Key: key, CA: ca, Allow: allow})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// ends loads the backup's and the primary's configurations from f, each end
// allowing the other by name.
func ends(t *testing.T, f labcert.Files) (backup, primary *protect.TLS) {
	return loadTLS(t, f.BackupCert, f.BackupKey, f.CACert, "primary"),
		loadTLS(t, f.PrimaryCert, f.PrimaryKey, f.CACert, "backup")
}

// checkRemoteAlert checks that err is the alert the peer sent, saying alert.
func checkRemoteAlert(t *testing.T, who string, err error, alert string) {
	t.Helper()
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "remote error" || !strings.Contains(op.Err.Error(), alert) {
		t.Errorf("%s: %v; want the peer's alert %q", who, err, alert)
	}
}

// checkPeerError checks that err is a *PeerError whose reason says want.
func checkPeerError(t *testing.T, who string, err error, want string) *protect.PeerError {
	t.Helper()
	var pe *protect.PeerError
	if !errors.As(err, &pe) {
		t.Errorf("%s: %v (%T); want a *protect.PeerError", who, err, err)
		return nil
	}
	if !strings.Contains(pe.Reason, want) || !strings.Contains(err.Error(), want) {
		t.Errorf("%s: reason %q; want it to say %q", who, pe.Reason, want)
	}
	return pe
}

// (a) A primary and a backup of one PKI, each allowing the other, connect
// over TLS 1.3 and exchange data; each sees the other's certificate.
func TestTLSHandshake(t *testing.T) {
	backup, primary := ends(t, writePKI(t, labcert.Options{}))
	server, client := tlstest.Link(t, backup.Server(), primary.Client())
	if server.Err != nil || client.Err != nil {
		t.Fatalf("backup: %v; primary: %v", server.Err, client.Err)
	}
	for _, tc := range []struct {
		name    string
		s       tlstest.Side
		wantCN  string
		wantURI string
	}{
		{"backup", server, "primary", "repagent://primary"},
		{"primary", client, "backup", "repagent://backup"},
	} {
		if tc.s.State.Version != tls.VersionTLS13 {
			t.Errorf("%s: version %#x, want TLS 1.3", tc.name, tc.s.State.Version)
		}
		peer := tc.s.State.PeerCertificates
		if len(peer) == 0 || peer[0].Subject.CommonName != tc.wantCN || len(peer[0].URIs) != 1 || peer[0].URIs[0].String() != tc.wantURI {
			t.Errorf("%s: peer certificates %v; want %s's", tc.name, peer, tc.wantCN)
		}
	}
}

// Allow is optional: without it any certificate the CA signed is accepted.
func TestTLSWithoutAllow(t *testing.T) {
	f := writePKI(t, labcert.Options{})
	backup := loadTLS(t, f.BackupCert, f.BackupKey, f.CACert)
	primary := loadTLS(t, f.PrimaryCert, f.PrimaryKey, f.CACert)
	if server, client := tlstest.Link(t, backup.Server(), primary.Client()); server.Err != nil || client.Err != nil {
		t.Fatalf("backup: %v; primary: %v", server.Err, client.Err)
	}
}

// (b) A client without a certificate is refused by the backup, and learns
// it from the alert.
func TestTLSNoClientCertificate(t *testing.T) {
	backup, _ := ends(t, writePKI(t, labcert.Options{}))
	anon := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}
	server, client := tlstest.Link(t, backup.Server(), anon)
	if server.Err == nil || !strings.Contains(server.Err.Error(), "didn't provide a certificate") {
		t.Errorf("backup: %v; want a refusal of the client without a certificate", server.Err)
	}
	checkRemoteAlert(t, "client", client.Err, "certificate required")
}

// (c) A primary whose certificate another CA signed is refused by the
// backup: crypto/tls verifies the chain, before Allow is checked.
func TestTLSClientFromOtherCA(t *testing.T) {
	f, other := writePKI(t, labcert.Options{}), writePKI(t, labcert.Options{})
	backup, _ := ends(t, f)
	// It trusts the right CA, but its own certificate is the other CA's.
	stranger := loadTLS(t, other.PrimaryCert, other.PrimaryKey, f.CACert, "backup")
	server, client := tlstest.Link(t, backup.Server(), stranger.Client())
	var cve *tls.CertificateVerificationError
	if !errors.As(server.Err, &cve) || !errors.As(server.Err, new(x509.UnknownAuthorityError)) {
		t.Errorf("backup: %v (%T); want a *tls.CertificateVerificationError for an unknown authority", server.Err, server.Err)
	}
	checkRemoteAlert(t, "primary", client.Err, "unknown certificate authority")
}

// (d) The backup refuses a primary that its CA signed but whose names it
// does not allow, with a *PeerError naming the names, through the failed
// handshake; the primary gets the alert.
func TestTLSServerAllow(t *testing.T) {
	f := writePKI(t, labcert.Options{})
	_, primary := ends(t, f)
	for _, tc := range []struct {
		name      string
		allow     []string
		wantError string // "" for accepted
	}{
		{"DNS name", []string{"primary"}, ""},
		{"URI", []string{"repagent://primary"}, ""},
		{"one of several", []string{"backup-2", "primary"}, ""},
		{"other name", []string{"backup-2"}, "peer certificate names [primary localhost repagent://primary], none allowed (allowed: [backup-2])"},
		{"other URI", []string{"repagent://backup"}, "none allowed (allowed: [repagent://backup])"},
		{"case differs", []string{"Primary"}, "none allowed (allowed: [Primary])"},
		{"URI without scheme", []string{"//primary"}, "none allowed"},
		{"prefix", []string{"prim"}, "none allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backup := loadTLS(t, f.BackupCert, f.BackupKey, f.CACert, tc.allow...)
			server, client := tlstest.Link(t, backup.Server(), primary.Client())
			if tc.wantError == "" {
				if server.Err != nil || client.Err != nil {
					t.Fatalf("backup: %v; primary: %v", server.Err, client.Err)
				}
				return
			}
			if pe := checkPeerError(t, "backup", server.Err, tc.wantError); pe != nil && pe.Err != nil {
				t.Errorf("a name refusal has a cause: %v", pe.Err)
			}
			checkRemoteAlert(t, "primary", client.Err, "bad certificate")
			if client.State.Version != tls.VersionTLS13 {
				t.Errorf("primary's handshake failed (%v); with TLS 1.3 it ends before the backup's check, the refusal comes at the first Read", client.Err)
			}
		})
	}
}

// The primary likewise refuses a backup whose names it does not allow, and
// the backup gets the alert in its handshake.
func TestTLSClientAllow(t *testing.T) {
	f := writePKI(t, labcert.Options{})
	backup, _ := ends(t, f)
	primary := loadTLS(t, f.PrimaryCert, f.PrimaryKey, f.CACert, "repagent://backup-2")
	server, client := tlstest.Link(t, backup.Server(), primary.Client())
	checkPeerError(t, "primary", client.Err,
		"peer certificate names [backup localhost repagent://backup], none allowed (allowed: [repagent://backup-2])")
	checkRemoteAlert(t, "backup", server.Err, "bad certificate")
}

// (e) The primary refuses a backup whose certificate another CA signed,
// though it skips crypto/tls's own verification, with a *PeerError that
// unwraps to x509's error.
func TestTLSServerFromOtherCA(t *testing.T) {
	f, other := writePKI(t, labcert.Options{}), writePKI(t, labcert.Options{})
	_, primary := ends(t, f)
	for _, tc := range []struct {
		name    string
		primary *protect.TLS
	}{
		{"allow", primary},
		{"no allow", loadTLS(t, f.PrimaryCert, f.PrimaryKey, f.CACert)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			impostor := loadTLS(t, other.BackupCert, other.BackupKey, f.CACert, "primary")
			server, client := tlstest.Link(t, impostor.Server(), tc.primary.Client())
			pe := checkPeerError(t, "primary", client.Err,
				`peer certificate (names ["backup" "localhost" "repagent://backup"]) does not verify against the CA in `+f.CACert)
			if pe != nil && !errors.As(client.Err, new(x509.UnknownAuthorityError)) {
				t.Errorf("primary: %v; want it to unwrap to x509.UnknownAuthorityError", client.Err)
			}
			checkRemoteAlert(t, "backup", server.Err, "bad certificate")
		})
	}
}

// signLeaf writes, beside the PKI f, a certificate its CA signs with only
// the extended key usage given, and its key; it returns their paths.
func signLeaf(t *testing.T, f labcert.Files, name string, usage x509.ExtKeyUsage) (cert, key string) {
	t.Helper()
	ca, err := tls.LoadX509KeyPair(f.CACert, f.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     []string{name},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Leaf, &k.PublicKey, ca.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cert, key = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if err := os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// A certificate of the CA for the wrong role is refused, even with no Allow:
// the backup accepts a primary only with a certificate for client auth, the
// primary a backup only with one for server auth.
func TestTLSKeyUsage(t *testing.T) {
	f := writePKI(t, labcert.Options{})
	backup := loadTLS(t, f.BackupCert, f.BackupKey, f.CACert)
	primary := loadTLS(t, f.PrimaryCert, f.PrimaryKey, f.CACert)

	cert, key := signLeaf(t, f, "server-only", x509.ExtKeyUsageServerAuth)
	server, client := tlstest.Link(t, backup.Server(), loadTLS(t, cert, key, f.CACert).Client())
	var inv x509.CertificateInvalidError
	if !errors.As(server.Err, new(*tls.CertificateVerificationError)) || !errors.As(server.Err, &inv) || inv.Reason != x509.IncompatibleUsage {
		t.Errorf("backup, primary with a server-only certificate: %v; want a verification error for incompatible usage", server.Err)
	}
	checkRemoteAlert(t, "server-only primary", client.Err, "bad certificate")

	cert, key = signLeaf(t, f, "client-only", x509.ExtKeyUsageClientAuth)
	server, client = tlstest.Link(t, loadTLS(t, cert, key, f.CACert).Server(), primary.Client())
	checkPeerError(t, "primary, backup with a client-only certificate", client.Err,
		`peer certificate (names ["client-only"]) does not verify against the CA in `+f.CACert+": x509: certificate specifies an incompatible key usage")
	if !errors.As(client.Err, &inv) || inv.Reason != x509.IncompatibleUsage {
		t.Errorf("primary: %v; want it to unwrap to x509's incompatible usage", client.Err)
	}
	checkRemoteAlert(t, "client-only backup", server.Err, "bad certificate")
}

// TLS 1.2 is refused on both ends.
func TestTLS12Refused(t *testing.T) {
	backup, primary := ends(t, writePKI(t, labcert.Options{}))
	old := primary.Client()
	old.MinVersion, old.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	server, client := tlstest.Link(t, backup.Server(), old)
	if server.Err == nil || client.Err == nil {
		t.Errorf("TLS 1.2 client: backup %v, client %v; want both to fail", server.Err, client.Err)
	}
	oldServer := backup.Server()
	oldServer.MinVersion, oldServer.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	server, client = tlstest.Link(t, oldServer, primary.Client())
	if server.Err == nil || client.Err == nil {
		t.Errorf("TLS 1.2 server: server %v, primary %v; want both to fail", server.Err, client.Err)
	}
}

// (f) A primary without TLS that talks to a TLS backup fails the backup's
// handshake at once, with an error and not a hang.
func TestTLSPlaintextClient(t *testing.T) {
	backup, _ := ends(t, writePKI(t, labcert.Options{}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		done <- tls.Server(c, backup.Server()).Handshake()
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("plaintext hello from a primary without TLS\n")); err != nil {
		t.Fatal(err)
	}
	err = <-done
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("backup: %v; want the handshake to fail, not to wait", err)
	}
	if !errors.As(err, new(tls.RecordHeaderError)) {
		t.Errorf("backup: %v (%T); want a tls.RecordHeaderError", err, err)
	}
}

// A TLS primary that reaches a backup without TLS fails its handshake.
func TestTLSPlaintextServer(t *testing.T) {
	_, primary := ends(t, writePKI(t, labcert.Options{}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Write([]byte("plaintext hello from a backup without TLS\n"))
		done <- err
		io.Copy(io.Discard, c) // until the primary closes
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	err = tls.Client(c, primary.Client()).Handshake()
	c.Close()
	if werr := <-done; werr != nil {
		t.Fatal(werr)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("primary: %v; want the handshake to fail, not to wait", err)
	}
	if !errors.As(err, new(tls.RecordHeaderError)) {
		t.Errorf("primary: %v (%T); want a tls.RecordHeaderError", err, err)
	}
}

// (g) LoadTLS names the file and what is wrong with it.
func TestLoadTLSErrors(t *testing.T) {
	f := writePKI(t, labcert.Options{})
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	missing := filepath.Join(dir, "missing.crt")
	text := write("text.pem", "this is not PEM\n")
	empty := write("empty.pem", "")
	caKey, err := os.ReadFile(f.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	keyAsCert := write("key-as-cert.crt", string(caKey))
	primaryCert, err := os.ReadFile(f.PrimaryCert)
	if err != nil {
		t.Fatal(err)
	}
	encrypted := write("encrypted.key", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
	badCert := write("bad.crt", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	ok := protect.TLSFiles{Cert: f.PrimaryCert, Key: f.PrimaryKey, CA: f.CACert}
	with := func(change func(*protect.TLSFiles)) protect.TLSFiles {
		c := ok
		change(&c)
		return c
	}
	for _, tc := range []struct {
		name  string
		files protect.TLSFiles
		want  string
	}{
		{"missing certificate", with(func(c *protect.TLSFiles) { c.Cert = missing }), "load TLS certificate: open " + missing + ": no such file or directory"},
		{"missing key", with(func(c *protect.TLSFiles) { c.Key = missing }), "load TLS key: open " + missing + ": no such file or directory"},
		{"missing CA", with(func(c *protect.TLSFiles) { c.CA = missing }), "load TLS CA: open " + missing + ": no such file or directory"},
		{"certificate not PEM", with(func(c *protect.TLSFiles) { c.Cert = text }), "load TLS certificate " + text + ": not a PEM file"},
		{"certificate empty", with(func(c *protect.TLSFiles) { c.Cert = empty }), "load TLS certificate " + empty + ": not a PEM file"},
		{"key not PEM", with(func(c *protect.TLSFiles) { c.Key = text }), "load TLS key " + text + ": not a PEM file"},
		{"CA not PEM", with(func(c *protect.TLSFiles) { c.CA = text }), "load TLS CA " + text + ": not a PEM file"},
		{"key given as certificate", with(func(c *protect.TLSFiles) { c.Cert = keyAsCert }),
			"load TLS certificate " + keyAsCert + ": no CERTIFICATE block (the file holds [PRIVATE KEY])"},
		{"certificate given as key", with(func(c *protect.TLSFiles) { c.Key = f.PrimaryCert }),
			"load TLS key " + f.PrimaryCert + ": no private key block (the file holds [CERTIFICATE])"},
		{"certificate does not parse", with(func(c *protect.TLSFiles) { c.Cert = badCert }), "load TLS certificate " + badCert + ": certificate 1: x509: "},
		{"encrypted key", with(func(c *protect.TLSFiles) { c.Key = encrypted }), "load TLS key " + encrypted + ": the key is encrypted"},
		{"mismatched key", with(func(c *protect.TLSFiles) { c.Key = f.BackupKey }),
			"load TLS key " + f.BackupKey + ": it is not the key of the certificate in " + f.PrimaryCert},
		{"CA file holds a leaf", with(func(c *protect.TLSFiles) { c.CA = f.PrimaryCert }),
			"load TLS CA " + f.PrimaryCert + `: the file holds no CA certificate (not CAs: ["CN=primary,O=repagent lab"]`},
		{"CA file holds a key", with(func(c *protect.TLSFiles) { c.CA = f.CAKey }), "load TLS CA " + f.CAKey + ": no CERTIFICATE block"},
		{"no key given", with(func(c *protect.TLSFiles) { c.Key = "" }), "load TLS: no file given for the [key]"},
		{"nothing given", protect.TLSFiles{}, "load TLS: no file given for the [certificate key CA]"},
		{"empty allowed name", with(func(c *protect.TLSFiles) { c.Allow = []string{"backup", ""} }), "load TLS: allowed name 2 is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := protect.LoadTLS(tc.files)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadTLS(%+v) = %v, %v; want an error saying %q", tc.files, got, err, tc.want)
			}
			if got != nil {
				t.Errorf("LoadTLS returned a configuration with its error")
			}
		})
	}
	// A CA bundle may hold other certificates besides the CA's.
	bundle := write("bundle.crt", string(primaryCert)+mustRead(t, f.CACert))
	if _, err := protect.LoadTLS(with(func(c *protect.TLSFiles) { c.CA = bundle })); err != nil {
		t.Errorf("CA bundle with a leaf in it: %v", err)
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
