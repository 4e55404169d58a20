package faultpoint

import "testing"

func TestAttach(t *testing.T) {
	a, b := new(int), new(int)
	var got []string
	detach := Attach(a, func(point string, n uint64) { got = append(got, point) })
	Hit(a, Pause, 1)
	Hit(b, Send, 2) // nothing attached to b
	if !Attached(a) || Attached(b) {
		t.Fatal("Attached is wrong")
	}
	detach()
	detach() // twice is harmless
	Hit(a, Sent, 3)
	if len(got) != 1 || got[0] != Pause || Attached(a) || attached.Load() != 0 {
		t.Fatalf("calls %v after detach, attached %d", got, attached.Load())
	}
}
