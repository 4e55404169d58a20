package labcert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Defaults of Options.
const (
	// DefaultPrimaryName is the primary's name when Options.PrimaryName is
	// empty.
	DefaultPrimaryName = "primary"
	// DefaultBackupName is the backup's name when Options.BackupName is
	// empty.
	DefaultBackupName = "backup"
	// DefaultValidity is how long the certificates are valid when
	// Options.Validity is 0: 825 days, the longest lifetime that common TLS
	// clients accept for a server certificate.
	DefaultValidity = 825 * 24 * time.Hour
)

// URIScheme is the scheme of the URI name each leaf certificate carries:
// the primary's is "repagent://primary".
const URIScheme = "repagent"

// backdate is how long before now the certificates become valid, so that a
// host whose clock is a little behind the one that made them accepts them.
const backdate = time.Hour

// Options configures the PKI that Generate and Write make.
type Options struct {
	// PrimaryName and BackupName name the two ends: each leaf certificate
	// carries its name as a DNS name and as the URI repagent://NAME. They
	// must be host names in lower case (letters, digits, '-' and '.'),
	// different from each other and from localhost. Empty means
	// DefaultPrimaryName and DefaultBackupName.
	PrimaryName, BackupName string
	// Validity is how long the CA and both certificates are valid, from
	// now; 0 means DefaultValidity.
	Validity time.Duration
	// Force lets Write replace files that exist. Without it Write refuses
	// to overwrite any of them and writes nothing.
	Force bool
}

// withDefaults returns o with its defaults filled in, or an error naming the
// option that is wrong.
func (o Options) withDefaults() (Options, error) {
	if o.PrimaryName == "" {
		o.PrimaryName = DefaultPrimaryName
	}
	if o.BackupName == "" {
		o.BackupName = DefaultBackupName
	}
	if o.Validity == 0 {
		o.Validity = DefaultValidity
	}
	if o.Validity < 0 {
		return o, fmt.Errorf("validity %v: must not be negative", o.Validity)
	}
	if err := CheckName(o.PrimaryName); err != nil {
		return o, fmt.Errorf("primary name: %w", err)
	}
	if err := CheckName(o.BackupName); err != nil {
		return o, fmt.Errorf("backup name: %w", err)
	}
	if o.PrimaryName == o.BackupName {
		return o, fmt.Errorf("primary and backup are both named %q: the names must differ, or each end would accept the other's certificate as its own peer", o.PrimaryName)
	}
	return o, nil
}

// CheckName reports what is wrong with name as the name of an end, as
// Generate checks Options.PrimaryName and Options.BackupName: it must be a
// host name in lower case, and not localhost.
func CheckName(name string) error {
	if name == "localhost" {
		return errors.New(`"localhost" does not identify an end: both certificates carry it`)
	}
	if len(name) > 253 {
		return fmt.Errorf("%q: longer than 253 characters", name)
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("%q: want a host name, dot-separated labels of 1 to 63 characters", name)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("%q: a label may not begin or end with '-'", name)
		}
		for _, c := range label {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return fmt.Errorf("%q: character %q is not allowed (want lower-case letters, digits, '-' and '.')", name, c)
			}
		}
	}
	return nil
}

// NameURI returns the URI name that the certificate of the end called name
// carries: "repagent://" + name.
func NameURI(name string) string {
	return (&url.URL{Scheme: URIScheme, Host: name}).String()
}

// PKI is a lab PKI in memory: each certificate and key PEM-encoded, the
// certificates as CERTIFICATE blocks, the keys as PKCS #8 PRIVATE KEY blocks.
type PKI struct {
	CACert, CAKey           []byte
	PrimaryCert, PrimaryKey []byte
	BackupCert, BackupKey   []byte
}

// Generate makes a CA and, signed by it, a certificate for the primary and
// one for the backup, as the package documentation describes. Each has a new
// ECDSA P-256 key.
func Generate(opts Options) (*PKI, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	notBefore, notAfter := now.Add(-backdate), now.Add(opts.Validity)

	caKey, caKeyPEM, err := newKey()
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	caSerial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("generate CA serial number: %w", err)
	}
	ca := &x509.Certificate{
		SerialNumber: caSerial,
		// The serial's first digits tell two lab CAs apart in errors.
		Subject:               pkix.Name{Organization: []string{"repagent lab"}, CommonName: fmt.Sprintf("repagent lab CA %.8x", caSerial.Bytes())},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true, // it signs the two leaves, no other CA
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	if ca, err = x509.ParseCertificate(caDER); err != nil {
		return nil, fmt.Errorf("parse the CA certificate just made: %w", err)
	}
	p := &PKI{CACert: pemBlock("CERTIFICATE", caDER), CAKey: caKeyPEM}

	leaf := func(name string) (certPEM, keyPEM []byte, err error) {
		key, keyPEM, err := newKey()
		if err != nil {
			return nil, nil, fmt.Errorf("generate %s key: %w", name, err)
		}
		serial, err := newSerial()
		if err != nil {
			return nil, nil, fmt.Errorf("generate %s serial number: %w", name, err)
		}
		uri, err := url.Parse(NameURI(name))
		if err != nil {
			return nil, nil, fmt.Errorf("%s URI: %w", name, err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial,
			Subject:      pkix.Name{Organization: []string{"repagent lab"}, CommonName: name},
			NotBefore:    notBefore,
			NotAfter:     notAfter,
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
			DNSNames:     []string{name, "localhost"},
			URIs:         []*url.URL{uri},
			IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, nil, fmt.Errorf("create %s certificate: %w", name, err)
		}
		return pemBlock("CERTIFICATE", der), keyPEM, nil
	}
	if p.PrimaryCert, p.PrimaryKey, err = leaf(opts.PrimaryName); err != nil {
		return nil, err
	}
	if p.BackupCert, p.BackupKey, err = leaf(opts.BackupName); err != nil {
		return nil, err
	}
	return p, nil
}

// newKey returns a new ECDSA P-256 key and its PKCS #8 PEM encoding.
func newKey() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return key, pemBlock("PRIVATE KEY", der), nil
}

