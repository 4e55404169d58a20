package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/internal/labcert"
)

const certsUsage = `Usage: repagent certs DIR [flags]

Make a lab PKI for TLS between a primary and a backup in the directory DIR,
created if it does not exist: a CA (ca.crt, ca.key) and a certificate and key
for each end (primary.crt, primary.key, backup.crt, backup.key), ECDSA P-256
in PEM files, the keys readable by their owner only. Each end's certificate
carries its name (--primary-name, --backup-name) as a DNS name and as the URI
repagent://NAME, and both carry localhost, 127.0.0.1 and ::1 for tests on one
host. It prints the files and the command lines that use them.

Copy ca.crt and the backup's certificate and key to the backup host, ca.crt
and the primary's to the primary host. Keep ca.key on neither: whoever has
it can make a certificate that both ends accept. It refuses to overwrite any
of the six files unless --force. Exit code 0 on success, 1 on a runtime
error, 2 on a usage error.

Flags:
`

// maxCertDays bounds --days: a time.Duration holds about 292 years.
const maxCertDays = 100 * 365

// certsFlags holds the certs command's flag set and the values it parses
// into.
type certsFlags struct {
	fs                      *pflag.FlagSet
	primaryName, backupName string
	days                    int
	force                   bool
}

func newCertsFlags() *certsFlags {
	f := &certsFlags{fs: newFlagSet("certs")}
	fs := f.fs
	fs.StringVar(&f.primaryName, "primary-name", labcert.DefaultPrimaryName, "the primary's `name` in its certificate, which the backup allows (--tls-allow)")
	fs.StringVar(&f.backupName, "backup-name", labcert.DefaultBackupName, "the backup's `name` in its certificate, which the primary allows (--tls-allow)")
	fs.IntVar(&f.days, "days", int(labcert.DefaultValidity/(24*time.Hour)), "how many `days` the CA and the certificates are valid")
	fs.BoolVar(&f.force, "force", false, "replace the files if they exist (all six: a new CA, so copy the new files to both hosts)")
	return f
}

// certsJob is a parsed certs command: write the PKI into dir.
type certsJob struct {
	dir  string
	opts labcert.Options
}

// parseCertsArgs parses and checks the certs command's arguments. It returns
// pflag.ErrHelp for --help, and otherwise any error is a usage error.
func parseCertsArgs(args []string) (*certsJob, error) {
	f := newCertsFlags()
	if err := f.fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, err
		}
		return nil, usagef("%w", err)
	}
	switch f.fs.NArg() {
	case 0:
		return nil, usagef("no directory given: repagent certs DIR")
	case 1:
	default:
		return nil, usagef("unexpected argument %q (one directory: repagent certs DIR)", f.fs.Arg(1))
	}
	dir := f.fs.Arg(0)
	if dir == "" {
		return nil, usagef("the directory is an empty string")
	}
	if err := labcert.CheckName(f.primaryName); err != nil {
		return nil, usagef("--primary-name: %w", err)
	}
	if err := labcert.CheckName(f.backupName); err != nil {
		return nil, usagef("--backup-name: %w", err)
	}
	if f.primaryName == f.backupName {
		return nil, usagef("--primary-name and --backup-name are both %q: the names must differ, or each end would accept the other's certificate", f.primaryName)
	}
	if f.days < 1 || f.days > maxCertDays {
		return nil, usagef("--days %d: want 1 to %d", f.days, maxCertDays)
	}
	return &certsJob{dir: dir, opts: labcert.Options{
		PrimaryName: f.primaryName,
		BackupName:  f.backupName,
		Validity:    time.Duration(f.days) * 24 * time.Hour,
		Force:       f.force,
	}}, nil
}

// Run writes the PKI and prints its files and the command lines that use
// them. It does not wait for a signal: it is over in milliseconds.
func (j *certsJob) Run(_ context.Context, stopSignals func(), stdout, _ io.Writer) error {
	stopSignals()
	f, err := labcert.Write(j.dir, j.opts)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%w (--force replaces all six files with a new PKI)", err)
	}
	if err != nil {
		return err
	}
	days := j.opts.Validity / (24 * time.Hour)
	fmt.Fprintf(stdout, "wrote a lab PKI in %s, valid for %d days:\n", j.dir, days)
	fmt.Fprintf(stdout, "  CA       %s  %s  (keep the key off both hosts)\n", f.CACert, f.CAKey)
	fmt.Fprintf(stdout, "  primary  %s  %s  (names %s, %s)\n", f.PrimaryCert, f.PrimaryKey, j.opts.PrimaryName, labcert.NameURI(j.opts.PrimaryName))
	fmt.Fprintf(stdout, "  backup   %s  %s  (names %s, %s)\n", f.BackupCert, f.BackupKey, j.opts.BackupName, labcert.NameURI(j.opts.BackupName))
	fmt.Fprintf(stdout, "\nOn the backup host, with %s, %s and %s:\n  %s\n", labcert.CACertFile, labcert.BackupCertFile, labcert.BackupKeyFile,
		shellJoin("repagent", "backup", "--listen", "0.0.0.0:7070",
			"--tls-cert", f.BackupCert, "--tls-key", f.BackupKey, "--tls-ca", f.CACert, "--tls-allow", j.opts.PrimaryName))
	fmt.Fprintf(stdout, "\nOn the primary host, with %s, %s and %s:\n  %s\n", labcert.CACertFile, labcert.PrimaryCertFile, labcert.PrimaryKeyFile,
		shellJoin("repagent", "primary", "--backup", "backup-host:7070",
			"--tls-cert", f.PrimaryCert, "--tls-key", f.PrimaryKey, "--tls-ca", f.CACert, "--tls-allow", j.opts.BackupName))
	return nil
}

// shellJoin joins args into a command line a POSIX shell reads back as args:
// an argument with anything but letters, digits and -_./:=,+@% in it is
// single-quoted.
func shellJoin(args ...string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		plain := a != ""
		for _, c := range a {
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.ContainsRune("-_./:=,+@%", c)) {
				plain = false
				break
			}
		}
		if plain {
			quoted[i] = a
		} else {
			quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(quoted, " ")
}

// runCerts is the certs command.
func runCerts(args []string, stdout, stderr io.Writer) int {
	o, err := parseCertsArgs(args)
	help := func(w io.Writer) { fmt.Fprint(w, certsUsage+newCertsFlags().fs.FlagUsages()) }
	return execute("repagent certs", o, err, help, nil, stdout, stderr)
}
