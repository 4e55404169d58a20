package replicate

import "testing"

// The capture modes parse from and print as the CLI's words.
func TestParseCapture(t *testing.T) {
	for _, c := range []Capture{CaptureEager, CaptureLazy, CaptureAuto} {
		if got, err := ParseCapture(c.String()); err != nil || got != c {
			t.Errorf("ParseCapture(%q) = %v, %v", c.String(), got, err)
		}
	}
	if _, err := ParseCapture("lazily"); err == nil || err.Error() != `unknown capture "lazily" (want eager, lazy or auto)` {
		t.Errorf("ParseCapture(lazily): %v", err)
	}
}
