package main

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/tlstest"
	"github.com/repagent/repagent/replicate/protect"
)

// runCertsCmd runs `repagent certs args...` in-process.
func runCertsCmd(args ...string) (code int, stdout, stderr string) {
	var out, errs bytes.Buffer
	code = run(append([]string{"certs"}, args...), &out, &errs)
	return code, out.String(), errs.String()
}

// The six files, and the mode each must have.
var certFiles = []struct {
	name string
	mode fs.FileMode
}{
	{"ca.crt", 0o644}, {"ca.key", 0o600},
	{"primary.crt", 0o644}, {"primary.key", 0o600},
	{"backup.crt", 0o644}, {"backup.key", 0o600},
}

// flagValue returns the value after flag in the command line that starts
// with prefix in out.
func flagValue(t *testing.T, out, prefix, flag string) string {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if !strings.HasPrefix(strings.TrimSpace(line), prefix) {
			continue
		}
		if i := slices.Index(f, flag); i >= 0 && i+1 < len(f) {
			return f[i+1]
		}
	}
	t.Fatalf("no line %q... with %s in the output:\n%s", prefix, flag, out)
	return ""
}

// repagent certs DIR writes the six files with their modes and prints them
// and two command lines; the files they name load with protect.LoadTLS and
// the two ends they configure shake hands.
func TestCerts(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	code, out, errs := runCertsCmd(dir)
	if code != 0 || errs != "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	for _, f := range certFiles {
		path := filepath.Join(dir, f.name)
		fi, err := os.Stat(path)
		if err != nil {
			t.Error(err)
			continue
		}
		if fi.Mode() != f.mode {
			t.Errorf("%s: mode %v, want %v", f.name, fi.Mode(), f.mode)
		}
		if !strings.Contains(out, path) {
			t.Errorf("the output does not name %s:\n%s", path, out)
		}
	}
	backupLine := "repagent backup --listen 0.0.0.0:7070 --tls-cert " + filepath.Join(dir, "backup.crt") +
		" --tls-key " + filepath.Join(dir, "backup.key") + " --tls-ca " + filepath.Join(dir, "ca.crt") + " --tls-allow primary\n"
	primaryLine := "repagent primary --backup backup-host:7070 --tls-cert " + filepath.Join(dir, "primary.crt") +
		" --tls-key " + filepath.Join(dir, "primary.key") + " --tls-ca " + filepath.Join(dir, "ca.crt") + " --tls-allow backup\n"
	for _, want := range []string{"valid for 825 days", backupLine, primaryLine} {
		if !strings.Contains(out, want) {
			t.Errorf("the output lacks %q:\n%s", want, out)
		}
	}

	// Load each end as its command line says.
	end := func(cmd string) *protect.TLS {
		c, err := protect.LoadTLS(protect.TLSFiles{
			Cert:  flagValue(t, out, cmd, "--tls-cert"),
			Key:   flagValue(t, out, cmd, "--tls-key"),
			CA:    flagValue(t, out, cmd, "--tls-ca"),
			Allow: []string{flagValue(t, out, cmd, "--tls-allow")},
		})
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		return c
	}
	backup, primary := end("repagent backup"), end("repagent primary")
	if srv, cli := tlstest.Link(t, backup.Server(), primary.Client()); srv.Err != nil || cli.Err != nil {
		t.Fatalf("handshake: backup %v, primary %v", srv.Err, cli.Err)
	}
}

// A second run refuses to overwrite, names the file and changes nothing;
// --force makes a new PKI.
func TestCertsOverwrite(t *testing.T) {
	dir := t.TempDir()
	if code, _, errs := runCertsCmd(dir); code != 0 {
		t.Fatalf("first run: exit %d, %s", code, errs)
	}
	before, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	code, out, errs := runCertsCmd(dir)
	want := "repagent certs: refuse to overwrite " + filepath.Join(dir, "ca.crt") + ": file already exists (--force replaces all six files with a new PKI)\n"
	if code != 1 || errs != want || out != "" {
		t.Errorf("second run: exit %d, stdout %q, stderr %q; want exit 1 and %q", code, out, errs, want)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "ca.crt")); !bytes.Equal(before, after) {
		t.Error("the refused run changed ca.crt")
	}
	// Refused too when only one of the files is there.
	for _, f := range certFiles[:5] {
		os.Remove(filepath.Join(dir, f.name))
	}
	if code, _, errs := runCertsCmd(dir); code != 1 || !strings.Contains(errs, "refuse to overwrite "+filepath.Join(dir, "backup.key")) {
		t.Errorf("run over backup.key alone: exit %d, stderr %q", code, errs)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("the refused run left %d files, want 1", len(ents))
	}

	if code, _, errs := runCertsCmd(dir, "--force"); code != 0 {
		t.Fatalf("--force: exit %d, %s", code, errs)
	}
	for _, f := range certFiles {
		if fi, err := os.Stat(filepath.Join(dir, f.name)); err != nil || fi.Mode() != f.mode {
			t.Errorf("after --force, %s: %v, %v", f.name, fi, err)
		}
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "ca.crt")); bytes.Equal(before, after) {
		t.Error("--force kept the old CA")
	}
}

