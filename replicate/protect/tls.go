package protect

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"slices"
	"time"
)

// TLSFiles names the PEM files of one end's TLS identity, and which peers it
// accepts.
type TLSFiles struct {
	// Cert is this end's certificate: the leaf first, then any
	// intermediate CA certificates, as CERTIFICATE blocks.
	Cert string
	// Key is the certificate's private key: a PRIVATE KEY (PKCS #8),
	// EC PRIVATE KEY (SEC 1) or RSA PRIVATE KEY (PKCS #1) block, not
	// encrypted.
	Key string
	// CA is the bundle of CA certificates that the peer's certificate must
	// chain to. Only they are trusted, not the system's roots; certificates
	// in the file that are not CAs are ignored.
	CA string
	// Allow, when not empty, are the peers accepted: the peer's certificate
	// must carry one of these names, exactly, as a DNS name or as a URI
	// (compared as the whole string, "repagent://primary"). Empty accepts
	// any certificate the CA signed. A name every certificate of the CA
	// carries, such as localhost in those of package labcert, identifies
	// no one: allow the ends by their own names.
	Allow []string
}

// TLS is one end's TLS configuration of the replication link, the backup's
// (Server) or the primary's (Client), made by LoadTLS.
//
// Both ends are authenticated, by a private CA: each presents a certificate
// and checks the other's, which must chain to the CA of TLSFiles.CA (the
// system's roots are not trusted) and be valid now, for its role (client
// auth for the primary, server auth for the backup). A certificate the CA
// signed is the identity: there is no host name check (the primary dials an
// address, which proves nothing), and TLSFiles.Allow narrows the accepted
// certificates to those of named ends. Everything after the handshake is
// encrypted and integrity-protected by TLS 1.3: the hello, every checkpoint,
// acknowledgement and heartbeat, and the disk's writes with them. What is not
// protected is what TCP shows: the two addresses, when the link is up, and
// the size and timing of the traffic (which tell the dirty rate).
//
// A refusal of the peer's certificate by this end's own checks is a
// *PeerError; see it for what the other end sees.
type TLS struct {
	cert   tls.Certificate
	roots  *x509.CertPool
	caFile string // for errors
	allow  []string
}

// PeerError is an end's refusal of the other end's certificate. The
// handshake (tls.Conn.Handshake, or the first Read or Write of a connection
// that has not made it) returns it as it is (crypto/tls passes on the error
// of VerifyConnection), so errors.As finds it; Err, when set, is the x509
// error behind Reason.
//
// Which refusals are PeerErrors: on the primary (Client), all of them (no
// certificate, a chain that does not verify against the CA, no allowed
// name), because the primary verifies the backup's certificate itself. On
// the backup (Server), crypto/tls verifies the primary's chain before this
// package's check runs: a primary without a certificate gives its error
// "tls: client didn't provide a certificate", one whose certificate does not
// verify a *tls.CertificateVerificationError; only the check of Allow is a
// PeerError.
//
// The refused end does not see a PeerError but the alert it was sent, a
// *net.OpError with Op "remote error" ("remote error: tls: bad
// certificate"). With TLS 1.3 the primary's handshake is over before the
// backup checks its certificate, so a primary the backup refuses learns it
// from its first Read, not from Handshake.
type PeerError struct {
	// Reason says what is wrong with the certificate, with the names it
	// carries.
	Reason string
	// Err is the cause, when there is one: the error of x509's
	// verification.
	Err error
}

func (e *PeerError) Error() string { return "refuse TLS peer: " + e.Reason }

// Unwrap returns Err.
func (e *PeerError) Unwrap() error { return e.Err }

// LoadTLS loads f's certificate, key and CA bundle. Its errors name the file
// and what is wrong with it: missing or unreadable, not PEM, no certificate
// or key in it, a key that is not the certificate's, a certificate not valid
// now, a CA file that holds no CA certificate.
func LoadTLS(f TLSFiles) (*TLS, error) {
	var missing []string
	for _, n := range []struct{ name, path string }{{"certificate", f.Cert}, {"key", f.Key}, {"CA", f.CA}} {
		if n.path == "" {
			missing = append(missing, n.name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("load TLS: no file given for the %v (TLS needs a certificate, its key and the CA)", missing)
	}
	for i, name := range f.Allow {
		if name == "" {
			return nil, fmt.Errorf("load TLS: allowed name %d is empty", i+1)
		}
	}
	chain, err := loadCertificate(f.Cert)
	if err != nil {
		return nil, err
	}
	key, err := loadKey(f.Key)
	if err != nil {
		return nil, err
	}
	pub, ok := chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("load TLS key %s: it is not the key of the certificate in %s", f.Key, f.Cert)
	}
	roots, err := loadCA(f.CA)
	if err != nil {
		return nil, err
	}
	cert := tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return &TLS{cert: cert, roots: roots, caFile: f.CA, allow: slices.Clone(f.Allow)}, nil
}

// readPEM returns the PEM blocks of the file at path; what names the file in
// errors ("certificate", "key", "CA").
func readPEM(what, path string) ([]*pem.Block, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load TLS %s: %w", what, err)
	}
	var blocks []*pem.Block
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			break
		}
		blocks = append(blocks, b)
	}
	if len(blocks) == 0 {
		return nil, fmt.Errorf("load TLS %s %s: not a PEM file (no -----BEGIN ...----- block)", what, path)
	}
	return blocks, nil
}

