package replicate

// Test-only hooks for the package's external tests.

// PrimarySpeaks narrows the protocol versions p offers in its hello to
// lo..hi, before Run: the real engine plays a primary of an older version.
func PrimarySpeaks(p *Primary, lo, hi uint32) { p.speak = versions{lo, hi} }

// BackupSpeaks narrows the protocol versions b accepts to lo..hi: the real
// backup plays one of an older version.
func BackupSpeaks(b *Backup, lo, hi uint32) { b.speak = versions{lo, hi} }

// SessionVersion is the protocol version p's session spoke (0 before a
// welcome); read it once Run has returned.
func SessionVersion(p *Primary) uint32 { return p.version }