// newSerial returns a random positive 128-bit serial number.
func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	return n.Add(n, big.NewInt(1)), nil // never 0
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// The names of the files Write writes.
const (
	CACertFile      = "ca.crt"
	CAKeyFile       = "ca.key"
	PrimaryCertFile = "primary.crt"
	PrimaryKeyFile  = "primary.key"
	BackupCertFile  = "backup.crt"
	BackupKeyFile   = "backup.key"
)

// File modes: anyone may read a certificate, only the owner a key.
const (
	CertMode fs.FileMode = 0o644
	KeyMode  fs.FileMode = 0o600
)

// Files are the paths of the files Write wrote: the directory joined with
// CACertFile and the others.
type Files struct {
	CACert, CAKey           string
	PrimaryCert, PrimaryKey string
	BackupCert, BackupKey   string
}

// Write generates a PKI (Generate) and writes it into dir, which it creates
// if it does not exist: certificates with mode 0644, keys with mode 0600,
// whatever the umask. Unless opts.Force, it refuses, before it writes
// anything, if any of the six files exists, with an error that names the
// file and matches fs.ErrExist (errors.Is). With opts.Force it replaces
// each file by renaming a new one over it, so a file is never half written.
func Write(dir string, opts Options) (Files, error) {
	p, err := Generate(opts)
	if err != nil {
		return Files{}, err
	}
	f := Files{
		CACert:      filepath.Join(dir, CACertFile),
		CAKey:       filepath.Join(dir, CAKeyFile),
		PrimaryCert: filepath.Join(dir, PrimaryCertFile),
		PrimaryKey:  filepath.Join(dir, PrimaryKeyFile),
		BackupCert:  filepath.Join(dir, BackupCertFile),
		BackupKey:   filepath.Join(dir, BackupKeyFile),
	}
	files := []struct {
		path string
		data []byte
		mode fs.FileMode
	}{
		{f.CACert, p.CACert, CertMode},
		{f.CAKey, p.CAKey, KeyMode},
		{f.PrimaryCert, p.PrimaryCert, CertMode},
		{f.PrimaryKey, p.PrimaryKey, KeyMode},
		{f.BackupCert, p.BackupCert, CertMode},
		{f.BackupKey, p.BackupKey, KeyMode},
	}
	if !opts.Force {
		for _, w := range files {
			if _, err := os.Lstat(w.path); err == nil {
				return Files{}, fmt.Errorf("refuse to overwrite %s: %w", w.path, fs.ErrExist)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return Files{}, fmt.Errorf("check %s: %w", w.path, err)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Files{}, fmt.Errorf("create directory: %w", err)
	}
	var created []string // removed again if a later file fails
	for _, w := range files {
		if opts.Force {
			err = replaceFile(w.path, w.data, w.mode)
		} else {
			err = createFile(w.path, w.data, w.mode)
		}
		if err != nil {
			for _, path := range created {
				os.Remove(path)
			}
			return Files{}, err
		}
		created = append(created, w.path)
	}
	return f, nil
}

// createFile writes data to path, a file that must not exist, with mode.
func createFile(path string, data []byte, mode fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("refuse to overwrite %s: %w", path, fs.ErrExist)
	}
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := fill(f, path, data, mode); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// replaceFile writes data to a new file beside path, with mode, and renames
// it over path.
func replaceFile(path string, data []byte, mode fs.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("create a file to replace %s: %w", path, err)
	}
	if err := fill(f, path, data, mode); err != nil {
		os.Remove(f.Name())
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return nil
}

// fill sets f's mode (the umask may have narrowed it at creation), writes
// data, syncs and closes f; its errors name path, the file f becomes.
func fill(f *os.File, path string, data []byte, mode fs.FileMode) error {
	err := f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
