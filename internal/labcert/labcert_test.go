package labcert

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// parseCert decodes the one CERTIFICATE block of data.
func parseCert(t *testing.T, what string, data []byte) *x509.Certificate {
	t.Helper()
	b, rest := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("%s: want exactly one CERTIFICATE block, got %q", what, data)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return c
}

// checkKey checks that keyPEM is a PKCS #8 P-256 key and the key of certPEM.
func checkKey(t *testing.T, what string, certPEM, keyPEM []byte) {
	t.Helper()
	b, _ := pem.Decode(keyPEM)
	if b == nil || b.Type != "PRIVATE KEY" {
		t.Fatalf("%s key: want a PRIVATE KEY block, got %q", what, keyPEM)
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		t.Fatalf("%s key: %v", what, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		t.Fatalf("%s key: %T, want an ECDSA P-256 key", what, k)
	}
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		t.Errorf("%s: key and certificate: %v", what, err)
	}
}

func TestLabcertGenerate(t *testing.T) {
	before := time.Now()
	p, err := Generate(Options{})
	if err != nil {
		t.Fatal(err)
	}
	ca := parseCert(t, "ca.crt", p.CACert)
	checkKey(t, "CA", p.CACert, p.CAKey)
	if !ca.IsCA || !ca.BasicConstraintsValid || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA: IsCA %v, basic constraints %v, key usage %#x; want a CA that signs certificates",
			ca.IsCA, ca.BasicConstraintsValid, ca.KeyUsage)
	}
	if err := ca.CheckSignatureFrom(ca); err != nil || !bytes.Equal(ca.RawIssuer, ca.RawSubject) {
		t.Errorf("CA is not self-signed: %v", err)
	}
	if ca.PublicKeyAlgorithm != x509.ECDSA || ca.PublicKey.(*ecdsa.PublicKey).Curve != elliptic.P256() {
		t.Errorf("CA key: %v, want ECDSA P-256", ca.PublicKeyAlgorithm)
	}
	if got := ca.NotAfter.Sub(before); got < DefaultValidity-time.Minute || got > DefaultValidity+time.Minute {
		t.Errorf("CA valid for %v from now, want %v", got, DefaultValidity)
	}
	if !ca.NotBefore.Before(before) {
		t.Errorf("CA valid from %v, want it valid already at %v", ca.NotBefore, before)
	}

	roots := x509.NewCertPool()
	roots.AddCert(ca)
	for _, tc := range []struct {
		name      string
		cert, key []byte
		wantDNS   []string
		wantURI   string
	}{
		{"primary", p.PrimaryCert, p.PrimaryKey, []string{"primary", "localhost"}, "repagent://primary"},
		{"backup", p.BackupCert, p.BackupKey, []string{"backup", "localhost"}, "repagent://backup"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := parseCert(t, tc.name, tc.cert)
			checkKey(t, tc.name, tc.cert, tc.key)
			if !slices.Equal(c.DNSNames, tc.wantDNS) {
				t.Errorf("DNS names %q, want %q", c.DNSNames, tc.wantDNS)
			}
			if len(c.URIs) != 1 || c.URIs[0].String() != tc.wantURI {
				t.Errorf("URIs %v, want [%s]", c.URIs, tc.wantURI)
			}
			if len(c.IPAddresses) != 2 || !c.IPAddresses[0].Equal(net.IPv4(127, 0, 0, 1)) || !c.IPAddresses[1].Equal(net.IPv6loopback) {
				t.Errorf("IP addresses %v, want [127.0.0.1 ::1]", c.IPAddresses)
			}
			if c.IsCA {
				t.Error("leaf certificate is a CA")
			}
			if !c.NotAfter.Equal(ca.NotAfter) {
				t.Errorf("valid until %v, the CA until %v", c.NotAfter, ca.NotAfter)
			}
			for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
				if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
					t.Errorf("verify for usage %v: %v", usage, err)
				}
			}
			for _, host := range []string{tc.name, "localhost", "127.0.0.1", "::1"} {
				if err := c.VerifyHostname(host); err != nil {
					t.Errorf("host %s: %v", host, err)
				}
			}
		})
	}
}

