package replicatetest

import (
	"io"
	"log/slog"
	"sync"
	"testing"
)

// Logger returns a logger that writes to t's output (testing.TB.Output):
// shown when the test fails, or with -v, beside the test's own lines.
// Records are dropped from the moment a cleanup Logger registers runs (the
// cleanups of a Pair made after it, which end the engines, run before), so
// an engine goroutine that outlives the test cannot make it panic.
func Logger(t testing.TB) *slog.Logger {
	w := &testWriter{w: t.Output()}
	t.Cleanup(w.close)
	return slog.New(slog.NewTextHandler(w, nil))
}

// testWriter writes to a test's output until close.
type testWriter struct {
	mu     sync.Mutex
	w      io.Writer
	closed bool
}

func (w *testWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return len(b), nil
	}
	return w.w.Write(b)
}

func (w *testWriter) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}