// --primary-name, --backup-name and --days reach the certificates and the
// command lines, and flags may follow DIR.
func TestCertsFlags(t *testing.T) {
	dir := t.TempDir()
	code, out, errs := runCertsCmd(dir, "--primary-name", "pa.lab", "--backup-name=ba-2", "--days", "3")
	if code != 0 {
		t.Fatalf("exit %d, %s", code, errs)
	}
	for _, want := range []string{"valid for 3 days", "(names pa.lab, repagent://pa.lab)", "(names ba-2, repagent://ba-2)",
		"--tls-allow pa.lab\n", "--tls-allow ba-2\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("the output lacks %q:\n%s", want, out)
		}
	}
	data, err := os.ReadFile(filepath.Join(dir, "primary.crt"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil {
		t.Fatalf("primary.crt: not PEM: %q", data)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(c.DNSNames, "pa.lab") || len(c.URIs) != 1 || c.URIs[0].String() != "repagent://pa.lab" {
		t.Errorf("primary.crt: DNS names %q, URIs %v", c.DNSNames, c.URIs)
	}
	if left := time.Until(c.NotAfter); left < 71*time.Hour || left > 72*time.Hour {
		t.Errorf("primary.crt valid for %v more, want 3 days", left)
	}
}

func TestCertsUsageErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no directory", nil, "no directory given: repagent certs DIR"},
		{"flags only", []string{"--force"}, "no directory given"},
		{"two directories", []string{dir, "other"}, `unexpected argument "other"`},
		{"empty directory", []string{""}, "the directory is an empty string"},
		{"days 0", []string{dir, "--days", "0"}, "--days 0: want 1 to 36500"},
		{"days too many", []string{dir, "--days", "36501"}, "--days 36501: want 1 to 36500"},
		{"days not a number", []string{dir, "--days", "ten"}, `invalid argument "ten" for "--days`},
		{"same names", []string{dir, "--primary-name", "node", "--backup-name", "node"}, `--primary-name and --backup-name are both "node"`},
		{"backup named primary", []string{dir, "--backup-name", "primary"}, `both "primary"`},
		{"upper case", []string{dir, "--primary-name", "Primary"}, `--primary-name: "Primary": character 'P' is not allowed`},
		{"localhost", []string{dir, "--backup-name", "localhost"}, `--backup-name: "localhost" does not identify an end`},
		{"unknown flag", []string{dir, "--bogus"}, "unknown flag: --bogus"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkUsageError(t, runCerts, "repagent certs: ", tc.args, tc.want)
		})
	}
	// Through the dispatcher, too, and nothing written.
	if code, _, _ := runCertsCmd(); code != 2 {
		t.Errorf("repagent certs: exit %d, want 2", code)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("usage errors left %d files in %s", len(ents), dir)
	}
}

func TestCertsHelp(t *testing.T) {
	for _, args := range [][]string{{"certs", "--help"}, {"help", "certs"}} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != 0 {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr.String())
		}
		for _, want := range []string{"Usage: repagent certs DIR", "--primary-name name", `(default "primary")`,
			"--backup-name name", "--days days", "(default 825)", "--force", "Keep ca.key on neither"} {
			if !strings.Contains(stdout.String(), want) {
				t.Errorf("%v: usage lacks %q:\n%s", args, want, stdout.String())
			}
		}
	}
	var stdout bytes.Buffer
	run([]string{"help"}, &stdout, io.Discard)
	if !strings.Contains(stdout.String(), "\n  certs    make a lab CA") {
		t.Errorf("repagent help does not list certs:\n%s", stdout.String())
	}
}

// shellJoin's output, read by sh, gives back the arguments.
func TestCertsShellJoin(t *testing.T) {
	args := []string{"plain", "/a/b-c_d.crt", "with space", "it's", "$HOME", "a\"b", "", "x=1,y:2"}
	line := shellJoin(args...)
	if want := `plain /a/b-c_d.crt 'with space' 'it'\''s' '$HOME' 'a"b' '' x=1,y:2`; line != want {
		t.Errorf("shellJoin = %s\nwant       %s", line, want)
	}
	out, err := exec.Command("sh", "-c", "for a in "+line+`; do printf '[%s]' "$a"; done`).Output()
	if err != nil {
		t.Fatal(err)
	}
	want := "[" + strings.Join(args, "][") + "]"
	if string(out) != want {
		t.Errorf("sh read %s\nwant    %s", out, want)
	}
}
