// Package procout keeps what a child process writes, bounded and safe to
// read while it runs: for error messages (the bench's failover primary) and
// tests (the commands' kill tests).
package procout

import (
	"bytes"
	"strings"
	"sync"
)

// Buffer keeps the first 64 KiB written to it, safe to read while a
// child process writes it: a child's output, for messages and tests.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write keeps what fits of p and reports all of it written.
func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := 64<<10 - l.buf.Len(); room > 0 {
		l.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// String is what was kept, without leading and trailing space.
func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.TrimSpace(l.buf.String())
}
