// Package labcert makes a small private PKI for a replication lab: a CA and
// one certificate each for the primary and the backup, in the form that
// protect.LoadTLS reads (PEM files, ECDSA P-256 keys).
//
// Generate makes the PKI in memory; Write makes it and writes it into a
// directory:
//
//	ca.crt       the CA certificate (self-signed); both hosts need it
//	ca.key       the CA's private key: whoever holds it can make a
//	             certificate either end accepts, so keep it off both hosts
//	primary.crt  the primary's certificate and key (DNS name "primary",
//	primary.key  URI repagent://primary), for the primary host only
//	backup.crt   the backup's, likewise ("backup", repagent://backup),
//	backup.key   for the backup host only
//
// Both leaf certificates also carry the DNS name localhost and the IP
// addresses 127.0.0.1 and ::1, so that they suit a test on one host, and
// both may serve as client and as server. Because both carry localhost, it
// identifies neither end: allow the ends by their own names.
//
// This is a lab PKI: there is no revocation, and a lost key is replaced by
// making a new PKI (Options.Force) and copying it to both hosts again.
package labcert