// blockTypes lists the types of blocks, for an error that says what a file
// holds instead of what it should.
func blockTypes(blocks []*pem.Block) []string {
	var types []string
	for _, b := range blocks {
		if !slices.Contains(types, b.Type) {
			types = append(types, b.Type)
		}
	}
	return types
}

// parseCertificates parses the CERTIFICATE blocks of the file at path.
func parseCertificates(what, path string) ([]*x509.Certificate, error) {
	blocks, err := readPEM(what, path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for _, b := range blocks {
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("load TLS %s %s: certificate %d: %w", what, path, len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("load TLS %s %s: no CERTIFICATE block (the file holds %v)", what, path, blockTypes(blocks))
	}
	return certs, nil
}

// loadCertificate loads an end's certificate chain and checks that the leaf
// is valid now.
func loadCertificate(path string) ([]*x509.Certificate, error) {
	chain, err := parseCertificates("certificate", path)
	if err != nil {
		return nil, err
	}
	leaf, now := chain[0], time.Now()
	if now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("load TLS certificate %s: it expired at %v", path, leaf.NotAfter.UTC())
	}
	if now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("load TLS certificate %s: it is not valid before %v (is this host's clock right?)", path, leaf.NotBefore.UTC())
	}
	return chain, nil
}

// loadKey loads the first private key of the file at path.
func loadKey(path string) (crypto.Signer, error) {
	blocks, err := readPEM("key", path)
	if err != nil {
		return nil, err
	}
	for _, b := range blocks {
		var key any
		switch b.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(b.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, fmt.Errorf("load TLS key %s: the key is encrypted (decrypt it first, e.g. openssl pkey -in KEY -out PLAIN)", path)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("load TLS key %s: %s block: %w", path, b.Type, err)
		}
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("load TLS key %s: a %T cannot sign (want an ECDSA, RSA or Ed25519 key)", path, key)
		}
		return signer, nil
	}
	return nil, fmt.Errorf("load TLS key %s: no private key block (the file holds %v)", path, blockTypes(blocks))
}

// loadCA loads the CA certificates of the bundle at path.
func loadCA(path string) (*x509.CertPool, error) {
	certs, err := parseCertificates("CA", path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	var others []string
	for _, c := range certs {
		if c.BasicConstraintsValid && c.IsCA {
			pool.AddCert(c)
		} else {
			others = append(others, c.Subject.String())
		}
	}
	if len(others) == len(certs) {
		return nil, fmt.Errorf("load TLS CA %s: the file holds no CA certificate (not CAs: %q; give the CA's certificate, not an end's)", path, others)
	}
	return pool, nil
}

// Server returns the backup's TLS configuration, a new one each call: TLS
// 1.3, its certificate, and a primary's certificate required, verified
// against the CA by crypto/tls, then checked against Allow.
// Session tickets are off: every connection makes a full handshake, in
// which the primary's certificate is verified again.
func (t *TLS) Server() *tls.Config {
	return &tls.Config{
		MinVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{t.cert},
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              t.roots,
		SessionTicketsDisabled: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return t.verifyPeer(cs, x509.ExtKeyUsageClientAuth)
		},
	}
}

// Client returns the primary's TLS configuration, a new one each call: TLS
// 1.3, its certificate (sent whatever CAs the backup says it accepts, so
// that a refusal says why), and the backup's certificate verified against
// the CA, then checked against Allow.
//
// crypto/tls's own verification is off (InsecureSkipVerify) because it
// cannot be had without a host name check; VerifyConnection does the same
// chain verification in its place, on every handshake, so it is never
// skipped. A Config that keeps InsecureSkipVerify must keep that
// VerifyConnection too.
func (t *TLS) Client() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{t.cert},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &t.cert, nil
		},
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return t.verifyPeer(cs, x509.ExtKeyUsageServerAuth)
		},
	}
}

// verifyPeer verifies the peer's certificate chain in cs against the CA, for
// usage, and checks that it carries an allowed name.
func (t *TLS) verifyPeer(cs tls.ConnectionState, usage x509.ExtKeyUsage) error {
	if len(cs.PeerCertificates) == 0 {
		return &PeerError{Reason: "the peer sent no certificate"}
	}
	leaf := cs.PeerCertificates[0]
	names := certNames(leaf)
	opts := x509.VerifyOptions{
		Roots:         t.roots,
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{usage},
	}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := leaf.Verify(opts); err != nil {
		// %q: the names come from a certificate no one vouches for.
		return &PeerError{Reason: fmt.Sprintf("peer certificate (names %q) does not verify against the CA in %s: %v", names, t.caFile, err), Err: err}
	}
	if len(t.allow) > 0 && !slices.ContainsFunc(names, func(n string) bool { return slices.Contains(t.allow, n) }) {
		return &PeerError{Reason: fmt.Sprintf("peer certificate names %v, none allowed (allowed: %v)", names, t.allow)}
	}
	return nil
}

// certNames returns the names a certificate carries that Allow matches: its
// DNS names, then its URIs.
func certNames(c *x509.Certificate) []string {
	names := slices.Clone(c.DNSNames)
	for _, u := range c.URIs {
		names = append(names, u.String())
	}
	return names
}
