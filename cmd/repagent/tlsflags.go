package main

import (
	"crypto/tls"
	"net"
	"net/netip"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/replicate/protect"
)

// tlsFlags are the replication link's TLS flags of the primary and the
// backup commands.
type tlsFlags struct {
	cert, key, ca string
	allow         []string
}

// register adds the flags; peer names the other end ("the backup").
func (t *tlsFlags) register(fs *pflag.FlagSet, peer string) {
	fs.StringVar(&t.cert, "tls-cert", "", "this end's certificate `file` (PEM) for TLS 1.3 on the replication link, with --tls-key and --tls-ca (repagent certs DIR makes a lab set)")
	fs.StringVar(&t.key, "tls-key", "", "the private key `file` (PEM) of --tls-cert")
	fs.StringVar(&t.ca, "tls-ca", "", "the CA `file` (PEM) that must have signed "+peer+"'s certificate")
	fs.StringArrayVar(&t.allow, "tls-allow", nil, "accept "+peer+" only if its certificate carries this `name` as a DNS or URI SAN (repeatable; default: any certificate the CA signed)")
}

// load returns the link's TLS, or nil when no TLS flag was given; a partial
// or unloadable set is a usage error naming the file.
func (t *tlsFlags) load() (*protect.TLS, error) {
	if t.cert == "" && t.key == "" && t.ca == "" && len(t.allow) == 0 {
		return nil, nil
	}
	if t.cert == "" || t.key == "" || t.ca == "" {
		return nil, usagef("TLS needs --tls-cert, --tls-key and --tls-ca together (repagent certs DIR makes a lab set)")
	}
	tl, err := protect.LoadTLS(protect.TLSFiles{Cert: t.cert, Key: t.key, CA: t.ca, Allow: t.allow})
	if err != nil {
		return nil, usagef("%w", err)
	}
	return tl, nil
}

// serverTLS and clientTLS are nil without TLS.
func serverTLS(t *protect.TLS) *tls.Config {
	if t == nil {
		return nil
	}
	return t.Server()
}

func clientTLS(t *protect.TLS) *tls.Config {
	if t == nil {
		return nil
	}
	return t.Client()
}

// loopbackOnly reports whether a listen address accepts connections from
// this host only: a loopback IP, or localhost. ":7070" and "0.0.0.0:7070"
// listen on every interface.
func loopbackOnly(listen string) bool {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}
