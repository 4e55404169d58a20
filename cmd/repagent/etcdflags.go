package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/replicate/fence"
)

// etcdFlags are the fencing flags of the primary and the backup commands:
// the VM's ownership as a lease in etcd.
type etcdFlags struct {
	endpoints     []string
	name          string
	ttl           time.Duration
	cert, key, ca string
	onLoss        string // primary only
}

// register adds the flags; primary adds --on-etcd-loss.
func (e *etcdFlags) register(fs *pflag.FlagSet, primary bool) {
	fs.StringSliceVar(&e.endpoints, "etcd", nil, "fence through etcd at these `endpoints` (comma-separated URLs, e.g. http://10.0.0.9:2379): the VM's owner holds a lease there, and a backup resumes the VM only once it owns it; with --name. Without it a partition between the hosts can leave two copies running")
	fs.StringVar(&e.name, "name", "", "the protected VM's `name`, the same on the primary and the backup (its owner key is /repagent/vm/NAME/owner); with --etcd")
	fs.DurationVar(&e.ttl, "lease-ttl", fence.DefaultTTL, "the ownership lease's TTL in etcd, in whole seconds: a primary cut off from etcd fences within it, a backup takes over after it expires")
	fs.StringVar(&e.cert, "etcd-cert", "", "client certificate `file` (PEM) for TLS to etcd, with --etcd-key")
	fs.StringVar(&e.key, "etcd-key", "", "the private key `file` (PEM) of --etcd-cert")
	fs.StringVar(&e.ca, "etcd-ca", "", "the CA `file` (PEM) that signed etcd's server certificate: TLS to etcd (needed with https:// endpoints)")
	if primary {
		fs.StringVar(&e.onLoss, "on-etcd-loss", "fence", "what the primary does when it cannot renew its lease (etcd unreachable): `fence` (stop releasing output and pause the VM: no split brain) or run (keep running, and fence only once another agent owns the VM)")
	}
}

// load returns the fencing asked for, or nil without --etcd; anything
// wrong is a usage error naming the flag.
func (e *etcdFlags) load(fs *pflag.FlagSet) (*agent.Fencing, error) {
	if len(e.endpoints) == 0 {
		for _, n := range []string{"name", "lease-ttl", "etcd-cert", "etcd-key", "etcd-ca", "on-etcd-loss"} {
			if fs.Lookup(n) != nil && fs.Changed(n) {
				return nil, usagef("--%s is about fencing through etcd: it needs --etcd", n)
			}
		}
		return nil, nil
	}
	if e.name == "" {
		return nil, usagef("--etcd needs --name: the VM's name, the same on the primary and its backup")
	}
	if strings.Contains(e.name, "/") || len(e.name) > 128 {
		return nil, usagef("--name %q: want at most 128 bytes and no '/'", e.name)
	}
	if e.ttl < time.Second || e.ttl%time.Second != 0 {
		return nil, usagef("--lease-ttl %v: want whole seconds, at least 1s (etcd's unit)", e.ttl)
	}
	f := &agent.Fencing{Name: e.name, TTL: e.ttl}
	https := false
	for _, ep := range e.endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, usagef("--etcd %q: want a URL such as http://HOST:2379 or https://HOST:2379", ep)
		}
		https = https || u.Scheme == "https"
		f.Endpoints = append(f.Endpoints, ep)
	}
	switch e.onLoss {
	case "", "fence":
	case "run":
		f.RunOnLoss = true
	default:
		return nil, usagef("--on-etcd-loss %q: want fence or run", e.onLoss)
	}
	if (e.cert == "") != (e.key == "") {
		return nil, usagef("--etcd-cert and --etcd-key go together")
	}
	if e.ca != "" || e.cert != "" || https {
		if e.ca == "" {
			return nil, usagef("TLS to etcd needs --etcd-ca: the CA that signed its server certificate")
		}
		tc, err := etcdTLS(e.ca, e.cert, e.key)
		if err != nil {
			return nil, usagef("%w", err)
		}
		f.TLS = tc
	}
	return f, nil
}

// etcdTLS is the client side of TLS to etcd: its server verified against
// ca, and this agent's certificate presented when given.
func etcdTLS(ca, cert, key string) (*tls.Config, error) {
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, fmt.Errorf("--etcd-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--etcd-ca %s: no PEM certificate in it", ca)
	}
	tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if cert != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert %s / --etcd-key %s: %w", cert, key, err)
		}
		tc.Certificates = []tls.Certificate{pair}
	}
	return tc, nil
}
