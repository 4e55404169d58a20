package labcert

import (
	"os"

	"github.com/repagent/repagent/replicate/protect"
)

// LoadPair makes a lab PKI with the default names and returns both ends'
// link TLS, each allowing only the other's name: the main job's --tls and
// the bench's link section, which play both hosts in one process. The files
// live in a temporary directory only for as long as it takes to load them.
func LoadPair() (primary, backup *protect.TLS, err error) {
	dir, err := os.MkdirTemp("", "repagent-tls-")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(dir)
	f, err := Write(dir, Options{})
	if err != nil {
		return nil, nil, err
	}
	if primary, err = protect.LoadTLS(protect.TLSFiles{Cert: f.PrimaryCert, Key: f.PrimaryKey, CA: f.CACert,
		Allow: []string{DefaultBackupName}}); err != nil {
		return nil, nil, err
	}
	if backup, err = protect.LoadTLS(protect.TLSFiles{Cert: f.BackupCert, Key: f.BackupKey, CA: f.CACert,
		Allow: []string{DefaultPrimaryName}}); err != nil {
		return nil, nil, err
	}
	return primary, backup, nil
}