// Two PKIs have different CAs: neither trusts the other's certificates.
func TestLabcertDistinctCAs(t *testing.T) {
	a, err := Generate(Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Generate(Options{})
	if err != nil {
		t.Fatal(err)
	}
	caA, caB := parseCert(t, "a", a.CACert), parseCert(t, "b", b.CACert)
	if caA.Subject.CommonName == caB.Subject.CommonName {
		t.Errorf("both CAs are called %q", caA.Subject.CommonName)
	}
	roots := x509.NewCertPool()
	roots.AddCert(caA)
	if _, err := parseCert(t, "b primary", b.PrimaryCert).Verify(x509.VerifyOptions{Roots: roots}); err == nil {
		t.Error("a certificate of CA b verifies against CA a")
	}
}

func TestLabcertOptions(t *testing.T) {
	p, err := Generate(Options{PrimaryName: "pa.lab", BackupName: "ba-2", Validity: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	pc, bc := parseCert(t, "primary", p.PrimaryCert), parseCert(t, "backup", p.BackupCert)
	if pc.DNSNames[0] != "pa.lab" || pc.URIs[0].String() != "repagent://pa.lab" || pc.Subject.CommonName != "pa.lab" {
		t.Errorf("primary: DNS %q, URIs %v, CN %q", pc.DNSNames, pc.URIs, pc.Subject.CommonName)
	}
	if bc.DNSNames[0] != "ba-2" || bc.URIs[0].String() != "repagent://ba-2" {
		t.Errorf("backup: DNS %q, URIs %v", bc.DNSNames, bc.URIs)
	}
	if got := time.Until(pc.NotAfter); got < 47*time.Hour || got > 48*time.Hour {
		t.Errorf("valid for %v more, want 48h", got)
	}
}

func TestLabcertOptionsErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"same names", Options{PrimaryName: "node", BackupName: "node"}, `primary and backup are both named "node"`},
		{"same as default", Options{PrimaryName: "backup"}, `both named "backup"`},
		{"localhost", Options{BackupName: "localhost"}, `backup name: "localhost" does not identify an end`},
		{"upper case", Options{PrimaryName: "Primary"}, `primary name: "Primary": character 'P' is not allowed`},
		{"space", Options{PrimaryName: "my primary"}, `character ' ' is not allowed`},
		{"slash", Options{BackupName: "a/b"}, `character '/' is not allowed`},
		{"empty label", Options{BackupName: "a..b"}, `"a..b": want a host name`},
		{"hyphen", Options{BackupName: "-b"}, `may not begin or end with '-'`},
		{"long label", Options{BackupName: strings.Repeat("x", 64)}, "labels of 1 to 63 characters"},
		{"negative validity", Options{Validity: -time.Hour}, "validity -1h0m0s: must not be negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Generate(tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Generate(%+v) = %v, %v; want an error saying %q", tc.opts, p, err, tc.want)
			}
			dir := t.TempDir()
			if _, err := Write(dir, tc.opts); err == nil {
				t.Fatal("Write with bad options succeeded")
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("Write with bad options left %d files", len(ents))
			}
		})
	}
}

// checkFiles checks that f names the six files in dir with their modes and
// that they form one PKI.
func checkFiles(t *testing.T, dir string, f Files) {
	t.Helper()
	want := []struct {
		path, name string
		mode       fs.FileMode
	}{
		{f.CACert, CACertFile, 0o644}, {f.CAKey, CAKeyFile, 0o600},
		{f.PrimaryCert, PrimaryCertFile, 0o644}, {f.PrimaryKey, PrimaryKeyFile, 0o600},
		{f.BackupCert, BackupCertFile, 0o644}, {f.BackupKey, BackupKeyFile, 0o600},
	}
	for _, w := range want {
		if w.path != filepath.Join(dir, w.name) {
			t.Errorf("path %q, want %q", w.path, filepath.Join(dir, w.name))
		}
		fi, err := os.Stat(w.path)
		if err != nil {
			t.Error(err)
			continue
		}
		if fi.Mode() != w.mode {
			t.Errorf("%s: mode %v, want %v", w.name, fi.Mode(), w.mode)
		}
	}
	read := func(path string) []byte {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	roots := x509.NewCertPool()
	roots.AddCert(parseCert(t, "ca.crt", read(f.CACert)))
	checkKey(t, "CA", read(f.CACert), read(f.CAKey))
	checkKey(t, "primary", read(f.PrimaryCert), read(f.PrimaryKey))
	checkKey(t, "backup", read(f.BackupCert), read(f.BackupKey))
	for _, c := range []string{f.PrimaryCert, f.BackupCert} {
		if _, err := parseCert(t, c, read(c)).Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%s: %v", c, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != len(want) {
		t.Errorf("%s holds %d entries, want %d", dir, len(ents), len(want))
	}
}

// Write sets the modes itself: a umask that takes everything from group and
// others leaves the certificates 0644 all the same.
func TestLabcertWrite(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	dir := filepath.Join(t.TempDir(), "lab", "pki") // Write makes it
	f, err := Write(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	checkFiles(t, dir, f)
}

// Without Force, Write refuses if any of its files exists, names it, and
// writes none; with Force it replaces them all, with the right modes.
func TestLabcertWriteExisting(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, BackupKeyFile)
	if err := os.WriteFile(key, []byte("not mine\n"), 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(key, 0o666); err != nil {
		t.Fatal(err)
	}
	_, err := Write(dir, Options{})
	if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), "refuse to overwrite "+key) {
		t.Fatalf("Write over %s: %v; want fs.ErrExist naming the file", key, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("the refused Write left %d entries, want only the one that was there", len(ents))
	}
	if b, _ := os.ReadFile(key); string(b) != "not mine\n" {
		t.Errorf("the refused Write changed %s: %q", key, b)
	}

	f, err := Write(dir, Options{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	checkFiles(t, dir, f)
	// And again, over its own files.
	first, _ := os.ReadFile(f.CACert)
	if f, err = Write(dir, Options{Force: true}); err != nil {
		t.Fatal(err)
	}
	checkFiles(t, dir, f)
	if again, _ := os.ReadFile(f.CACert); bytes.Equal(first, again) {
		t.Error("Write with Force kept the old CA")
	}
}
